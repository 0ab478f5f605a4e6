"""Quantization methods, by name. A method takes the simulated model and calibration windows and
leaves every quantizer with a range (and the weights possibly transformed, equivalently)."""

from __future__ import annotations

from . import rtn

METHODS = {"rtn": rtn}


def get_method(name: str):
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(METHODS)}") from None
