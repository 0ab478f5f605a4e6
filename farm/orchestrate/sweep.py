"""A sweep from start to end: what is already done, what to run, running it on Ray, logging to MLflow,
and the summary. The data folder holds everything local:

    <data>/mlflow.db, <data>/mlartifacts/     the default MLflow store
    <data>/trials/<trial id>/result.json      a finished trial (the record of "done")
    <data>/stages/<stage>/<key>/              cached stage results (quantized artifacts, shared stages)
    <data>/sweeps/<name>.lock                 one driver per sweep at a time

"Done" is the result file, not MLflow: a trial whose result exists is never run again; if its MLflow run
is missing (another tracking server, a crash between the two writes) it is logged from the file.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from ..core.layout import DataLayout
from .progress import Progress, fmt_duration, table
from ..core.ids import FLOAT_METHOD, flatten
from ..plan.spec import Sweep, Trial

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


# ---------------------------------------------------------------- result files

def result_path(data_dir: Path, trial_id: str) -> Path:
    return DataLayout(data_dir).result(trial_id)


def load_result(data_dir: Path, trial_id: str) -> dict | None:
    p = result_path(data_dir, trial_id)
    try:
        return json.loads(p.read_text())
    except (FileNotFoundError, ValueError):
        return None


def save_result(data_dir: Path, result: dict) -> None:
    p = result_path(data_dir, result["trial_id"])
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2, sort_keys=True))
    tmp.replace(p)


def primary_metric(result: dict) -> tuple[str | None, float | None]:
    for k, v in (result.get("metrics") or {}).items():
        if k.startswith("ppl/"):
            return k, v
    return None, None


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

def run_sweep(sweep: Sweep, opts: Options | None = None) -> Outcome:
    from .tracking import Tracker

    opts = opts or Options()
    out = opts.out or sys.stderr
    _check_local_resources(sweep, opts)
    data = Path(opts.data_dir)
    data.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with sweep_lock(data, sweep.name), _sigterm_as_interrupt():
        tracker = Tracker(opts.uri, sweep.name, DataLayout(data).artifacts)
        parent = tracker.start_parent(sweep)
        outcome = Outcome(sweep, {}, {}, [], [], parent_run_id=parent)
        runs: dict = {}  # trial id -> MLflow run id of the attempt in flight
        try:
            _run(sweep, opts, tracker, outcome, runs, out)
        except KeyboardInterrupt:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean-up short
            outcome.interrupted = True
        except BaseException:
            tracker.kill(list(runs.values()), note="the sweep stopped on an error")
            tracker.client.set_terminated(parent, status="FAILED")
            raise
        try:
            if outcome.interrupted:
                tracker.kill(list(runs.values()))
                tracker.kill_stale("interrupted (Ctrl-C)")  # one caught between create_run and bookkeeping
                print(f"\ninterrupted: {len(runs)} trial(s) stopped and marked KILLED; run the same command "
                      "again to finish the rest", file=out)
            elif sweep.spec.register_best:
                try:
                    outcome.registered = tracker.register_best({t.id: t for t in sweep.trials}, outcome.results,
                                                               primary_metric)
                except Exception as e:  # the registry is a convenience: never lose a finished sweep over it
                    print(f"model registry: skipped ({type(e).__name__}: {e})", file=out)
            outcome.wall_s = time.time() - t0
            counts = {"total": len(sweep.trials), "finished": len(outcome.results),
                      "failed": len(outcome.failed), "executed": len(outcome.executed)}
            tracker.end_parent("KILLED" if outcome.interrupted else "FINISHED", counts, outcome.wall_s)
        finally:
            if outcome.interrupted:
                signal.signal(signal.SIGINT, signal.default_int_handler)
    return outcome


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


def _run(sweep: Sweep, opts: Options, tracker, outcome: Outcome, runs: dict, out) -> None:
    from ..work import stages
    from . import scheduler

    data = Path(opts.data_dir)
    spec = sweep.spec
    state = SweepRun(sweep, tracker, outcome, runs, data, spec.resources.model_dump())
    state.devices_file = opts.devices_file
    stale = tracker.kill_stale()
    if stale:
        print(f"marked {stale} run(s) left RUNNING by an earlier driver as KILLED", file=out)
    logged = tracker.finished_trials()
    for tid, trial in state.trials.items():
        res = load_result(data, tid)
        if res is None:
            continue
        outcome.results[tid] = res
        if tid not in logged:  # done earlier but not logged in this store: log it, run nothing
            rid = tracker.start_trial(trial, state.resources, res.get("started_at"), {"from_cache": "true"})
            tracker.log_steps(rid, res.get("steps", []))
            tracker.finish_trial(rid, res)
            tracker.log_devices(rid, res.get("devices", {}))
            outcome.logged_from_cache.append(tid)
            logged[tid] = rid
        state.finished_runs[tid] = logged[tid]
    todo = [t for t in sweep.trials if t.id not in outcome.results]
    device_todo = state.devices_missing() if spec.devices else {}
    if not todo and not device_todo:
        print(f"sweep {sweep.name}: all {len(sweep.trials)} trials are done; nothing to run", file=out)
        return
    owned = scheduler.connect(opts.address, opts.num_cpus, worker_logs=opts.worker_logs)
    runner = None
    try:
        outcome.cluster = scheduler.cluster_summary()
        scheduler.check_feasible(spec.resources.model_dump())
        slots = int(outcome.cluster["cpus"] // max(spec.resources.cpu, 1e-9)) or 1
        if spec.resources.gpu:
            slots = min(slots, int(outcome.cluster["gpus"] // spec.resources.gpu) or 1)
        if spec.concurrency.max_trials:
            slots = min(slots, spec.concurrency.max_trials)
        gpus = outcome.cluster["gpus"]
        print(f"sweep {sweep.name}: {len(sweep.trials)} trials, {len(outcome.results)} done, {len(todo)} to run "
              f"on {outcome.cluster['nodes']} node(s) / {outcome.cluster['cpus']:g} CPU"
              f"{f' / {gpus:g} GPU' if gpus else ''}; MLflow {opts.uri}", file=out)
        state.progress = Progress(len(sweep.trials), len(outcome.results), slots, out, opts.live)
        if spec.devices:
            from ..plan.devices import plan_devices
            from .device_tasks import DeviceJobs

            plan = plan_devices(spec.devices, opts.devices_file)
            for note in plan.notes():
                state.progress.note(note)
            state.device_jobs = DeviceJobs(plan.jobs, str(data), spec.retries, opts.exporter, opts.compiler,
                                           on_note=state.progress.note)
            for tid, res in outcome.results.items():  # finished earlier: their models join the sessions
                state.submit_devices(tid, res, device_todo.get(tid, set()))
        runner = scheduler.Runner(str(data), state.resources, spec.retries, spec.concurrency.max_trials,
                                  spec.save_artifacts)
        runner.add([scheduler.Job(t.id, t.config, stages.plan(t.config)) for t in todo])
        while runner.active or state.devices_active:
            events = runner.poll(0.5) if runner.active else []
            for tid, kind, payload in events:  # first: a trial that just finished joins the sessions
                state.handle(tid, kind, payload)
            if state.device_jobs is not None:  # sessions start once no trial is left to train
                for tid, kind, payload in state.device_jobs.poll(0 if runner.active else 0.5,
                                                                 training_done=not runner.active):
                    state.handle(tid, kind, payload)
            state.progress.redraw()
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if runner is not None:
            runner.cancel()
        if state.device_jobs is not None:
            state.device_jobs.cancel()
        raise
    finally:
        if state.progress is not None:
            state.progress.close()
        scheduler.shutdown(owned)


@dataclass
class Attempt:
    """One attempt of a trial as the driver saw it start: the worker's attempt key (a retry has another),
    the training steps already logged for it (its result then carries only the rest), and which attempt of
    the trial it is."""

    key: str | None
    steps_logged: int
    count: int


class SweepRun:
    """The state of a running sweep, which every worker event updates: the trials by id, the MLflow run of
    each attempt in flight (``runs``) and of each finished trial (``finished_runs``), what was logged of
    each attempt, the outcome, the progress line and the device stages in flight.

    Events: ``started``, ``step``, ``finished``, ``failed`` from trials (farm.orchestrate.scheduler), ``device`` from a
    device stage (farm.work.device_job, farm.orchestrate.device_tasks), whose metrics go into the finished trial's run."""

    def __init__(self, sweep: Sweep, tracker, outcome: Outcome, runs: dict, data: Path, resources: dict):
        self.sweep, self.tracker, self.outcome, self.runs, self.data = sweep, tracker, outcome, runs, data
        self.resources = resources
        self.trials = {t.id: t for t in sweep.trials}
        self.attempts: dict[str, Attempt] = {}  # trial id -> its current attempt
        self.finished_runs: dict = {}  # trial id -> MLflow run id of its finished run
        self.progress: Progress | None = None
        self.device_jobs = None  # farm.orchestrate.device_tasks.DeviceJobs when the sweep has devices:
        self.devices_file: str | None = None  # Options.devices_file

    @property
    def devices_active(self) -> bool:
        return self.device_jobs is not None and self.device_jobs.active

    def label(self, tid: str) -> str:
        return _label(self.trials[tid], self.sweep.varying)

    def handle(self, tid: str, kind: str, payload: dict) -> None:
        if kind in ("started", "step") and (tid in self.outcome.results or tid in self.outcome.failed):
            # Progress events and results travel separately, so on a starved machine a trial's "started" can
            # arrive after its result: it must not open a second run, which would stay RUNNING forever.
            return
        getattr(self, f"_on_{kind}")(tid, payload)

    def _on_started(self, tid: str, payload: dict) -> None:
        prev = self.attempts.get(tid)
        count = prev.count + 1 if prev else 1
        self.attempts[tid] = Attempt(payload.get("attempt"), 0, count)
        node = payload.get("node_ip") or payload.get("host", "")
        if tid not in self.runs:
            self.runs[tid] = self.tracker.start_trial(self.trials[tid], self.resources, payload.get("time"),
                                                      {"node": node, "node_id": payload.get("node_id", "")})
        else:  # Ray re-ran the trial after its worker died
            self.tracker.client.set_tag(self.runs[tid], "attempts", str(count))
            self.progress.note(f"retry  {self.label(tid)}: attempt {count} after the worker died")
        self.progress.started(tid)

    def _on_step(self, tid: str, payload: dict) -> None:
        att = self.attempts.get(tid)
        if tid in self.runs and att and payload.get("attempt") == att.key:
            self.tracker.log_steps(self.runs[tid], [payload])
            att.steps_logged += 1

    def _on_finished(self, tid: str, payload: dict) -> None:
        save_result(self.data, payload)  # first: from here on the trial counts as done
        self.outcome.results[tid] = payload
        self.outcome.executed.append(tid)
        att = self.attempts.get(tid)
        if tid not in self.runs:
            self.runs[tid] = self.tracker.start_trial(self.trials[tid], self.resources, payload.get("started_at"))
        logged = att.steps_logged if att and att.key == payload.get("attempt") else 0
        self.tracker.log_steps(self.runs[tid], payload.get("steps", [])[logged:])
        # the worker's on-disk count: it also sees attempts whose "started" event never arrived
        self.tracker.finish_trial(self.runs[tid], payload, {"attempts": payload.get("attempt_count", 1)})
        self.finished_runs[tid] = self.runs[tid]
        del self.runs[tid]  # only now: an interrupt inside finish_trial must still find the run to close
        name, value = primary_metric(payload)
        note = f"{name}={value:.3f}" if name else ""
        self.progress.finished(tid, self.label(tid), payload.get("timing", {}).get("total_s"), True, note)
        if self.device_jobs is not None:
            self.submit_devices(tid, payload)

    def _on_failed(self, tid: str, payload: dict) -> None:
        self.outcome.failed[tid] = payload["error"]
        self.outcome.executed.append(tid)
        if tid not in self.runs:
            self.runs[tid] = self.tracker.start_trial(self.trials[tid], self.resources)
        self.tracker.fail_trial(self.runs[tid], payload["error"], payload.get("traceback", ""), payload.get("kind", ""))
        del self.runs[tid]
        self.progress.finished(tid, self.label(tid), None, False, payload["error"])

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
            self.progress.note(f"device {self.label(tid)}: skipped (no artifact: save_artifacts: false)")
            return
        cfg = self.trials[tid].config
        role = self.sweep.baselines.get(tid, "quantized")
        self.device_jobs.add(tid, source, quant_key(cfg), role, f"{cfg['model']}/{cfg['layers']}", needs)

    def _on_device(self, tid: str, summary: dict) -> None:
        from .device_metrics import metrics_and_tags

        res = self.outcome.results[tid]
        res.setdefault("devices", {})[summary["label"]] = summary
        save_result(self.data, res)
        rid = self.finished_runs.get(tid)
        if rid is not None:
            self.tracker.log_devices(rid, {summary["label"]: summary})
        metrics, tags = metrics_and_tags(summary)
        lbl = summary["label"]
        if summary.get("ok"):
            shown = [f"{k.rsplit('/', 1)[1]}={v:.4g}" for k, v in metrics.items()
                     if k.endswith(("/prefill_ms", "/decode_tok_s", "/energy_mj_per_tok"))]
            for base, by_graph in (summary.get("ratios") or {}).items():
                for graph in ("prefill", "decode"):
                    r = by_graph.get(graph)
                    if r:
                        shown.append(f"{graph} x{base}={r['ratio']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]")
            self.progress.note(f"device {self.label(tid)} on {lbl}: {' '.join(shown)}")
        else:
            err = self.outcome.device_failed[f"{tid}/{lbl}"] = tags.get(f"device/{lbl}/error", "failed")
            self.progress.note(f"device {self.label(tid)} on {lbl}: FAILED {err}")


# ---------------------------------------------------------------- tables

def summary_rows(sweep: Sweep, results: dict, states: dict | None = None) -> tuple[list[dict], list[str]]:
    """One row per trial: id, the varying settings, status, the primary metric, its ratio to FP, time."""
    states = states or {}
    fp = {}
    for tid, res in results.items():
        cfg = sweep_trial(sweep, tid)
        if cfg and cfg["method"] == FLOAT_METHOD:
            name, value = primary_metric(res)
            fp[(cfg["model"], cfg["layers"], name)] = value
    varying = [k for k in sweep.varying]
    cols = ["trial"] + varying + ["status"]
    metric_names = sorted({primary_metric(r)[0] for r in results.values() if primary_metric(r)[0]})
    devices = _latency_columns(results)
    cols += metric_names + (["vs fp"] if fp else []) + [c for c, _, _ in devices] + ["time"]
    rows = []
    for t in sweep.trials:
        flat = flatten({k: v for k, v in t.config.items() if k != "eval"})
        row = {"trial": t.short, **{k: flat.get(k) for k in varying}}
        res = results.get(t.id)
        if res:
            row["status"] = "done"
            name, value = primary_metric(res)
            if name:
                row[name] = value
                base = fp.get((t.config["model"], t.config["layers"], name))
                if base:
                    row["vs fp"] = f"{value / base:.3f}"
            row["time"] = fmt_duration(res.get("timing", {}).get("total_s"))
            for col, lbl, graph in devices:
                summary = (res.get("devices") or {}).get(lbl, {})
                if graph.startswith("x"):  # a ratio column: x<baseline>/<graph>
                    base, g = graph[1:].split("/")
                    r = (summary.get("ratios") or {}).get(base, {}).get(g)
                    if r:
                        row[col] = ratio_cell(r)
                    continue
                rec = next((r for r in summary.get("records", []) if r["workload"]["graph"] == graph), None)
                if rec is not None:
                    row[col] = f"{rec['median_ms']:.4g}" if graph == "prefill" else f"{rec['tokens_per_s']:.4g}"
        else:
            row["status"] = states.get(t.id, "pending")
        rows.append(row)
    return rows, cols


def _latency_columns(results: dict) -> list[tuple[str, str, str]]:
    """(column, device label, graph) for the device stages that measured latency (an emulator's times
    are not latency: left out)."""
    seen: dict = {}
    for res in results.values():
        for lbl, summary in (res.get("devices") or {}).items():
            for rec in summary.get("records", []):
                if rec.get("latency_meaningful") and rec["status"] == "ok":
                    seen[(lbl, rec["workload"]["graph"])] = True
    ratios: dict = {}
    for res in results.values():
        for lbl, summary in (res.get("devices") or {}).items():
            for base, by_graph in (summary.get("ratios") or {}).items():
                for g in by_graph:
                    if g in ("prefill", "decode") and (lbl, "prefill") in seen:
                        ratios[(lbl, base, g)] = True
    cols = []
    for lbl, graph in sorted(seen, key=lambda k: (k[0], k[1] != "prefill")):
        cols.append((f"{lbl} prefill ms" if graph == "prefill" else f"{lbl} tok/s", lbl, graph))
    for lbl, base, g in sorted(ratios, key=lambda k: (k[0], k[1] != "fp", k[2] != "prefill")):
        cols.append((f"{g} vs {base}", lbl, f"x{base}/{g}"))
    return cols


def ratio_cell(r: dict) -> str:
    """``0.832 [0.810, 0.851]``: a time ratio with its interval; ``~1`` marks an interval that holds 1 (no
    difference that the session could tell from noise)."""
    cell = f"{r['ratio']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]"
    return cell + (" ~1" if r["ci_low"] <= 1.0 <= r["ci_high"] else "")


def sweep_trial(sweep: Sweep, tid: str) -> dict | None:
    for t in sweep.trials:
        if t.id == tid:
            return t.config
    return None


def print_summary(outcome: Outcome, file=None) -> None:
    file = file or sys.stdout
    states = {tid: "FAILED" for tid in outcome.failed}
    if outcome.interrupted:
        states.update({t.id: "KILLED" for t in outcome.sweep.trials if t.id not in outcome.results
                       and t.id not in outcome.failed})
    rows, cols = summary_rows(outcome.sweep, outcome.results, states)
    print(table(rows, cols), file=file)
    n_done = len(outcome.results)
    print(f"\n{n_done}/{len(outcome.sweep.trials)} trials done ({len(outcome.executed)} run now, "
          f"{len(outcome.failed)} failed) in {fmt_duration(outcome.wall_s)}", file=file)
    for tid, err in outcome.failed.items():
        print(f"  FAILED {tid[:8]}: {err}", file=file)
    for key, err in outcome.device_failed.items():
        tid, lbl = key.split("/", 1)
        print(f"  FAILED {tid[:8]} on device {lbl}: {err}", file=file)
    for reg in outcome.registered:
        metric = [k for k in reg if k.startswith("ppl/")]
        extra = f" ({metric[0]}={reg[metric[0]]:.3f})" if metric else ""
        print(f"registered {reg['name']} v{reg['version']} @best = trial {reg['trial'][:8]}{extra}", file=file)


def sweep_status(sweep: Sweep, opts: Options) -> tuple[list[dict], list[str], dict]:
    """The state of every trial: done (result file), else the newest MLflow run's status, else pending."""
    from .tracking import Tracker

    results = {t.id: r for t in sweep.trials if (r := load_result(opts.data_dir, t.id)) is not None}
    states = {}
    other_numerics: dict = {}  # numerics version -> trial runs in MLflow made with it (not this code's)
    db = DataLayout(opts.data_dir).mlflow_db
    if opts.tracking_uri or db.exists():
        tracker = Tracker(opts.uri, sweep.name)
        for run in reversed(tracker.trial_runs()):  # oldest first, so the newest wins
            found = run.data.params.get("numerics")
            if numerics_mismatch(found):
                other_numerics[found or "none"] = other_numerics.get(found or "none", 0) + 1
            tid = run.data.tags.get("trial_id")
            if tid and tid not in results:
                states[tid] = run.info.status
                if run.info.status == "RUNNING":  # training logs live: show how far it got
                    hist = tracker.client.get_metric_history(run.info.run_id, "train/loss")
                    if hist:
                        last = max(hist, key=lambda m: m.step)
                        states[tid] = f"RUNNING step {last.step} loss {last.value:.4g}"
    rows, cols = summary_rows(sweep, results, states)
    counts = {"total": len(sweep.trials), "done": len(results)}
    for s in states.values():
        s = s.split()[0].lower()
        counts[s] = counts.get(s, 0) + 1
    counts["pending"] = len(sweep.trials) - len(results) - len(states)
    if other_numerics:  # {version: runs}; `farm status` prints it as a note
        counts["other_numerics"] = other_numerics
    return rows, cols, counts


def numerics_mismatch(found) -> str | None:
    """Why a result's numerics version (an MLflow param, a string) is not this code's; None when it is."""
    from quant.numerics import mismatch

    return mismatch(found)


def numerics_note(other: dict) -> str | None:
    """One line for `farm status`: the trial runs of the sweep that another numerics version made."""
    if not other:
        return None
    from quant import numerics

    parts = ", ".join(f"{n} with {'no version' if v == 'none' else f'version {v}'}" for v, n in sorted(other.items()))
    return (f"not comparable: {sum(other.values())} trial run(s) in MLflow were made by other arithmetic ({parts}); "
            f"this code is numerics version {numerics.NUMERICS_VERSION} and counts only its own results")
