"""The device stage on the driver: prepare every finished trial's model for each device target as soon as
the trial is done (export, compile: ``farm.work.device_job``), and once the sweep's training is over, one
measurement session per target that times all of them together (``farm.work.measure``); its answer
becomes one ``(trial id, "device", summary)`` event per trial.

Placement:

* a prepare task asks for ``{"CPU": 1}`` plus, for a phone, the custom resource its node advertises
  (``phone:<soc>``, e.g. ``ray start --resources '{"phone:sm8650": 2}'``), so the compiled model lands on
  the node the phone hangs on;
* a session on the host asks for every CPU of a node, so Ray places nothing beside it, and it starts only
  when no trial is left to train: a host latency measured beside training measures the training;
* a session on a phone asks for the phone's resource (Ray never books a phone twice; the pool's file lock
  keeps other processes off it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from ..core.errors import format_exception
from ..plan.devices import DeviceJob
from ..work.device_job import measure_session, prepare_device_model


def _prepare_task(trial_id, source, source_key, job, data_dir, exporter, compiler):
    return prepare_device_model(trial_id, source, source_key, job, data_dir, exporter, compiler)


def _session_task(job, entries, export_keys, data_dir):
    return measure_session(job, entries, export_keys, data_dir)


@dataclass
class _Target:
    job: DeviceJob
    sources: dict = field(default_factory=dict)  # trial id -> (source, source key, role, group)
    prepared: dict = field(default_factory=dict)  # trial id -> prepare summary
    failed: dict = field(default_factory=dict)  # trial id -> why its model could not be prepared
    due: bool = False  # a session must run (a trial without this target's results)
    running: bool = False


class DeviceJobs:
    """The device targets of a running sweep; see the module docstring. ``add`` a finished trial (with
    the targets it lacks), ``poll`` for events, and tell ``poll`` when training is over."""

    def __init__(self, jobs: list[DeviceJob], data_dir: str, retries: int = 2, exporter: Callable | None = None,
                 compiler: Callable | None = None, on_note: Callable[[str], None] | None = None):
        import ray

        from . import scheduler

        self.targets = {job.label: _Target(job) for job in jobs}
        self.data_dir, self.retries = str(data_dir), retries
        self.exporter, self.compiler = exporter, compiler
        self.on_note = on_note or (lambda msg: None)
        self.pending: dict = {}  # ObjectRef -> ("prepare", label, trial id) | ("session", label, None)
        self._prepare = ray.remote(_prepare_task)
        self._session = ray.remote(_session_task)
        for job in jobs:  # a phone resource no node advertises would leave the stage pending forever
            scheduler.check_feasible({"cpu": 1, "custom": job.resources})

    @property
    def active(self) -> bool:
        return bool(self.pending) or any(t.due for t in self.targets.values())

    def add(self, trial_id: str, source, source_key: str, role: str, group: str, needs: set | None = None) -> None:
        """A finished trial whose model the device targets can run (``source``: its artifact folder, or the
        float model); ``needs``: the labels it has no results for (None: all), which makes their sessions
        due. Its model is prepared now for the due targets, later for the others if they become due."""
        for label, t in self.targets.items():
            t.sources[trial_id] = (source, source_key, role, group)
            if needs is None or label in needs:
                t.due = True
            if t.due:
                self._submit_prepares(label)

    def _submit_prepares(self, label: str) -> None:
        t = self.targets[label]
        busy = {tid for kind, lbl, tid in self.pending.values() if kind == "prepare" and lbl == label}
        for tid, (source, key, _, _) in t.sources.items():
            if tid in t.prepared or tid in t.failed or tid in busy:
                continue
            opts = {"num_cpus": 1, "max_retries": self.retries, "retry_exceptions": False,
                    "name": f"prepare-{tid[:8]}-{label}"}
            if t.job.resources:
                opts["resources"] = dict(t.job.resources)
            ref = self._prepare.options(**opts).remote(tid, source, key, t.job, self.data_dir, self.exporter,
                                                       self.compiler)
            self.pending[ref] = ("prepare", label, tid)

    def _session_options(self, t: _Target) -> dict:
        opts = {"max_retries": self.retries, "retry_exceptions": False, "name": f"measure-{t.job.label}"}
        if t.job.exclusive_node:
            from . import scheduler

            opts["num_cpus"] = scheduler.largest_node_cpus()
        else:
            opts["num_cpus"] = 1
        if t.job.resources:
            opts["resources"] = dict(t.job.resources)
        return opts

    def _maybe_start_sessions(self, training_done: bool) -> None:
        if not training_done:
            return
        for label, t in self.targets.items():
            if not t.due or t.running:
                continue
            self._submit_prepares(label)  # trials that finished before this invocation
            if any(k == "prepare" and lbl == label for k, lbl, _ in self.pending.values()):
                continue
            from ..work.measure import Entry

            entries = [Entry(tid, t.sources[tid][2], t.sources[tid][3], p["folder"], p["signature"])
                       for tid, p in t.prepared.items()]
            t.due = False
            if not entries:
                self.on_note(f"device {label}: no model was prepared; nothing to measure")
                continue
            keys = {tid: p["export_key"] for tid, p in t.prepared.items()}
            t.running = True
            ref = self._session.options(**self._session_options(t)).remote(t.job, entries, keys, self.data_dir)
            self.pending[ref] = ("session", label, None)
            self.on_note(f"device {label}: measurement session queued for {len(entries)} model(s), interleaved"
                         + (" (the whole node, no training beside it)" if t.job.exclusive_node else ""))

    def poll(self, timeout: float = 0.0, training_done: bool = False) -> list[tuple]:
        import ray

        self._maybe_start_sessions(training_done)
        if not self.pending:
            return []
        ready, _ = ray.wait(list(self.pending), num_returns=len(self.pending), timeout=timeout)
        out = []
        for ref in ready:
            kind, label, tid = self.pending.pop(ref)
            t = self.targets[label]
            try:
                value, error = ray.get(ref), None
            except ray.exceptions.RayTaskError as e:
                cause = getattr(e, "cause", None) or e
                value, error = None, format_exception(cause)[0] if isinstance(cause, BaseException) else str(e)
            except ray.exceptions.RayError as e:
                value, error = None, f"{type(e).__name__}: {str(e).splitlines()[0]}"
            if kind == "prepare":
                if error is None:
                    t.prepared[tid] = value
                else:
                    t.failed[tid] = error
                    out.append((tid, "device", _failed(tid, t.job, f"export/compile failed: {error}")))
                continue
            t.running = False
            if error is not None:
                out += [(x, "device", _failed(x, t.job, error)) for x in t.prepared]
                continue
            out += [(x, "device", _entry_summary(x, t, value)) for x in value["entries"]]
        self._maybe_start_sessions(training_done)
        return out

    def cancel(self) -> None:
        import ray

        for ref in list(self.pending):
            try:
                ray.cancel(ref, force=True)
            except Exception:  # finished already, or Ray is going down
                pass
        self.pending.clear()
        for t in self.targets.values():
            t.due = t.running = False


def _failed(tid: str, job: DeviceJob, error: str) -> dict:
    return {"trial_id": tid, "target": job.target, "label": job.label, "ok": False, "error": error,
            "records": [], "failed": []}


def _entry_summary(tid: str, t: _Target, session: dict) -> dict:
    """One trial's part of a session, in the shape its result file and MLflow run keep."""
    e = session["entries"][tid]
    prep = t.prepared[tid]
    return {"trial_id": tid, "target": t.job.target, "label": t.job.label, "ok": True, "device": session["device"],
            "records": e["records"], "failed": [], "ratios": e["ratios"], "role": e["role"], "group": e["group"],
            "signature": e["signature"], "same_graph": e["same_graph"], "conditions": e["conditions"],
            "session": {"key": session["stage"]["key"], "hit": session["stage"]["hit"],
                        "models": len(session["entries"]), "started_at": session["started_at"],
                        "ended_at": session["ended_at"], "exclusive_node": t.job.exclusive_node},
            "stages": {**prep["stages"], "measure": session["stage"]}, "node": session.get("node", {}),
            "prepare": {"node": prep["node"], "started_at": prep["started_at"], "ended_at": prep["ended_at"]},
            "started_at": session["started_at"], "ended_at": session["ended_at"]}
