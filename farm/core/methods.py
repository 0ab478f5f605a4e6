"""Quantization methods as farm uses them: plugin methods named in a sweep file, a method's Config built
from a sweep's hyper-parameters, and the normalized form of that Config that goes into a trial's id."""

from __future__ import annotations

import importlib
import json
from dataclasses import fields


def register_plugins(plugins: dict[str, str]) -> None:
    """Import plugin methods ("module:attr") and register them with quant (on the driver and on every
    worker, each a fresh process); quant refuses an object without the method protocol or a taken name."""
    from quant import methods

    for name, target in plugins.items():
        methods.register(name, import_target(target))


def import_target(target: str):
    mod_name, _, attr = target.partition(":")
    mod = importlib.import_module(mod_name)
    return getattr(mod, attr) if attr else mod


def build_method_config(name: str, overrides: dict):
    """The method's Config with overrides (unknown or mistyped hyper-parameters refused by name)."""
    from quant import methods

    return methods.method_config(name, overrides)


def method_keys(name: str) -> set[str]:
    """Hyper-parameter names of a method."""
    return {f.name for f in fields(build_method_config(name, {}))}


def config_dict(cfg) -> dict:
    from quant import methods

    # tuples -> lists, so the hash equals the reloaded form
    return json.loads(json.dumps(methods.config_identity(cfg), default=str))


def harness_module():
    """quant.eval.harness (lm-eval tasks), imported when a sweep asks for a suite."""
    from quant.eval import harness

    return harness
