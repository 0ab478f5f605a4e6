"""Identities: the hash that names a trial, a stage entry or a quantized model, and the method name of a
float trial. A trial's id is the hash of its normalized config, so the same config is the same trial in
every sweep and on every node."""

from __future__ import annotations

import hashlib
import json

from .vocab import FLOAT_METHOD

__all__ = ["FLOAT_METHOD", "config_hash", "flatten", "quant_key"]


def config_hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def quant_key(config: dict) -> str:
    """The identity of the quantized model: the trial's config without its evaluation."""
    return config_hash({k: v for k, v in config.items() if k != "eval"})


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
