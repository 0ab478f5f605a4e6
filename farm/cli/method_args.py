"""Command-line flags for every method hyper-parameter, generated from the methods' ``Config`` dataclasses,
so a new method or field needs no CLI change. Only flags the user gives are passed on; the method's
``method_config`` then refuses the ones it does not have, by name."""

from __future__ import annotations

import argparse
from dataclasses import fields

# Fields whose flag name would collide with a general option get a prefix.
RENAMED = {"batch_size": "train-batch-size", "seed": "train-seed"}


def _parse_bool(v: str) -> bool:
    low = v.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {v!r}")


def _all_fields() -> dict:
    """field -> {method: default}"""
    from quant.methods import METHODS, method_config

    out: dict[str, dict] = {}
    for name in METHODS:
        cfg = method_config(name)
        for f in fields(cfg):
            out.setdefault(f.name, {})[name] = getattr(cfg, f.name)
    return out


def _kind(d):
    if isinstance(d, bool):
        return _parse_bool, "BOOL"
    if isinstance(d, int):
        return int, "INT"
    if isinstance(d, float):
        return float, "FLOAT"
    return str, "STR"


def add(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("method hyper-parameters (only those of --method apply; defaults per method)")
    for name, per_method in sorted(_all_fields().items()):
        kind, metavar = _kind(next(iter(per_method.values())))
        flag = "--" + RENAMED.get(name, name.replace("_", "-"))
        by_value: dict[str, list] = {}
        for m, d in per_method.items():
            by_value.setdefault(repr(d), []).append(m)
        help_ = "; ".join(f"{'/'.join(ms)}: {v}" for v, ms in by_value.items())
        g.add_argument(flag, dest=f"hp_{name}", type=kind, default=None, metavar=metavar, help=help_)


def overrides(args: argparse.Namespace) -> dict:
    return {k[3:]: v for k, v in vars(args).items() if k.startswith("hp_") and v is not None}
