"""Quantization methods, by name. A method takes the simulated model and calibration windows and
leaves every quantizer with a range (and the weights possibly transformed, equivalently).

Each method module has ``Config`` (a dataclass of its hyper-parameters) and
``apply(model, windows, config, ctx) -> dict`` (the returned dict goes into the recipe as ``method_info``).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Callable

from . import mobilequant, omniquant, rtn, smoothquant

METHODS = {
    "rtn": rtn,
    "smoothquant": smoothquant,
    "omniquant": omniquant,
    "lrl-block": omniquant,  # OmniQuant's block-wise routine that also learns activation ranges
    "mobilequant": mobilequant,
}


@dataclass
class MethodContext:
    """What a method may use besides the model and windows: the loaded model (tokenizer, name), the
    calibration config (cache keys), a per-step callback (training loss to a tracker) and progress bars."""

    lm: Any = None
    calib: Any = None
    on_step: Callable[[dict], None] | None = None
    progress: bool = True
    name: str = ""


def get_method(name: str):
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(METHODS)}") from None


def method_config(name: str, overrides: dict | None = None):
    """The method's ``Config`` with ``overrides`` applied; unknown keys and wrong types are refused by name."""
    mod = get_method(name)
    base = mod.default_config(name) if hasattr(mod, "default_config") else mod.Config()
    overrides = dict(overrides or {})
    known = {f.name: f for f in fields(base)}
    unknown = sorted(set(overrides) - set(known))
    if unknown:
        raise ValueError(f"method {name!r}: unknown hyper-parameter(s) {unknown}; known: {sorted(known)}")
    for k, v in overrides.items():
        default = getattr(base, k)
        if isinstance(default, bool) and not isinstance(v, bool):
            raise ValueError(f"method {name!r}: {k} must be true or false, got {v!r}")
        if isinstance(default, (int, float)) and not isinstance(default, bool):
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ValueError(f"method {name!r}: {k} must be a number, got {v!r}")
            if isinstance(default, int) and not isinstance(v, int):
                raise ValueError(f"method {name!r}: {k} must be an integer, got {v!r}")
            overrides[k] = type(default)(v)
    cfg = replace(base, **overrides)
    if hasattr(cfg, "check"):  # refuse bad values here, before a sweep schedules anything
        cfg.check()
    return cfg
