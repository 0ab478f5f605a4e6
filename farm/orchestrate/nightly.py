"""`farm nightly`: the nightly device-lab regression run (the subcommand: farm/cli/nightly_cmd.py).

    farm nightly [sweeps/nightly.yaml] [--accept] [--baseline ALIAS] [--device NAME|KIND] [--pairs N]
                 [--threshold 0.05] [--ppl-tolerance 0.01] [--devices FILE] [--data DIR] [--tracking-uri URI]

A night is: run the suite (a sweep file with a ``devices:`` section) through the sweep machinery, so an
unchanged night is all cache hits; then compare every trial of the suite with the same trial of the
baseline night:

* latency: the baseline's and the candidate's export measured on ONE device in one session, interleaved
  A/B/A/B (``Pool.compare``, one timed run per variant per round), decided by ``farm.orchestrate.regression``;
* accuracy: each perplexity against a relative tolerance;
* the deployed arithmetic (where onnxruntime-qnn is installed, or ``htp_check=True``): the suite's small
  W8A8 RTN trial exported under the device table, compiled for SM8650 and run on the QNN HTP emulator
  against onnxruntime's CPU (:func:`htp_agreement`); an absolute bar, not a comparison with the baseline:
  every quantized tensor at ``HTP_SQNR_BAR`` dB or more and the logits' top-1 at ``HTP_TOP1_BAR`` or more.

Trials are matched by their *slot*, ``<model>.L<layers>.<scheme>.<method>`` (the scheme without role
overrides): what a nightly watches is "SmolLM2 W8A8 RTN", whatever hyper-parameters, calibration or code
produced it tonight.

Where it lives in MLflow (the tracking store of ``--data`` or ``--tracking-uri``):

* the suite's trials: the sweep's experiment, as for ``farm sweep``;
* each night: one run of the experiment ``<suite>.nightly`` (tag ``farm_role=night``) with the candidate's
  metrics as ``<slot>/<metric>``, the A/B median ratios as ``<slot>/ab/<device>/<graph>_ratio`` (+ ``_ci_low``,
  ``_ci_high``), tags ``nightly.verdict`` (baseline | pass | regression | error) and ``nightly.baseline_run``,
  and the artifact ``night.json`` (every trial's run id, metrics, export folders and every verdict);
* the baseline: registered model ``nightly.<suite>``; each accepted night is a version of it whose run is
  the night run, and the alias (``--baseline``, default ``baseline``) points at the last accepted night.
  ``--accept`` moves the alias to tonight; the first night, with no alias yet, takes it and says so.

An accepted night's exports are pinned under ``<data>/nightly/<suite>/baselines/<night run>/`` (hard links
where the file system allows), so ``farm gc`` of the stage cache never takes the baseline away.

Exit status: 0 pass (or a baseline was set), 1 regression, 2 could not run (bad input, no available
device, a failed trial or device stage, a baseline export gone). Reports: ``night.md``/``night.html`` for
the night and ``history.md``/``history.html`` across nights (reports.nightly), under
``<data>/reports/<suite>.nightly/`` unless ``--out``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

from ..core.layout import DataLayout
from . import regression

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one small night.json per night

DEFAULT_SUITE = "sweeps/nightly.yaml"
DEFAULT_ALIAS = "baseline"
DEFAULT_PAIRS = 128  # A/B pairs per graph: 96% of 10% slowdowns caught on this loaded machine (docs/nightly.md)
EXIT_PASS, EXIT_REGRESSION, EXIT_ERROR = 0, 1, 2


class NightlyError(ValueError):
    """The night could not run (exit 2); the message names the suite, trial, device or file at fault."""


# ---------------------------------------------------------------- names

def slot_of(config: dict) -> str:
    """``smollm2-135m.L1.w8a8.rtn``: the suite's row a trial stands for, stable across nights."""
    layers = config.get("layers")
    scheme = str(config["scheme"]).split(":", 1)[0]
    return f"{Path(str(config['model'])).name}.L{layers if layers else 'all'}.{scheme}.{config['method']}"


def registered_name(suite: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", f"nightly.{suite}")


def night_experiment(suite: str) -> str:
    return f"{suite}.nightly"


# ---------------------------------------------------------------- the night

def run_nightly(suite_file: str, opts, *, accept: bool = False, alias: str = DEFAULT_ALIAS,
                device: str | None = None, pairs: int = DEFAULT_PAIRS,
                threshold: float = regression.DEFAULT_THRESHOLD,
                ppl_tolerance: float = regression.DEFAULT_PPL_TOLERANCE, devices_file: str | None = None,
                out_dir: str | None = None, pool_factory=None, out=None, htp_check: bool | None = None) -> int:
    """One night; returns the exit status. ``pool_factory(inventory)`` builds the pool of the A/B runs
    (tests; default ``devicelab.pool.Pool``). Progress and the verdicts go to ``out`` (stderr).
    ``htp_check``: the HTP-agreement bar (:func:`htp_checks`); None: where onnxruntime-qnn is installed."""
    out = out or sys.stderr
    try:
        _check_args(pairs, threshold, ppl_tolerance, alias)
        # the devices file goes to every reader as an argument (the suite's check, the sweep's device
        # stages, the A/B pool), never through the process environment
        devices_file = devices_file or opts.devices_file
        if devices_file:
            if not Path(devices_file).exists():
                raise NightlyError(f"--devices: {devices_file} does not exist")
            opts = replace(opts, devices_file=str(Path(devices_file).resolve()))
        sweep = _load_suite(suite_file, device, opts.devices_file)
        pool = _pool(pool_factory, opts.devices_file)
        _check_available(pool, sweep)
    except NightlyError as e:
        print(f"farm nightly: could not run: {e}", file=out)
        return EXIT_ERROR
    night = Night(sweep, opts, out)
    try:
        night.run_suite()
        night.open_run()
        night.check_htp(htp_check)
        baseline = night.baseline(alias)
        if baseline is None:
            night.state.to("baseline")
            night.accept(alias)
            print(f"farm nightly: no baseline yet (alias {alias!r} of registered model {night.model_name}): "
                  f"tonight's night run {night.run_id} is now the baseline", file=out)
        else:
            night.compare(baseline, pool, pairs, threshold, ppl_tolerance)
            if accept:
                night.accept(alias)
                print(f"farm nightly: --accept: alias {alias!r} now points at night run {night.run_id} "
                      f"(was {baseline['run_id']})", file=out)
        status = EXIT_REGRESSION if night.verdict == "regression" else EXIT_PASS
    except NightlyError as e:
        night.fail(str(e))
        print(f"farm nightly: could not run: {e}", file=out)
        status = EXIT_ERROR
    except KeyboardInterrupt:  # the night run must not stay RUNNING; the suite's trials are kept
        if night.run_id:
            night.runs.kill(night.run_id, "interrupted")
        raise
    night.close()
    night.write_reports(out_dir)
    night.print_summary()
    return status


def _check_args(pairs: int, threshold: float, ppl_tolerance: float, alias: str) -> None:
    if pairs < 2:
        raise NightlyError(f"--pairs must be at least 2 (a confidence interval needs pairs), got {pairs}")
    if not 0 <= threshold < 1:
        raise NightlyError(f"--threshold is a fraction in [0, 1) (0.05 = 5%), got {threshold}")
    if not 0 <= ppl_tolerance < 1:
        raise NightlyError(f"--ppl-tolerance is a fraction in [0, 1) (0.01 = 1%), got {ppl_tolerance}")
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", alias) or re.fullmatch(r"[vV]\d+", alias):
        raise NightlyError(f"--baseline {alias!r} is not an MLflow alias (letters, digits, _ and -, not v<N>)")


def _load_suite(suite_file: str, device: str | None, devices_file: str | None = None):
    from devicelab.inventory import InventoryError
    from devicelab.pool import PoolError

    from ..plan.spec import SpecError, load_sweep

    if not Path(suite_file).exists():
        raise NightlyError(f"suite file {suite_file} does not exist")
    try:
        # a night compares each slot with the same slot of the baseline night: no extra baseline trials
        sweep = load_sweep(suite_file, devices_file=devices_file, baselines_default=[])
    except (SpecError, InventoryError, PoolError) as e:
        raise NightlyError(str(e)) from None
    if device:
        if not sweep.spec.devices:
            from ..plan.spec import DeviceSpec

            sweep.spec.devices = [DeviceSpec(device=device)]
        else:
            sweep.spec.devices = [d.model_copy(update={"device": device}) for d in sweep.spec.devices]
    if not sweep.spec.devices:
        raise NightlyError(f"{suite_file} has no devices: section and no --device was given: a nightly measures "
                           "latency on a device (docs/nightly.md)")
    labels = [d.device for d in sweep.spec.devices]
    if len(set(labels)) != len(labels):
        raise NightlyError(f"{suite_file}: devices: names {', '.join(labels)}; each device once")
    seen: dict = {}
    for t in sweep.trials:
        s = slot_of(t.config)
        if s in seen:
            raise NightlyError(f"{suite_file}: trials {seen[s][:8]} and {t.id[:8]} are both slot {s}; a nightly "
                               "compares one trial per model, layers, scheme and method")
        seen[s] = t.id
    return sweep


def _pool(pool_factory, devices_file: str | None = None):
    from devicelab import inventory
    from devicelab.inventory import InventoryError
    from devicelab.pool import Pool

    try:
        inv = inventory.load(devices_file)
    except InventoryError as e:
        raise NightlyError(str(e)) from None
    return (pool_factory or Pool)(inv)


def _check_available(pool, sweep) -> None:
    """Every device target has an online device now: before an hour of quantizing, not after."""
    from devicelab.pool import PoolError

    for d in sweep.spec.devices:
        try:
            pool.available(d.device)
        except PoolError as e:
            raise NightlyError(f"{e}") from None


class NightState:
    """A night's verdict, moved only forward: pending -> baseline | pass | regression, and any of them ->
    error when a later step fails; error is final. A transition outside these is a bug and raises."""

    FLOW = {"pending": ("baseline", "pass", "regression", "error"), "baseline": ("error",), "pass": ("error",),
            "regression": ("error",), "error": ()}

    def __init__(self):
        self.value = "pending"

    @property
    def final(self) -> bool:
        return self.value != "pending"

    def to(self, new: str) -> None:
        if new not in self.FLOW[self.value]:
            raise RuntimeError(f"a night's verdict cannot go from {self.value} to {new}")
        self.value = new


class Night:
    """Tonight: the suite's outcome, its night run in MLflow, the verdicts."""

    def __init__(self, sweep, opts, out):
        from .tracking import NightRuns

        self.sweep, self.opts, self.out = sweep, opts, out
        self.data = Path(opts.data_dir)
        self.uri = opts.uri
        self.layout = DataLayout(self.data)
        self.runs = NightRuns(self.uri, self.layout.artifacts)  # every write to MLflow goes through it
        self.model_name = registered_name(sweep.name)
        self.run_id = ""
        self.slots: dict = {}  # slot -> {"trial_id", "run_id", "config", "metrics", "devices": {label: ...}}
        self.verdicts: list[regression.Verdict] = []
        self.state = NightState()
        self.error = ""
        self.baseline_info: dict | None = None
        self.accepted = False
        self.started = time.time()
        self.reports: dict = {}

    @property
    def verdict(self) -> str:
        return self.state.value

    def fail(self, why: str) -> None:
        self.error = why
        self.state.to("error")

    def note(self, msg: str) -> None:
        print(f"nightly {self.sweep.name}: {msg}", file=self.out, flush=True)

    # ------------------------------------------------------------ the suite
    def run_suite(self) -> None:
        from .sweep import run_sweep
        from .tracking import Tracker

        self.note(f"running the suite {self.sweep.file} ({len(self.sweep.trials)} trials; cached stages are reused)")
        try:
            outcome = run_sweep(self.sweep, replace(self.opts, out=self.out))
        except (KeyboardInterrupt, NightlyError):
            raise
        except Exception as e:  # Ray lost a worker or an actor for good, the store refused: not a verdict
            self.open_run()
            msg = str(e).strip().splitlines()
            raise NightlyError(f"the suite stopped: {type(e).__name__}: {msg[0] if msg else ''} (finished trials "
                               "are kept; run the night again to resume)") from e
        if outcome.interrupted:
            raise KeyboardInterrupt
        problems = [f"trial {tid[:8]} failed: {err}" for tid, err in outcome.failed.items()]
        problems += [f"trial {key[:8]} on device {key.split('/', 1)[1]}: {err}"
                     for key, err in outcome.device_failed.items()]
        finished = Tracker(self.uri, self.sweep.name).finished_trials()
        for t in self.sweep.trials:
            res = outcome.results.get(t.id)
            if res is None:
                continue
            self.slots[slot_of(t.config)] = {"trial_id": t.id, "run_id": finished.get(t.id, ""), "config": t.config,
                                             "metrics": _accuracy_metrics(res),
                                             "artifact_dir": str(res.get("artifact_dir") or ""),
                                             "devices": self._devices_of(res)}
        if problems:
            self.open_run()
            raise NightlyError("the suite did not finish: " + "; ".join(problems))

    def _devices_of(self, result: dict) -> dict:
        out = {}
        for d in self.sweep.spec.devices:
            from ..plan.devices import label

            summary = (result.get("devices") or {}).get(label(d.device))
            if not summary or not summary.get("ok") or not result.get("artifact_dir"):
                continue
            medians = {}
            for rec in summary.get("records", []):
                g = rec["workload"]["graph"]
                medians[f"{g}_ms" if g == "prefill" else "decode_ms_per_tok"] = rec["median_ms"]
            out[label(d.device)] = {"target": d.device, "device": summary.get("device", ""),
                                    "export": str(self._model_folder(summary)),
                                    "content_hash": (summary.get("records") or [{}])[0].get("model_id", ""),
                                    "latency_meaningful": all(r.get("latency_meaningful", True)
                                                              for r in summary.get("records", [])),
                                    **medians}
        return out

    def _model_folder(self, summary: dict) -> Path:
        """The folder the bench measured: the compiled one for phones, else the export (stage cache)."""
        stages = summary.get("stages", {})
        if "compile" in stages:
            return self.layout.stage_entry("compile", stages["compile"]["key"]) / "export"
        entry = self.layout.stage_entry("export", stages["export"]["key"])
        meta = json.loads((entry / "meta.json").read_text())
        return entry / meta["summary"]["folder"]

    # ------------------------------------------------------------ the deployed arithmetic
    def check_htp(self, enabled: bool | None) -> None:
        if enabled is None:
            enabled = htp_available()
            if not enabled:
                self.note("HTP agreement not checked: onnxruntime-qnn is not installed here "
                          "(pip install 'mobilequant-farm[device]')")
                return
        if enabled:
            for v in htp_checks(self.slots, self.note):
                self._add(v)

    # ------------------------------------------------------------ MLflow
    def open_run(self) -> None:
        if self.run_id:
            return
        name = night_experiment(self.sweep.name)
        stamp = time.strftime("%Y-%m-%d %H:%M", time.gmtime(self.started))
        self.run_id = self.runs.open(name, f"night {stamp}", {"sweep": self.sweep.name, "suite_file": str(self.sweep.file),
                                                              "suite_hash": self.sweep.hash})
        self.note(f"night run {self.run_id} in MLflow experiment {name!r} ({self.uri})")

    def baseline(self, alias: str) -> dict | None:
        """The night record (night.json) the alias points at, or None when there is no such alias yet."""
        mv = self.runs.version_of(self.model_name, alias)
        if mv is None:
            return None
        try:
            record = json.loads(self.runs.read_text(mv.run_id, "night.json"))
        except (LookupError, ValueError) as e:
            raise NightlyError(f"baseline night run {mv.run_id} (alias {alias!r}, version {mv.version} of "
                               f"{self.model_name}) has no readable night.json: {e}") from None
        self.baseline_info = {"run_id": mv.run_id, "version": mv.version, "alias": alias}
        self.runs.set_tags(self.run_id, {"nightly.baseline_run": mv.run_id, "nightly.baseline_version": mv.version})
        return record

    def accept(self, alias: str) -> None:
        """Pin tonight's exports, register tonight as a version of the nightly model, point the alias at it."""
        pin_root = self.layout.baselines(self.sweep.name, self.run_id)
        for slot, entry in self.slots.items():
            for lbl, dev in entry["devices"].items():
                dst = pin_root / slot / lbl
                _pin(Path(dev["export"]), dst)
                dev["pinned"] = str(dst)
        version = self.runs.register(self.model_name, self.run_id, "night.json", alias,
                                     model_tags={"sweep": self.sweep.name}, version_tags={"pinned": str(pin_root)},
                                     description=f"accepted nights of the nightly suite {self.sweep.name}")
        self.runs.set_tags(self.run_id, {"nightly.accepted": "true", "nightly.accepted_version": version})
        self.accepted = True

    # ------------------------------------------------------------ comparing
    def compare(self, baseline: dict, pool, pairs: int, threshold: float, ppl_tolerance: float) -> None:
        base_slots = baseline.get("slots", {})
        missing = sorted(set(self.slots) - set(base_slots))
        if missing:
            self.note(f"new in the suite, no baseline to compare with (accept a night to start): {', '.join(missing)}")
        for slot, cand in self.slots.items():
            base = base_slots.get(slot)
            if base is None:
                continue
            for metric, value in sorted(cand["metrics"].items()):
                if metric not in base["metrics"]:
                    continue
                d = regression.accuracy_decision(base["metrics"][metric], value, ppl_tolerance)
                self._add(regression.Verdict(slot, metric, "accuracy", base["metrics"][metric], value, d["change"],
                                             ppl_tolerance, d["regression"], baseline_run=base["run_id"],
                                             candidate_run=cand["run_id"]))
            for lbl, dev in cand["devices"].items():
                bdev = base["devices"].get(lbl)
                if bdev is None or not dev.get("latency_meaningful", True):
                    continue  # an emulator (qnn-sim) checks outputs: its times are not latency
                self._ab(slot, lbl, dev, bdev, base["run_id"], cand["run_id"], pool, pairs, threshold)
        self.state.to("regression" if any(v.regression for v in self.verdicts) else "pass")

    def _ab(self, slot, lbl, dev, bdev, base_run, cand_run, pool, pairs, threshold) -> None:
        from devicelab.protocol import DeviceError, Workload

        base_folder = Path(bdev.get("pinned") or bdev["export"])
        if not base_folder.exists():
            raise NightlyError(f"the baseline export of {slot} on {lbl} is gone ({base_folder}); accept a new "
                               "baseline with --accept")
        spec = next(d for d in self.sweep.spec.devices if d.device == dev["target"])
        for graph in spec.graphs:
            w = Workload(graph=graph, warmup=spec.warmup, repeats=pairs, tokens=spec.tokens,
                         allow_charging=spec.allow_charging)
            self.note(f"A/B {slot} on {dev['target']}: {graph}, {pairs} interleaved pairs")
            try:
                recs = pool.compare({"baseline": base_folder, "candidate": Path(dev["export"])}, dev["target"], w,
                                    rounds=pairs)
            except DeviceError as e:
                raise NightlyError(f"A/B of {slot} on {dev['target']}: {e}") from None
            b, c = recs["baseline"], recs["candidate"]
            d = regression.latency_decision(b.samples_ms, c.samples_ms, threshold)
            metric = f"device/{lbl}/{'prefill_ms' if graph == 'prefill' else 'decode_ms_per_tok'}"
            self._add(regression.Verdict(slot, metric, "latency", b.median_ms, c.median_ms, d["ratio"] - 1.0,
                                         threshold, d["regression"], ci_low=d["ci_low"] - 1.0,
                                         ci_high=d["ci_high"] - 1.0, level=regression.DEFAULT_LEVEL,
                                         pairs=d["pairs"], device=b.device.name, baseline_run=base_run,
                                         candidate_run=cand_run))

    def _add(self, v: regression.Verdict) -> None:
        self.verdicts.append(v)
        if v.regression or v.kind == "latency":
            self.note(v.sentence())

    # ------------------------------------------------------------ closing
    def close(self) -> None:
        if not self.state.final:
            raise RuntimeError(f"night {self.run_id or '(not opened)'} closed without a verdict")
        self.open_run()
        metrics = {}
        for slot, entry in self.slots.items():
            for k, v in entry["metrics"].items():
                metrics[f"{slot}/{k}"] = v
            for k in ("top1", "worst_sqnr_db"):
                if (entry.get("htp") or {}).get(k) is not None:
                    metrics[f"{slot}/htp/{k}"] = entry["htp"][k]
            for lbl, dev in entry["devices"].items():
                for k in ("prefill_ms", "decode_ms_per_tok"):
                    if dev.get(k) is not None:
                        metrics[f"{slot}/device/{lbl}/{k}"] = dev[k]
        for v in self.verdicts:
            if v.kind == "latency":
                graph = "prefill" if v.metric.endswith("/prefill_ms") else "decode"
                key = f"{v.slot}/ab/{v.metric.split('/')[1]}/{graph}_ratio"
                metrics.update({key: v.change + 1.0, f"{key}_ci_low": v.ci_low + 1.0,
                                f"{key}_ci_high": v.ci_high + 1.0})
        metrics["regressions"] = sum(v.regression for v in self.verdicts)
        metrics["wall_s"] = time.time() - self.started
        tags = {"nightly.verdict": self.verdict}
        if self.error:
            tags["nightly.error"] = self.error
        record = {"suite": self.sweep.name, "suite_file": str(self.sweep.file), "run_id": self.run_id,
                  "started_at": self.started, "verdict": self.verdict, "error": self.error,
                  "baseline": self.baseline_info, "accepted": self.accepted, "slots": self.slots,
                  "verdicts": [v.to_dict() for v in self.verdicts]}
        self.runs.close(self.run_id, metrics, tags, "night.json", json.dumps(record, indent=1, sort_keys=True, default=str),
                        failed=self.verdict == "error")

    def write_reports(self, out_dir: str | None) -> None:
        from reports.nightly import history_report, night_report

        root = Path(out_dir) if out_dir else self.layout.reports(night_experiment(self.sweep.name))
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(self.started))
        try:
            self.reports["night"] = night_report(self.run_id, self.uri, root / f"night-{stamp}-{self.run_id[:8]}")
            self.reports["history"] = history_report(self.sweep.name, self.uri, root)
        except Exception as e:  # a report is a view: the verdict and the MLflow record stand without it
            self.note(f"report not written ({type(e).__name__}: {e})")

    def print_summary(self) -> None:
        bad = [v for v in self.verdicts if v.regression]
        word = {"baseline": "BASELINE SET", "pass": "PASS", "regression": "REGRESSION",
                "error": "COULD NOT RUN"}[self.verdict]
        print(f"nightly {self.sweep.name}: {word}: {len(self.verdicts)} metric(s) compared, {len(bad)} regression(s)"
              f"; night run {self.run_id}")
        for v in bad:
            print("  " + v.sentence())
        if self.error:
            print(f"  {self.error}")
        for what, paths in self.reports.items():
            print(f"  {what} report: {paths[1]}")


# ---------------------------------------------------------------- the HTP agreement bar

HTP_TOP1_BAR = 0.95  # logits' top-1, HTP emulator vs onnxruntime's CPU
HTP_SQNR_BAR = 10.0  # dB, every quantized tensor (the bar of ExecuTorch's Qualcomm debugger)
HTP_MAX_LAYERS = 3  # deeper, a quantized model's top-1 between two runtimes that are not bit-exact falls
#                     whatever the runtime (docs/deploy.md: SmolLM2's simulation in float32 vs float64)
HTP_PREFILL, HTP_WINDOWS = 64, 1


def htp_available() -> bool:
    try:
        import onnxruntime_qnn  # noqa: F401
    except ImportError:
        return False
    return True


def htp_slot(config: dict) -> bool:
    """The suite's trials the bar applies to: W8A8 (any overrides) with RTN, at most HTP_MAX_LAYERS layers."""
    layers = config.get("layers")
    return (str(config.get("scheme", "")).split(":", 1)[0] == "w8a8" and config.get("method") == "rtn"
            and bool(layers) and int(layers) <= HTP_MAX_LAYERS)


def htp_agreement(artifact_dir: str | Path, prefill: int = HTP_PREFILL, windows: int = HTP_WINDOWS) -> dict:
    """The artifact exported under the device table (what the phone runs), compiled for SM8650 (the HTP
    must take every node), and every quantized tensor of its prefill graph on the HTP emulator against
    onnxruntime's CPU on ``windows`` evaluation windows: top-1, the worst SQNR, the first tensor below
    HTP_SQNR_BAR. The export lives in a temporary folder: a 2-layer one is seconds to rebuild."""
    import tempfile

    from devicelab.compile import compile_export
    from devicelab.divergence import htp_vs_cpu
    from devicelab.exported import read_export
    from quant.export import export_artifact

    from ..work.measure import eval_windows

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mqfarm-htp-") as tmp:
        folder = export_artifact(artifact_dir, Path(tmp) / "export", prefill=prefill, ctx=2 * prefill,
                                 device_table=True, progress=False)
        compile_export(folder, "sm8650", graphs=("prefill",), progress=False)
        exp = read_export(folder)
        s = htp_vs_cpu(exp, eval_windows(exp, windows), HTP_SQNR_BAR)
    first = s["first_below"]
    return {"scheme": exp.index.get("scheme"), "prefill": prefill, "windows": windows, "top1": s["top1"],
            "worst_sqnr_db": s["worst_sqnr_db"], "first_below": first["tensor"] if first else None,
            "tensors": len(s["tensors"]), "seconds": round(time.perf_counter() - t0, 1)}


def htp_verdicts(slot: str, res: dict, run_id: str = "") -> list[regression.Verdict]:
    """The bar as verdicts: ``baseline`` is the bar itself, ``change`` the candidate's distance to it."""
    out = []
    for metric, bar in (("htp/top1", HTP_TOP1_BAR), ("htp/worst_sqnr_db", HTP_SQNR_BAR)):
        value = float(res[metric.split("/", 1)[1]])
        out.append(regression.Verdict(slot, metric, "accuracy", bar, value, value / bar - 1.0, 0.0,
                                      not value >= bar, candidate_run=run_id))
    return out


def htp_checks(slots: dict, note, runner=htp_agreement) -> list[regression.Verdict]:
    """The bar on every slot :func:`htp_slot` picks; each slot's result is kept as ``slots[slot]["htp"]``."""
    verdicts = []
    for slot, entry in slots.items():
        if not htp_slot(entry["config"]):
            continue
        if not entry.get("artifact_dir"):
            raise NightlyError(f"HTP agreement of {slot}: the trial left no artifact folder")
        try:
            res = runner(entry["artifact_dir"])
        except Exception as e:  # a graph the HTP refuses, a broken emulator: the night could not check it
            raise NightlyError(f"HTP agreement of {slot} ({entry['artifact_dir']}): {type(e).__name__}: {e}") from e
        entry["htp"] = res
        where = f"first below {HTP_SQNR_BAR:g} dB: {res['first_below']}" if res["first_below"] else "none below"
        note(f"HTP agreement {slot} ({res['scheme']}, {res['windows']} x {res['prefill']} tokens, {res['seconds']} s): "
             f"top-1 {res['top1']:.3f} (bar {HTP_TOP1_BAR}), worst {res['worst_sqnr_db']:.1f} dB; {where}")
        verdicts += htp_verdicts(slot, res, entry.get("run_id", ""))
    return verdicts


def _accuracy_metrics(result: dict) -> dict:
    return {k: float(v) for k, v in (result.get("metrics") or {}).items()
            if k.startswith("ppl/") and isinstance(v, (int, float))}


def _pin(src: Path, dst: Path) -> None:
    """A copy of folder ``src`` at ``dst`` made of hard links (a plain copy across file systems); symlinks
    inside (a compiled folder links its export's files) are followed."""
    def link(s, d):
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)

    if dst.exists():
        return
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(src, tmp, symlinks=False, copy_function=link)
    tmp.rename(dst)
