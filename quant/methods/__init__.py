"""Quantization methods, by name. A method takes the simulated model and calibration windows and
leaves every quantizer with a range (and the weights possibly transformed, equivalently).

A method is anything with the :class:`Method` protocol (a module, usually), added by :func:`register`:
the methods here at import, a sweep file's plugin methods by farm on the driver and on every worker.
:data:`METHODS` is a read-only view of the table; only :func:`register` writes it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, is_dataclass, replace
from types import MappingProxyType
from typing import Any, Callable, Protocol

from . import mobilequant, omniquant, rtn, smoothquant


class Method(Protocol):
    """What :func:`register` takes.

    - ``Config``: a dataclass of the hyper-parameters, with optional ``check()`` (refuse bad values before
      anything runs) and ``identity() -> dict`` (the form that goes into a trial's id, leaving out
      hyper-parameters added later at their neutral value, so old ids stay valid);
    - ``apply(model, windows, config, ctx) -> dict``: the returned dict goes into the recipe as
      ``method_info``;
    - optional ``default_config(name)``: one method registered under several names with other defaults;
    - optional ``USES_ACTIVATION_STATS``: it starts from the float model's activation statistics, which
      a sweep computes once and shares between trials (``register(..., uses_activation_stats=)`` says
      the same for a method that cannot carry the attribute).
    """

    Config: type

    def apply(self, model, windows, config, ctx) -> dict: ...


@dataclass(frozen=True)
class _Entry:
    method: Any
    defaults: Callable[[], Any]  # a fresh Config with this name's defaults
    uses_activation_stats: bool


_TABLE: dict[str, Any] = {}
_ENTRIES: dict[str, _Entry] = {}
METHODS = MappingProxyType(_TABLE)  # name -> method, in registration order


def register(name: str, method: Method, *, uses_activation_stats: bool | None = None) -> None:
    """Add ``method`` under ``name``. The same object again is a no-op (a plugin is registered once per
    process that runs it); another object under a taken name is refused, as is one without the protocol."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"a method needs a name, got {name!r}")
    config_cls = getattr(method, "Config", None)
    if not (isinstance(config_cls, type) and is_dataclass(config_cls)) or not callable(getattr(method, "apply", None)):
        raise ValueError(f"{method!r} is not a quantization method: it needs Config (a dataclass) and "
                         "apply(model, windows, config, ctx)")
    current = _TABLE.get(name)
    if current is not None:
        if current is method:
            return
        raise ValueError(f"method {name!r} is already registered as another method ({current!r})")
    factory = getattr(method, "default_config", None)
    defaults = (lambda: factory(name)) if callable(factory) else config_cls
    stats = bool(getattr(method, "USES_ACTIVATION_STATS", False)) if uses_activation_stats is None \
        else bool(uses_activation_stats)
    _ENTRIES[name] = _Entry(method, defaults, stats)
    _TABLE[name] = method


register("rtn", rtn)
register("smoothquant", smoothquant, uses_activation_stats=True)
register("omniquant", omniquant, uses_activation_stats=True)
# OmniQuant's block-wise routine that also learns activation ranges
register("lrl-block", omniquant, uses_activation_stats=True)
register("mobilequant", mobilequant, uses_activation_stats=True)


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


def uses_activation_stats(name: str) -> bool:
    """Whether the method starts from activation statistics of the float model (see :class:`Method`)."""
    get_method(name)
    return _ENTRIES[name].uses_activation_stats


def config_identity(config) -> dict:
    """The form of a method's config that identifies it (``Config.identity()`` where the method has one)."""
    identity = getattr(type(config), "identity", None)
    return identity(config) if callable(identity) else asdict(config)


def method_config(name: str, overrides: dict | None = None):
    """The method's ``Config`` with ``overrides`` applied; unknown keys and wrong types are refused by name."""
    get_method(name)
    base = _ENTRIES[name].defaults()
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
