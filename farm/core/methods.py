"""Quantization methods as farm uses them: plugin methods named in a sweep file, a method's Config built
from a sweep's hyper-parameters, and the normalized form of that Config that goes into a trial's id."""

from __future__ import annotations

import importlib
import importlib.util
import json
from dataclasses import fields, is_dataclass


def register_plugins(plugins: dict[str, str]) -> None:
    """Import plugin methods ("module:attr") and add them to quant's method table (also on workers)."""
    from quant import methods

    for name, target in plugins.items():
        obj = import_target(target)
        current = methods.METHODS.get(name)
        if current is not None and current is not obj:
            raise ValueError(f"plugin method {name!r} clashes with an existing method of that name")
        methods.METHODS[name] = obj


def import_target(target: str):
    mod_name, _, attr = target.partition(":")
    mod = importlib.import_module(mod_name)
    obj = getattr(mod, attr) if attr else mod
    if not (hasattr(obj, "apply") and hasattr(obj, "Config")):
        raise ValueError(f"{target} is not a quantization method (it needs Config and apply)")
    return obj


def build_method_config(name: str, overrides: dict):
    """The method's Config with overrides; quant.methods.method_config when the quant core has it."""
    from quant import methods

    if hasattr(methods, "method_config") and is_dataclass(getattr(methods.get_method(name), "Config", None)):
        return methods.method_config(name, overrides)
    mod = methods.get_method(name)
    try:
        return mod.Config(**overrides)
    except TypeError as e:
        raise ValueError(f"method {name!r}: {e}") from None


def method_keys(name: str) -> set[str] | None:
    """Hyper-parameter names of a method, or None when its Config is not a dataclass (accept anything)."""
    cfg = build_method_config(name, {})
    return {f.name for f in fields(cfg)} if is_dataclass(cfg) else None


def config_dict(cfg) -> dict:
    from dataclasses import asdict

    # identity(): a hyper-parameter added later is left out at its neutral value, so trial ids stay valid
    d = cfg.identity() if hasattr(cfg, "identity") else asdict(cfg) if is_dataclass(cfg) else dict(cfg or {})
    return json.loads(json.dumps(d, default=str))  # tuples -> lists, so the hash equals the reloaded form


def harness_module():
    """quant.eval.harness (lm-eval tasks) when it exists, else None."""
    if importlib.util.find_spec("quant.eval.harness") is None:
        return None
    return importlib.import_module("quant.eval.harness")
