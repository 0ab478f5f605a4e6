"""Running trials on Ray: a local instance sized to the machine, or an existing cluster (``address``).

Each trial is one Ray task that asks for the sweep's resources (``{"CPU": c, "GPU": g, ...}``), so GPU
trials land on GPU nodes and phones (custom resources) are never over-booked. Shared stages are tasks
too, and a trial that needs one takes its result as an argument, so Ray starts the trial only after the
stage is done and runs each stage once however many trials wait for it. Workers report progress
(``started``, per-step losses) to a small actor that the driver drains; the driver alone writes MLflow.

A worker process that dies is retried by Ray (``max_retries``); an exception inside a trial is not
retried (it would fail again) and comes back as a ``failed`` event.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field

import ray

from ..core.errors import format_exception
from ..work import stages as stages_mod
from ..work.trial import execute_trial


@ray.remote(num_cpus=0, max_restarts=-1)
class EventSink:
    """A mailbox for worker events; the driver drains it a few times a second."""

    def __init__(self):
        self.events = []

    def push(self, trial_id: str, kind: str, payload: dict) -> None:
        self.events.append((trial_id, kind, payload))

    def drain(self) -> list:
        out, self.events = self.events, []
        return out


def _stage_task(name: str, key: str, inputs: dict, data_dir: str) -> dict:
    return stages_mod.run_stage(name, key, inputs, data_dir)


def _trial_task(trial_id: str, config: dict, data_dir: str, save_artifact: bool, sink, threads: float,
                *stage_results) -> dict:
    def emit(kind: str, payload: dict) -> None:
        if sink is not None:
            sink.push.remote(trial_id, kind, payload)

    device = "cpu"
    if ray.get_gpu_ids():
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"  # a node may advertise GPUs torch cannot use
    shared = [{"stage": s.get("stage"), "key": s.get("key"), "hit": s.get("hit", True),
               "computed_by": s.get("pid")} for s in stage_results]
    return execute_trial(trial_id, config, data_dir, save_artifact=save_artifact, emit=emit, device=device,
                         threads=threads, stages=shared)


stage_remote = ray.remote(_stage_task)
trial_remote = ray.remote(_trial_task)


def connect(address: str | None = None, num_cpus: int | None = None, num_gpus: int | None = None,
            worker_logs: bool = False) -> bool:
    """Join ``address`` or start a local Ray instance; returns True when this process started it (and
    so must shut it down). An instance that is already up in this process is reused."""
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    if address:
        ray.init(address=address, logging_level=logging.ERROR, log_to_driver=worker_logs)
        return True
    total = os.cpu_count() or 1
    ray.init(num_cpus=num_cpus or total, num_gpus=num_gpus, include_dashboard=False,
             object_store_memory=256 * 1024 ** 2, logging_level=logging.ERROR, log_to_driver=worker_logs)
    return True


def shutdown(owned: bool) -> None:
    if owned and ray.is_initialized():
        ray.shutdown()


def cluster_summary() -> dict:
    res = ray.cluster_resources()
    return {"nodes": len([n for n in ray.nodes() if n.get("Alive")]), "cpus": res.get("CPU", 0),
            "gpus": res.get("GPU", 0)}


def largest_node_cpus() -> float:
    """The CPUs of the biggest alive node: what a task asks for to have a whole node to itself."""
    cpus = [n.get("Resources", {}).get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")]
    return max(cpus) if cpus else 1.0


def check_feasible(resources: dict) -> None:
    """Refuse a sweep whose trials fit on no node: Ray would keep them pending forever."""
    need = {"CPU": resources.get("cpu", 1), "GPU": resources.get("gpu", 0) or 0, **(resources.get("custom") or {})}
    if resources.get("memory_gb"):
        need["memory"] = resources["memory_gb"] * 1024 ** 3
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    if any(all(n.get(k, 0) >= v for k, v in need.items() if v) for n in nodes):
        return
    have = "; ".join(", ".join(f"{k} {v:g}" for k, v in sorted(n.items()) if k in need) or "nothing" for n in nodes)
    wanted = ", ".join(f"{k} {v:g}" for k, v in need.items() if v)
    raise ValueError(f"no node of the Ray cluster can run a trial that needs {wanted} (nodes have: {have}); "
                     "join a cluster that has them with --address, or lower resources: in the sweep file")


@dataclass
class Job:
    trial_id: str
    config: dict
    stages: list = field(default_factory=list)  # (name, key, inputs)


class Runner:
    """Submits trials (and the shared stages they need) and turns Ray's answers into events:
    ``("started", id, info)``, ``("step", id, step)``, ``("finished", id, result)``,
    ``("failed", id, {"error", "traceback", "kind"})``."""

    def __init__(self, data_dir: str, resources: dict, retries: int = 2, max_in_flight: int | None = None,
                 save_artifacts: bool = True):
        self.data_dir = str(data_dir)
        self.resources = resources
        self.retries = retries
        self.max_in_flight = max_in_flight
        self.save_artifacts = save_artifacts
        self.queue: list[Job] = []
        self.pending: dict = {}  # ObjectRef -> trial id
        self.stage_refs: dict = {}  # (name, key) -> ObjectRef or summary dict
        self.sink = EventSink.remote()

    def _options(self) -> dict:
        r = self.resources
        opts = {"num_cpus": r.get("cpu", 1), "num_gpus": r.get("gpu", 0) or 0, "max_retries": self.retries,
                "retry_exceptions": False}
        if r.get("memory_gb"):
            opts["memory"] = int(r["memory_gb"] * 1024 ** 3)
        if r.get("custom"):
            opts["resources"] = dict(r["custom"])
        return opts

    def add(self, jobs: list[Job]) -> None:
        from ..core.layout import DataLayout

        cache = DataLayout(self.data_dir).stage_cache()
        for job in jobs:
            for name, key, inputs in job.stages:
                if (name, key) in self.stage_refs:
                    continue
                done = cache.peek(name, key)
                if done is not None:
                    import json

                    self.stage_refs[(name, key)] = {**json.loads((done / "meta.json").read_text()), "hit": True}
                else:
                    self.stage_refs[(name, key)] = stage_remote.options(
                        num_cpus=self.resources.get("cpu", 1), max_retries=self.retries,
                        retry_exceptions=False).remote(name, key, inputs, self.data_dir)
        self.queue.extend(jobs)
        self._fill()

    def _fill(self) -> None:
        opts = self._options()
        while self.queue and (self.max_in_flight is None or len(self.pending) < self.max_in_flight):
            job = self.queue.pop(0)
            deps = [self.stage_refs[(n, k)] for n, k, _ in job.stages]
            ref = trial_remote.options(**opts, name=f"trial-{job.trial_id[:8]}").remote(
                job.trial_id, job.config, self.data_dir, self.save_artifacts, self.sink,
                self.resources.get("cpu", 1), *deps)
            self.pending[ref] = job.trial_id

    @property
    def active(self) -> bool:
        return bool(self.pending or self.queue)

    def poll(self, timeout: float = 0.5) -> list[tuple]:
        events: list[tuple] = []
        ready = []
        if self.pending:
            refs = list(self.pending)
            first, _ = ray.wait(refs, num_returns=1, timeout=timeout)
            if first:
                ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        else:
            time.sleep(min(timeout, 0.05))
        try:
            events.extend((tid, kind, payload) for tid, kind, payload in ray.get(self.sink.drain.remote()))
        except (ray.exceptions.ActorUnavailableError, ray.exceptions.ActorDiedError):
            # The sink restarts (max_restarts=-1) when its worker dies, e.g. killed by Ray's memory monitor on a
            # full machine; only progress events of that moment are lost, results come through the task refs.
            pass
        results = []
        for ref in ready:
            tid = self.pending.pop(ref)
            try:
                results.append((tid, "finished", ray.get(ref)))
            except ray.exceptions.RayTaskError as e:
                cause = getattr(e, "cause", None) or e
                msg, tb = format_exception(cause) if isinstance(cause, BaseException) else (str(e), str(e))
                results.append((tid, "failed", {"error": msg, "traceback": str(e), "kind": "exception"}))
            except (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError,
                    ray.exceptions.OutOfMemoryError, ray.exceptions.LocalRayletDiedError) as e:
                msg = f"{type(e).__name__}: the worker died {self.retries + 1} time(s), retries exhausted"
                results.append((tid, "failed", {"error": msg, "traceback": str(e), "kind": "worker"}))
            except ray.exceptions.TaskCancelledError as e:
                results.append((tid, "failed", {"error": "cancelled", "traceback": str(e), "kind": "cancelled"}))
            except ray.exceptions.RayError as e:
                results.append((tid, "failed", {"error": f"{type(e).__name__}: {str(e).splitlines()[0]}",
                                                "traceback": str(e), "kind": "ray"}))
        self._fill()  # keep workers busy before the driver spends time logging
        return events + results

    def cancel(self) -> list[str]:
        """Stop everything still queued or running; returns the trial ids that were in flight."""
        ids = list(self.pending.values())
        for ref in list(self.pending):
            try:
                ray.cancel(ref, force=True)
            except Exception:  # already finished, or Ray is going down: nothing left to stop
                pass
        self.pending.clear()
        self.queue.clear()
        return ids
