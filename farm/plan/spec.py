"""Sweep files: the YAML schema, its validation (every error names file, key path and line) and the
expansion of a grid into trials.

A sweep file::

    name: scaling                      # MLflow experiment name (default: the file name)
    base:                              # every trial starts from this
      model: smollm2-135m
      scheme: w8a8                     # or bitwidth: W4A8 / 4
      method: mobilequant
      samples: 32                      # calibration windows
      seqlen: 512
      seed: 0
      calib_corpus: news+pydoc         # calibration text (quant.data: news, pydoc, gen:<model>, a+b, a file)
      rotate: hadamard                 # none | random | hadamard: folded into the weights first (quant.rotation)
      rotate_seed: 0
      split: test                      # the evaluation split: test | validation | all (quant.data.split_bounds)
      epochs: 2                        # method hyper-parameters: epochs, iterations, lr, or method_config.<key>
    methods:                           # per-method hyper-parameters
      smoothquant: {alpha: 0.7}
    grid:                              # the cartesian product of these axes
      scheme: [w8a8, w4a8]
      samples: [32, 128]
      method_config.alpha: [0.5, 0.7]
    include: [{scheme: fp}]            # extra trials
    exclude: [{scheme: w4a8, samples: 32}]
    eval: {perplexity: {corpus: wiki, limit: 40}, suite: []}
    resources: {cpu: 1, gpu: 0}
    concurrency: {max_trials: 2}

Method hyper-parameters given in ``base`` or the grid apply to the trials whose method has them (RTN has
no epochs), so one grid can mix methods; a key that no method of the sweep knows is an error. Keys
under ``methods.<name>`` must be known to that method. Trials that normalize to the same config (FP
ignores the method, the calibration and the rotation; ``rotate_seed`` means nothing without ``rotate``)
are run once.

Defaults are left out of the config a trial id hashes: ``rotate: none`` adds no ``rotate`` key and
``split: test`` no ``split`` key, so the ids (and the quantize stage keys) of sweeps written before those
fields existed do not change.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..core.ids import FLOAT_METHOD, config_hash, flatten
from ..core.methods import build_method_config, config_dict, harness_module, method_keys, register_plugins
from . import yamlmarks
from .yamlmarks import Located, LocatedError

GRID_LIMIT = 64  # trials a sweep may expand to without --yes
HYPER_SHORTHANDS = ("epochs", "iterations", "lr")


class SpecError(LocatedError):
    """A sweep file is wrong; the message starts with ``file:line: key.path:``."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class TrialFields(_Strict):
    model: str = "smollm2-135m"
    layers: int | None = Field(None, ge=1)
    scheme: str = "w8a8"
    bitwidth: str | int | None = None
    method: str = "rtn"
    samples: int = Field(32, ge=1)
    seqlen: int = Field(512, ge=2)
    seed: int = 0
    calib_corpus: str = "news"
    rotate: Literal["none", "random", "hadamard"] = "none"  # quant.rotation.KINDS
    rotate_seed: int = 0
    split: Literal["test", "validation", "all"] = "test"  # evaluation split (quant.data.split_bounds)
    epochs: int | None = Field(None, ge=0)
    iterations: int | None = Field(None, ge=0)
    lr: float | None = Field(None, gt=0)
    method_config: dict[str, Any] = Field(default_factory=dict)


class PerplexitySpec(_Strict):
    corpus: str = "wiki"
    seqlen: int | None = Field(None, ge=2)  # default: the trial's seqlen
    limit: int | None = Field(40, ge=1)
    batch_size: int = Field(1, ge=1)


class EvalSpec(_Strict):
    perplexity: PerplexitySpec | None = Field(default_factory=PerplexitySpec)
    suite: list[str] = Field(default_factory=list)  # lm-eval tasks or suites (quant.eval.harness), e.g. [local]
    suite_limit: int | None = Field(None, ge=1)  # documents per task (quick looks)


class DeviceSpec(_Strict):
    """One entry of ``devices:``: a device name from the devices file or a kind (host, qnn-sim, adb, aihub);
    a bare string is ``{device: <string>}``."""

    device: str
    graphs: list[Literal["prefill", "decode"]] = Field(default_factory=lambda: ["prefill", "decode"], min_length=1)
    repeats: int = Field(10, ge=1)
    warmup: int = Field(3, ge=0)
    tokens: int = Field(16, ge=1)  # decode steps per timed run
    prefill: int = Field(128, ge=1)  # the export's prompt length
    ctx: int = Field(1024, ge=2)  # the export's KV cache positions
    allow_charging: bool = False
    resources: dict[str, float] = Field(default_factory=dict)  # Ray resources (default for phones: phone:<soc>)


class Resources(_Strict):
    cpu: float = Field(1.0, gt=0)
    gpu: float = Field(0.0, ge=0)
    memory_gb: float | None = Field(None, gt=0)
    custom: dict[str, float] = Field(default_factory=dict)


class Concurrency(_Strict):
    max_trials: int | None = Field(None, ge=1)  # trials in flight at once (default: as the cluster allows)


class Plugins(_Strict):
    methods: dict[str, str] = Field(default_factory=dict)  # name -> "module:attribute"


class SweepFile(_Strict):
    name: str | None = None
    description: str = ""
    base: TrialFields = Field(default_factory=TrialFields)
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    include: list[dict[str, Any]] = Field(default_factory=list)
    exclude: list[dict[str, Any]] = Field(default_factory=list)
    methods: dict[str, dict[str, Any]] = Field(default_factory=dict)
    eval: EvalSpec = Field(default_factory=EvalSpec)
    devices: list[DeviceSpec] = Field(default_factory=list)
    # the speed references every quantized trial is measured beside (per model): default both when
    # devices: is given, none otherwise; each is an ordinary trial (FP: scheme fp; W8A16: RTN at w8a16)
    baselines: list[Literal["fp", "w8a16"]] | None = None

    @field_validator("devices", mode="before")
    @classmethod
    def _device_strings(cls, v):
        return [{"device": d} if isinstance(d, str) else d for d in v] if isinstance(v, list) else v
    resources: Resources = Field(default_factory=Resources)
    concurrency: Concurrency = Field(default_factory=Concurrency)
    retries: int = Field(2, ge=0, le=10)  # re-runs of a trial whose worker process died
    save_artifacts: bool = True
    register_best: bool = True  # register the best model of each scheme in the MLflow registry
    report: bool = False
    plugins: Plugins = Field(default_factory=Plugins)


@dataclass
class Trial:
    id: str
    config: dict
    axes: dict  # the grid/include values that made it (for display)
    origin: tuple  # key path of the grid combination or include entry

    @property
    def short(self) -> str:
        return self.id[:8]


@dataclass
class Sweep:
    name: str
    file: str
    spec: SweepFile
    trials: list[Trial]
    text: str = ""
    duplicates: int = 0
    varying: list[str] = field(default_factory=list)
    baselines: dict = field(default_factory=dict)  # trial id -> "fp" | "w8a16": the device baselines

    def baseline_roles(self) -> list[str]:
        return baseline_roles(self.spec)

    @property
    def hash(self) -> str:
        return hashlib.sha256("\n".join(t.id for t in self.trials).encode()).hexdigest()[:16]


# ---------------------------------------------------------------- loading

def load_sweep(path: str | Path, max_trials: int | None = GRID_LIMIT, devices_file: str | None = None,
               baselines_default: list[str] | None = None) -> Sweep:
    """Read, validate and expand a sweep file. ``max_trials``: refuse bigger grids (None: no limit);
    ``devices_file``: the inventory its ``devices:`` are checked against (default: devicelab's lookup,
    $MQFARM_DEVICES, ./devices.yaml, the defaults); ``baselines_default``: the device baselines when the
    file gives no ``baselines:`` (None: FP and W8A16 with ``devices:``; the nightly passes [], its slots
    being the suite's own trials)."""
    path = Path(path)
    try:
        loc = yamlmarks.load(path)
    except LocatedError as e:
        raise SpecError(e.file, e.line, e.path, e.message) from None
    if not isinstance(loc.data, dict):
        raise SpecError(loc.file, loc.line(()), (), "a sweep file must be a mapping (name:, base:, grid:, ...)")
    spec = _validate(loc)
    if spec.baselines is None and baselines_default is not None:
        spec.baselines = list(baselines_default)
    name = spec.name or path.stem
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise _err(loc, ("name",), f"{name!r} is not a usable sweep name (letters, digits, _ . -)")
    return _expand(loc, spec, name, path.read_text(encoding="utf-8"), max_trials, devices_file)


def _err(loc: Located, path, message: str) -> SpecError:
    return SpecError(loc.file, loc.line(path), tuple(path), message)


def _known_keys(model_cls, loc: tuple) -> list[str]:
    cls = model_cls
    for part in loc:
        if not (isinstance(cls, type) and issubclass(cls, BaseModel)) or part not in cls.model_fields:
            return []
        ann = cls.model_fields[part].annotation
        args = [a for a in getattr(ann, "__args__", ()) if isinstance(a, type) and issubclass(a, BaseModel)]
        cls = args[0] if args else ann
    return list(cls.model_fields) if isinstance(cls, type) and issubclass(cls, BaseModel) else []


def _pydantic_error(loc: Located, model_cls, err: dict, prefix: tuple = ()) -> SpecError:
    # Union members add their type name to the location; keep only the parts that are real keys
    path = prefix + tuple(p for p in err["loc"] if isinstance(p, int) or not re.fullmatch(
        r"(str|int|float|bool|none|list\[.*\]|dict\[.*\]|function-.*)", str(p)))
    if err["type"] == "extra_forbidden":
        known = _known_keys(model_cls, tuple(err["loc"][:-1]))
        hint = f"; known keys here: {', '.join(known)}" if known else ""
        return _err(loc, path, f"unknown key {path[-1]!r}{hint}")
    got = err.get("input")
    return _err(loc, path, f"{err['msg']}, got {got!r}" if not isinstance(got, dict) else err["msg"])


def _validate(loc: Located) -> SweepFile:
    try:
        return SweepFile.model_validate(loc.data)
    except ValidationError as e:
        errs = sorted(e.errors(), key=lambda er: loc.line(tuple(er["loc"])) or 0)
        raise _pydantic_error(loc, SweepFile, errs[0]) from None


def _check_key(loc: Located, k, path: tuple, what: str) -> None:
    if not isinstance(k, str):
        raise _err(loc, path, f"{what} keys must be strings, got {k!r}")
    if k.startswith("method_config."):
        if not k.split(".", 1)[1]:
            raise _err(loc, path + (k,), f"not a usable {what} key")
        return
    if k not in TrialFields.model_fields or k == "method_config":
        keys = [x for x in TrialFields.model_fields if x != "method_config"] + ["method_config.<key>"]
        raise _err(loc, path + (k,), f"unknown {what} key {k!r}; known: {', '.join(keys)}")


def _check_partial(loc: Located, values: dict, path: tuple, what: str) -> None:
    """Check an include / exclude mapping: known trial keys with values of the right type."""
    plain = {}
    for k, v in values.items():
        _check_key(loc, k, path, what)
        if not k.startswith("method_config."):
            plain[k] = v
    try:
        TrialFields.model_validate(plain)
    except ValidationError as e:
        raise _pydantic_error(loc, TrialFields, e.errors()[0], path) from None


# ---------------------------------------------------------------- methods, models, schemes

def check_model(name: str) -> dict | None:
    """Raise ValueError for a model that cannot be found; return its config.json when it is at hand."""
    from quant import zoo
    from quant.files import read_json

    if name in zoo.ZOO:
        cfg = zoo.model_dir(name) / "config.json"
        return read_json(cfg, "model config") if cfg.exists() else None
    p = Path(name).expanduser()
    if p.is_dir():
        if not (p / "config.json").exists():
            raise ValueError(f"{name} is a folder without config.json: not a transformers checkpoint")
        return read_json(p / "config.json", "model config")
    if re.fullmatch(r"[\w.-]+/[\w.-]+", name) and not name.startswith((".", "/")):
        return None  # a hub id: checked when a worker loads it
    raise ValueError(f"unknown model {name!r}: not an embedded model ({', '.join(zoo.ZOO)}), "
                     "not a local transformers folder and not a hub id (owner/name)")


# ---------------------------------------------------------------- expansion

def _check_devices(loc: Located, spec: SweepFile, devices_file: str | None) -> None:
    """Every device target must resolve in the devices file the driver reads (docs/devices.md)."""
    from devicelab.inventory import InventoryError
    from devicelab.pool import PoolError

    from .devices import plan_jobs

    for i, d in enumerate(spec.devices):
        try:
            plan_jobs([d], devices_file)
        except (PoolError, InventoryError, ValueError) as e:
            raise _err(loc, ("devices", i), str(e)) from None


def _scheme_from_bitwidth(v) -> str:
    return f"w{v}a8" if isinstance(v, int) else str(v).lower()


def _expand(loc: Located, spec: SweepFile, name: str, text: str, max_trials: int | None,
            devices_file: str | None = None) -> Sweep:
    from quant import methods, numerics
    from quant.scheme import get_scheme

    try:
        register_plugins(spec.plugins.methods)
    except (ImportError, AttributeError, ValueError) as e:
        raise _err(loc, ("plugins", "methods"), f"cannot load plugin method: {e}") from None

    if spec.devices:
        _check_devices(loc, spec, devices_file)
    if spec.eval.suite:
        h = harness_module()
        if h is None:
            raise _err(loc, ("eval", "suite"), "an lm-eval suite was requested but quant.eval.harness is "
                       "not available in this installation")
        try:
            h.resolve_suite(list(spec.eval.suite))
        except ValueError as e:
            bad = 0
            for i, task in enumerate(spec.eval.suite):
                try:
                    h.resolve_suite([task])
                except ValueError:
                    bad = i
                    break
            raise _err(loc, ("eval", "suite", bad), str(e)) from None
    if spec.eval.perplexity is None and not spec.eval.suite:
        raise _err(loc, ("eval",), "nothing to evaluate: give eval.perplexity or eval.suite")

    for mname, hp in spec.methods.items():
        if mname not in methods.METHODS:
            raise _err(loc, ("methods", mname), f"unknown method {mname!r}; available: {', '.join(methods.METHODS)}")
        keys = method_keys(mname)
        for k in hp:
            if k not in keys:
                raise _err(loc, ("methods", mname, k), f"method {mname!r} has no hyper-parameter {k!r}; "
                           f"known: {', '.join(sorted(keys))}")

    # grid axes
    if not spec.grid and not spec.include:
        raise _err(loc, ("grid",) if "grid" in loc.data else (), "the grid is empty: give at least one axis "
                   "under grid: (or a trial under include:)")
    axes = []
    for key, values in spec.grid.items():
        _check_key(loc, key, ("grid",), "grid")
        if not values:
            raise _err(loc, ("grid", key), "empty axis: give at least one value")
        if not key.startswith("method_config."):
            for i, v in enumerate(values):
                try:
                    TrialFields.model_validate({key: v})
                except ValidationError as e:
                    raise _pydantic_error(loc, TrialFields, {**e.errors()[0], "loc": (i,)}, ("grid", key)) from None
        axes.append((key, values))
    for j, inc in enumerate(spec.include):
        _check_partial(loc, inc, ("include", j), "include")
    for j, exc in enumerate(spec.exclude):
        _check_partial(loc, exc, ("exclude", j), "exclude")
        for k in exc:
            if k not in spec.grid:
                raise _err(loc, ("exclude", j, k), f"exclude key {k!r} is not a grid axis")

    combos: list[tuple[dict, dict, tuple]] = []  # (values, provenance, origin)
    for pick in itertools.product(*[list(enumerate(vals)) for _, vals in axes]) if axes else []:
        vals = {k: v for (k, _), (_, v) in zip(axes, pick)}
        if any(all(vals.get(k) == v for k, v in exc.items()) for exc in spec.exclude):
            continue
        prov = {k: ("grid", k, i) for (k, _), (i, _) in zip(axes, pick)}
        combos.append((vals, prov, ("grid",)))
    for j, inc in enumerate(spec.include):
        combos.append((dict(inc), {k: ("include", j, k) for k in inc}, ("include", j)))
    if not combos:
        raise _err(loc, ("exclude",), "the grid is empty after exclude: no trial is left")
    roles = baseline_roles(spec)
    if roles:  # per model of the grid, its speed references: ordinary trials, added last
        where = ("baselines",) if "baselines" in loc.data else ("devices",)
        models = []
        for vals, _, _ in combos:
            m = (vals.get("model", spec.base.model), vals.get("layers", spec.base.layers))
            if m not in models:
                models.append(m)
        for model, layers in models:
            for role in roles:
                extra = {"scheme": "fp"} if role == "fp" else {"scheme": "w8a16", "method": "rtn"}
                vals = {"model": model, "layers": layers, **extra}
                combos.append((vals, {k: where for k in vals}, ("baselines", role)))

    base_set = spec.base.model_fields_set
    base_prov = {k: ("base", k) for k in TrialFields.model_fields}
    base_vals = spec.base.model_dump()
    mc_used: dict[str, tuple] = {}  # method_config key given outside methods: -> first place
    mc_known: set[str] = set()
    trials: dict[str, Trial] = {}
    baselines: dict[str, str] = {}
    duplicates = 0
    max_seq_cache: dict = {}
    for vals, prov, origin in combos:
        f = dict(base_vals)
        p = dict(base_prov)
        # hyper-parameters: base < methods.<name> < grid/include (the more specific place wins)
        mc_base = {k: (v, ("base", "method_config", k)) for k, v in spec.base.method_config.items()}
        for k in HYPER_SHORTHANDS:
            if k in base_set and base_vals[k] is not None:
                mc_base[k] = (base_vals[k], ("base", k))
        mc_combo = {}
        for k, v in vals.items():
            if k.startswith("method_config."):
                mc_combo[k.split(".", 1)[1]] = (v, prov[k])
            elif k in HYPER_SHORTHANDS:
                mc_combo[k] = (v, prov[k])
            else:
                f[k], p[k] = v, prov[k]
        mc_over = {**mc_base, **mc_combo}
        for k, (_, where) in mc_over.items():
            mc_used.setdefault(k, where)
        if f["bitwidth"] is not None:
            f["scheme"], p["scheme"] = _scheme_from_bitwidth(f["bitwidth"]), p["bitwidth"]
        try:
            scheme = get_scheme(str(f["scheme"]).lower())
        except ValueError as e:
            raise _err(loc, p["scheme"], str(e)) from None
        try:
            model_cfg = max_seq_cache[f["model"]] if f["model"] in max_seq_cache else check_model(f["model"])
            max_seq_cache[f["model"]] = model_cfg
        except ValueError as e:
            raise _err(loc, p["model"], str(e)) from None
        if model_cfg:
            total = model_cfg.get("num_hidden_layers") or model_cfg.get("text_config", {}).get("num_hidden_layers")
            if total and f["layers"] is not None and f["layers"] > total:
                raise _err(loc, p["layers"], f"{f['model']} has {total} layers, got layers: {f['layers']}")
            ctx = model_cfg.get("max_position_embeddings")
            if ctx and f["seqlen"] > ctx:
                raise _err(loc, p["seqlen"], f"seqlen {f['seqlen']} is above the context of {f['model']} ({ctx})")

        ppl = spec.eval.perplexity
        eval_cfg = {"perplexity": None if ppl is None else {
            "corpus": ppl.corpus, "seqlen": ppl.seqlen or f["seqlen"], "limit": ppl.limit,
            "batch_size": ppl.batch_size, **({} if f["split"] == "test" else {"split": f["split"]})},
            "suite": list(spec.eval.suite), "suite_limit": spec.eval.suite_limit}
        # the numerics version is part of the id: a result of older arithmetic is never a cache hit
        config = {"model": f["model"], "layers": f["layers"], "scheme": scheme.name, "eval": eval_cfg,
                  "numerics": numerics.NUMERICS_VERSION}
        if scheme.is_float:
            config.update(method=FLOAT_METHOD, method_config={}, calib=None, plugin=None)
        else:
            mname = f["method"]
            if mname not in methods.METHODS:
                raise _err(loc, p["method"], f"unknown method {mname!r}; available: {', '.join(methods.METHODS)}")
            keys = method_keys(mname)
            over = {k: v for k, (v, _) in mc_base.items() if k in keys}
            over.update(spec.methods.get(mname, {}))
            over.update({k: v for k, (v, _) in mc_combo.items() if k in keys})
            mc_known |= set(over)
            try:
                mcfg = config_dict(build_method_config(mname, over))
            except (ValueError, TypeError) as e:
                bad = [k for k in over if re.search(rf"\b{re.escape(k)}\b", str(e))]
                where = p["method"]
                if bad:
                    k = bad[0]
                    where = (mc_combo[k][1] if k in mc_combo else ("methods", mname, k)
                             if k in spec.methods.get(mname, {}) else mc_base[k][1])
                raise _err(loc, where, str(e)) from None
            config.update(method=mname, method_config=mcfg, plugin=spec.plugins.methods.get(mname),
                          calib={"samples": f["samples"], "seqlen": f["seqlen"], "seed": f["seed"],
                                 "corpus": f["calib_corpus"]})
            if f["rotate"] != "none":  # absent when off: the ids of unrotated trials stay what they were
                config["rotate"] = {"kind": f["rotate"], "seed": f["rotate_seed"]}
        tid = config_hash(config)
        if origin[0] == "baselines":
            baselines.setdefault(tid, origin[1])
        if tid in trials:
            duplicates += origin[0] != "baselines"  # a baseline the grid already has is not a duplicate
            continue
        trials[tid] = Trial(tid, config, {k: v for k, v in vals.items()}, origin)

    for k, where in mc_used.items():
        if k not in mc_known and any(t.config["method"] != FLOAT_METHOD for t in trials.values()):
            used = sorted({t.config["method"] for t in trials.values() if t.config["method"] != FLOAT_METHOD})
            raise _err(loc, where, f"hyper-parameter {k!r} is not known to any method of this sweep ({', '.join(used)})")

    out = list(trials.values())
    if max_trials is not None and len(out) > max_trials:
        raise _err(loc, ("grid",) if "grid" in loc.data else ("include",),
                   f"the grid expands to {len(out)} trials, more than {max_trials}; pass --yes to run it")
    sweep = Sweep(name, loc.file, spec, out, text, duplicates, baselines=baselines)
    sweep.varying = varying_keys(out)
    return sweep


def baseline_roles(spec: SweepFile) -> list[str]:
    """The device baselines a sweep measures beside its quantized trials (see ``SweepFile.baselines``)."""
    if spec.baselines is not None:
        return list(dict.fromkeys(spec.baselines))
    return ["fp", "w8a16"] if spec.devices else []


def varying_keys(trials: list[Trial]) -> list[str]:
    """Flattened config keys whose value differs between trials (the columns worth showing). Float trials
    have no method or calibration, so those keys are compared among the quantized trials only."""
    def row(t):
        r = flatten({k: v for k, v in t.config.items() if k not in ("eval", "plugin") and v not in (None, {})})
        if (t.config.get("eval") or {}).get("perplexity"):  # the split is the one eval setting a grid varies
            r["split"] = t.config["eval"]["perplexity"].get("split", "test")
        return r

    quantized = [row(t) for t in trials if t.config["method"] != FLOAT_METHOD]
    everything = [row(t) for t in trials]
    keys: list[str] = []
    for r in everything:
        keys += [k for k in r if k not in keys]

    def varies(rows, k):  # a key some rows lack (rotate: off) differs from a present one
        return len({json.dumps(r.get(k), sort_keys=True, default=str) for r in rows}) > 1

    def varies_within_a_method(k):  # methods differ in their defaults: only a grid over a value counts
        by_method: dict = {}
        for t, r in zip([t for t in trials if t.config["method"] != FLOAT_METHOD], quantized):
            by_method.setdefault(t.config["method"], []).append(r)
        return any(varies(rows, k) for rows in by_method.values())

    return [k for k in keys if (varies(everything, k) if k in ("model", "layers", "scheme", "method", "split")
                                else varies_within_a_method(k) if k.startswith("method_config.")
                                else varies(quantized, k))]
