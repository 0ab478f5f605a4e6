"""A sweep from start to end: the controller that owns a running sweep's state and runs its loop, with
MLflow and the progress line as callbacks (farm.orchestrate.callbacks). The data folder holds everything
local:

    <data>/mlflow.db, <data>/mlartifacts/     the default MLflow store
    <data>/trials/<trial id>/result.json      a finished trial (the record of "done")
    <data>/stages/<stage>/<key>/              cached stage results (quantized artifacts, shared stages)
    <data>/sweeps/<name>.lock                 one driver per sweep at a time

"Done" is the result file, not MLflow: a trial whose result exists is never run again; if its MLflow run
is missing (another tracking server, a crash between the two writes) it is logged from the file.
"""

from __future__ import annotations

import fcntl
import os
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from ..core.ids import FLOAT_METHOD, flatten
from ..core.layout import DataLayout
from ..plan.spec import Sweep, Trial
from .callbacks import Callback, ProgressCallback, TrackingCallback
from .results import load_result, primary_metric, result_path, save_result  # noqa: F401  (importers of sweep)
from .summary import (numerics_mismatch, numerics_note, print_summary, ratio_cell, summary_rows,  # noqa: F401
                      sweep_status, sweep_trial)

DEFAULT_DATA = "runs/farm"



def data_dir_default() -> Path:
    return Path(os.environ.get("MQFARM_FARM_DIR", DEFAULT_DATA))


class SweepBusy(ValueError):
    pass


@dataclass
class Options:
    data_dir: Path = field(default_factory=data_dir_default)
    tracking_uri: str | None = None
    address: str | None = None
    num_cpus: int | None = None
    worker_logs: bool = False
    live: bool | None = None  # progress line redrawn in place (default: when stderr is a terminal)
    out: object = None  # where progress and notes go (default stderr)
    # the device stage's export and compile steps (default quant.export.export_artifact and
    # devicelab.compile.compile_export); module-level functions, so Ray can ship them to workers
    exporter: object = None
    compiler: object = None
    devices_file: str | None = None  # the devices file (default: $MQFARM_DEVICES, ./devices.yaml, the defaults)

    @property
    def uri(self) -> str:
        from .tracking import default_uri

        return self.tracking_uri or default_uri(self.data_dir)


@dataclass
class Outcome:
    sweep: Sweep
    results: dict  # trial id -> result (every finished trial, old and new)
    failed: dict  # trial id -> error message (this invocation)
    executed: list  # trial ids run by this invocation
    logged_from_cache: list
    interrupted: bool = False
    wall_s: float = 0.0
    registered: list = field(default_factory=list)
    parent_run_id: str | None = None
    cluster: dict = field(default_factory=dict)
    device_failed: dict = field(default_factory=dict)  # "trial id/device label" -> error (this invocation)

    @property
    def ok(self) -> bool:
        return not self.failed and not self.interrupted and not self.device_failed


@contextmanager
def sweep_lock(data_dir: Path, name: str):
    lock = DataLayout(data_dir).sweep_lock(name)
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SweepBusy(f"another farm sweep is running sweep {name!r} on {data_dir}") from None
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextmanager
def _sigterm_as_interrupt():
    def handler(signum, frame):
        raise KeyboardInterrupt

    try:
        old = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _label(trial: Trial, varying: list[str]) -> str:
    flat = flatten({k: v for k, v in trial.config.items() if k != "eval"})
    parts = [f"{k.split('.')[-1]}={flat[k]}" for k in varying if k in flat and k not in ("scheme", "method")]
    return f"{trial.short} {trial.config['scheme']} {trial.config['method']} {' '.join(parts)}".rstrip()


# ---------------------------------------------------------------- running

def default_callbacks(sweep: Sweep, opts: Options) -> list[Callback]:
    """MLflow, then the progress line: a run is written before the line says the trial is done."""
    from .tracking import Tracker

    tracker = Tracker(opts.uri, sweep.name, DataLayout(Path(opts.data_dir)).artifacts)
    return [TrackingCallback(tracker), ProgressCallback(opts.out, opts.live)]


def run_sweep(sweep: Sweep, opts: Options | None = None, callbacks: list[Callback] | None = None) -> Outcome:
    """Run what is missing of ``sweep``. ``callbacks``: the whole list, in calling order (default:
    :func:`default_callbacks`; to add one, ``[*default_callbacks(sweep, opts), mine]``)."""
    opts = opts or Options()
    _check_local_resources(sweep, opts)
    data = Path(opts.data_dir)
    data.mkdir(parents=True, exist_ok=True)
    with sweep_lock(data, sweep.name), _sigterm_as_interrupt():
        cbs = default_callbacks(sweep, opts) if callbacks is None else list(callbacks)
        return SweepController(sweep, opts, cbs).run()


def _check_local_resources(sweep: Sweep, opts: Options) -> None:
    """Without --address the machine is the cluster: refuse what it cannot run before starting anything."""
    import ray

    if opts.address or ray.is_initialized():
        return  # a cluster: its nodes are checked once connected
    import torch

    r = sweep.spec.resources
    cpus = opts.num_cpus or os.cpu_count() or 1
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if r.cpu > cpus or r.gpu > gpus or r.custom:
        want = ", ".join([f"CPU {r.cpu:g}"] + ([f"GPU {r.gpu:g}"] if r.gpu else []) +
                         [f"{k} {v:g}" for k, v in r.custom.items()])
        raise ValueError(f"trials need {want} but this machine has CPU {cpus}, GPU {gpus}; run on a cluster that "
                         "has them with --address, or lower resources: in the sweep file")


@dataclass
class Attempt:
    """One attempt of a trial as the driver saw it start: the worker's attempt key (a retry has another),
    how many of its training steps went to the callbacks (its result then carries them all; a callback
    logs only the rest), and which attempt of the trial it is."""

    key: str | None
    steps: int
    count: int


class SweepController:
    """A running sweep's state and its loop. The state: the trials by id, the outcome, each trial's
    current :class:`Attempt`, the slots, the trial runner (farm.orchestrate.scheduler.Runner) and the
    device jobs (farm.orchestrate.device_tasks.DeviceJobs). Everything around it (MLflow, the progress
    line) is a callback (farm.orchestrate.callbacks), called in list order after the state has changed.

    Events (``handle``): ``started``, ``step``, ``finished``, ``failed`` from trials (the scheduler),
    ``device`` from a device target (farm.orchestrate.device_tasks)."""

    def __init__(self, sweep: Sweep, opts: Options, callbacks: list[Callback], outcome: Outcome | None = None):
        self.sweep, self.opts, self.callbacks = sweep, opts, list(callbacks)
        self.data = Path(opts.data_dir)
        self.resources = sweep.spec.resources.model_dump()
        self.devices_file = opts.devices_file
        self.outcome = outcome or Outcome(sweep, {}, {}, [], [])
        self.trials = {t.id: t for t in sweep.trials}
        self.attempts: dict[str, Attempt] = {}  # trial id -> its current attempt
        self.slots = 1  # trials that run at once (set once the cluster is known)
        self.runner = None
        self.device_jobs = None  # DeviceJobs when the sweep has devices:

    # ------------------------------------------------------------ callbacks
    def _call(self, hook: str, *args) -> None:
        for cb in self.callbacks:
            getattr(cb, hook)(self, *args)

    def note(self, msg: str) -> None:
        self._call("on_note", msg)

    def _end(self, status: str) -> None:
        """``on_sweep_end`` for every callback, even after one raised: each closes what it opened. The first
        error is raised after all ran, unless the sweep is failing already (that error wins)."""
        first = None
        for cb in self.callbacks:
            try:
                cb.on_sweep_end(self, status)
            except Exception as e:
                first = first or e
        if first is not None and status != "error":
            raise first

    # ------------------------------------------------------------ state
    @property
    def devices_active(self) -> bool:
        return self.device_jobs is not None and self.device_jobs.active

    def label(self, tid: str) -> str:
        return _label(self.trials[tid], self.sweep.varying)

    def in_flight(self) -> list[str]:
        """Trials this invocation started that have neither a result nor an error."""
        return [tid for tid in self.attempts if tid not in self.outcome.results and tid not in self.outcome.failed]

    # ------------------------------------------------------------ the loop
    def run(self) -> Outcome:
        t0 = time.time()
        status = "error"
        try:
            try:
                self._call("setup")
                self._restore()
                self._loop()
            except KeyboardInterrupt:
                signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean-up short
                self.outcome.interrupted = True
            status = "interrupted" if self.outcome.interrupted else "finished"
        finally:
            self.outcome.wall_s = time.time() - t0
            try:
                self._end(status)
            finally:
                if self.outcome.interrupted:
                    signal.signal(signal.SIGINT, signal.default_int_handler)
        return self.outcome

    def _restore(self) -> None:
        for tid in self.trials:
            res = load_result(self.data, tid)
            if res is not None:
                self.outcome.results[tid] = res
                self._call("on_trial_restore", tid, res)

    def _loop(self) -> None:
        from ..work import stages
        from . import scheduler

        spec, outcome, opts = self.sweep.spec, self.outcome, self.opts
        todo = [t for t in self.sweep.trials if t.id not in outcome.results]
        device_todo = self.devices_missing() if spec.devices else {}
        if not todo and not device_todo:
            self.note(f"sweep {self.sweep.name}: all {len(self.sweep.trials)} trials are done; nothing to run")
            return
        owned = scheduler.connect(opts.address, opts.num_cpus, worker_logs=opts.worker_logs)
        try:
            outcome.cluster = scheduler.cluster_summary()
            scheduler.check_feasible(self.resources)
            slots = int(outcome.cluster["cpus"] // max(spec.resources.cpu, 1e-9)) or 1
            if spec.resources.gpu:
                slots = min(slots, int(outcome.cluster["gpus"] // spec.resources.gpu) or 1)
            if spec.concurrency.max_trials:
                slots = min(slots, spec.concurrency.max_trials)
            self.slots = slots
            gpus = outcome.cluster["gpus"]
            self.note(f"sweep {self.sweep.name}: {len(self.sweep.trials)} trials, {len(outcome.results)} done, "
                      f"{len(todo)} to run on {outcome.cluster['nodes']} node(s) / {outcome.cluster['cpus']:g} CPU"
                      f"{f' / {gpus:g} GPU' if gpus else ''}")
            self._call("on_sweep_start")
            if spec.devices:
                from ..plan.devices import plan_devices
                from .device_tasks import DeviceJobs

                plan = plan_devices(spec.devices, self.devices_file)
                for note in plan.notes():
                    self.note(note)
                self.device_jobs = DeviceJobs(plan.jobs, str(self.data), spec.retries, opts.exporter,
                                              opts.compiler, on_note=self.note)
                for tid, res in outcome.results.items():  # finished earlier: their models join the sessions
                    self.submit_devices(tid, res, device_todo.get(tid, set()))
            self.runner = scheduler.Runner(str(self.data), self.resources, spec.retries, spec.concurrency.max_trials,
                                           spec.save_artifacts)
            self.runner.add([scheduler.Job(t.id, t.config, stages.plan(t.config)) for t in todo])
            while self.runner.active or self.devices_active:
                events = self.runner.poll(0.5) if self.runner.active else []
                for tid, kind, payload in events:  # first: a trial that just finished joins the sessions
                    self.handle(tid, kind, payload)
                if self.device_jobs is not None:  # sessions start once no trial is left to train
                    for tid, kind, payload in self.device_jobs.poll(0 if self.runner.active else 0.5,
                                                                    training_done=not self.runner.active):
                        self.handle(tid, kind, payload)
                self._call("on_poll")
        except BaseException as e:
            # Ctrl-C, or a callback that raised: stop the work in flight (on a cluster this driver does not
            # own, nothing else would); what finished is saved already
            if isinstance(e, KeyboardInterrupt):
                signal.signal(signal.SIGINT, signal.SIG_IGN)
            if self.runner is not None:
                self.runner.cancel()
            if self.device_jobs is not None:
                self.device_jobs.cancel()
            raise
        finally:
            scheduler.shutdown(owned)

    # ------------------------------------------------------------ events
    def handle(self, tid: str, kind: str, payload: dict) -> None:
        if kind in ("started", "step") and (tid in self.outcome.results or tid in self.outcome.failed):
            # Progress events and results travel separately, so on a starved machine a trial's "started" can
            # arrive after its result: it must not open a second run, which would stay RUNNING forever.
            return
        getattr(self, f"_on_{kind}")(tid, payload)

    def _on_started(self, tid: str, payload: dict) -> None:
        prev = self.attempts.get(tid)
        self.attempts[tid] = Attempt(payload.get("attempt"), 0, prev.count + 1 if prev else 1)
        self._call("on_trial_start", tid, payload)

    def _on_step(self, tid: str, payload: dict) -> None:
        att = self.attempts.get(tid)
        if att and payload.get("attempt") == att.key:  # not a step of an attempt that Ray gave up on
            self._call("on_trial_step", tid, payload)
            att.steps += 1

    def _ensure_started(self, tid: str, payload: dict) -> None:
        """A result that overtook its "started" event: the callbacks hear of the start first, from the result
        (the late event is dropped by handle)."""
        if tid not in self.attempts:
            self.attempts[tid] = Attempt(payload.get("attempt"), 0, 1)
            node = payload.get("node") or {}
            self._call("on_trial_start", tid, {"attempt": payload.get("attempt"), "time": payload.get("started_at"),
                                               **{k: v for k, v in node.items() if k in ("node_ip", "node_id", "host")}})

    def _on_finished(self, tid: str, payload: dict) -> None:
        save_result(self.data, payload)  # first: from here on the trial counts as done
        self.outcome.results[tid] = payload
        self.outcome.executed.append(tid)
        self._ensure_started(tid, payload)
        self._call("on_trial_result", tid, payload)
        if self.device_jobs is not None:
            self.submit_devices(tid, payload)

    def _on_failed(self, tid: str, payload: dict) -> None:
        self.outcome.failed[tid] = payload["error"]
        self.outcome.executed.append(tid)
        self._ensure_started(tid, payload)
        self._call("on_trial_error", tid, payload)

    def _on_device(self, tid: str, summary: dict) -> None:
        from .device_metrics import metrics_and_tags

        res = self.outcome.results[tid]
        res.setdefault("devices", {})[summary["label"]] = summary
        save_result(self.data, res)
        if not summary.get("ok"):
            _, tags = metrics_and_tags(summary)
            lbl = summary["label"]
            self.outcome.device_failed[f"{tid}/{lbl}"] = tags.get(f"device/{lbl}/error", "failed")
        self._call("on_device_result", tid, summary)

    # ------------------------------------------------------------ device stages
    def devices_missing(self) -> dict:
        """Finished trials with a model to measure whose device results are missing: trial id -> labels
        (kinds the pool has no device of are not wanted: they are skipped, and said so)."""
        from ..plan.devices import plan_devices

        want = {j.label for j in plan_devices(self.sweep.spec.devices, self.devices_file).jobs}
        out = {}
        for tid, res in self.outcome.results.items():
            have = {k for k, v in (res.get("devices") or {}).items() if v.get("ok")}
            if self._device_source(tid, res) is not None and want - have:
                out[tid] = want - have
        return out

    def _device_source(self, tid: str, result: dict):
        """What the device stage exports for a trial: its artifact, or the float model for a float trial
        (the FP32 baseline); None when there is nothing (save_artifacts: false)."""
        from ..work.device_job import float_source

        cfg = self.trials[tid].config
        if cfg["method"] == FLOAT_METHOD:
            return float_source(cfg["model"], cfg["layers"])
        return result.get("artifact_dir") or None

    def submit_devices(self, tid: str, result: dict, needs: set | None = None) -> None:
        """Hand a finished trial's model to the device targets; ``needs``: the targets it has no results
        for (None: all of them)."""
        from ..core.ids import quant_key

        source = self._device_source(tid, result)
        if source is None:
            self.note(f"device {self.label(tid)}: skipped (no artifact: save_artifacts: false)")
            return
        cfg = self.trials[tid].config
        role = self.sweep.baselines.get(tid, "quantized")
        self.device_jobs.add(tid, source, quant_key(cfg), role, f"{cfg['model']}/{cfg['layers']}", needs)


class SweepRun(SweepController):
    """The controller wired as before callbacks: a tracker (its parent run started), the dict of its runs
    in flight, the outcome, and a progress line set afterwards as ``.progress``. Tests feed it events
    through ``handle``."""

    def __init__(self, sweep: Sweep, tracker, outcome: Outcome, runs: dict, data: Path, resources: dict):
        self._line = ProgressCallback()
        super().__init__(sweep, Options(data_dir=Path(data)), [TrackingCallback(tracker, runs), self._line], outcome)
        self.resources = resources

    @property
    def progress(self):
        return self._line.progress

    @progress.setter
    def progress(self, value) -> None:
        self._line.progress = value
