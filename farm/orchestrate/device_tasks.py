"""The device stage on the driver: one Ray task per (trial, device target), and their answers as events.

Each (trial, device) is one Ray task that asks for the device's resources: ``{"CPU": 1}`` plus, for a
phone, the custom resource its node advertises (``phone:<soc>``, e.g. ``ray start --resources
'{"phone:sm8650": 2}'`` on the machine the phones hang on), so it lands on that node and Ray never books
a phone twice; the pool's file lock keeps processes off a phone that another benchmark holds.
"""

from __future__ import annotations

from typing import Callable

from ..core.errors import format_exception
from ..plan.devices import DeviceJob
from ..work.device_job import run_device_job


def _device_task(trial_id, artifact_dir, artifact_key, job, data_dir, exporter, compiler):
    return run_device_job(trial_id, artifact_dir, artifact_key, job, data_dir, exporter, compiler)


class DeviceJobs:
    """Submits one Ray task per (trial, device target) once the trial has an artifact, and turns their
    answers into ``(trial id, "device", summary)`` events; a task that raises is a summary with ``ok``
    False and the error, so one device never costs a trial its other results."""

    def __init__(self, jobs: list[DeviceJob], data_dir: str, retries: int = 2, exporter: Callable | None = None,
                 compiler: Callable | None = None):
        import ray

        from . import scheduler

        self.jobs, self.data_dir, self.retries = jobs, str(data_dir), retries
        self.exporter, self.compiler = exporter, compiler
        self.pending: dict = {}  # ObjectRef -> (trial id, job)
        self._remote = ray.remote(_device_task)
        for job in jobs:  # a phone resource no node advertises would leave the stage pending forever
            scheduler.check_feasible({"cpu": 1, "custom": job.resources})

    @property
    def active(self) -> bool:
        return bool(self.pending)

    def submit(self, trial_id: str, artifact_dir: str, artifact_key: str, only: set | None = None) -> int:
        n = 0
        for job in self.jobs:
            if only is not None and job.label not in only:
                continue
            opts = {"num_cpus": 1, "max_retries": self.retries, "retry_exceptions": False,
                    "name": f"device-{trial_id[:8]}-{job.label}"}
            if job.resources:
                opts["resources"] = dict(job.resources)
            ref = self._remote.options(**opts).remote(trial_id, artifact_dir, artifact_key, job, self.data_dir,
                                                      self.exporter, self.compiler)
            self.pending[ref] = (trial_id, job)
            n += 1
        return n

    def poll(self, timeout: float = 0.0) -> list[tuple]:
        import ray

        if not self.pending:
            return []
        ready, _ = ray.wait(list(self.pending), num_returns=len(self.pending), timeout=timeout)
        out = []
        for ref in ready:
            tid, job = self.pending.pop(ref)
            try:
                summary = ray.get(ref)
            except ray.exceptions.RayTaskError as e:
                cause = getattr(e, "cause", None) or e
                msg = format_exception(cause)[0] if isinstance(cause, BaseException) else str(e)
                summary = {"trial_id": tid, "target": job.target, "label": job.label, "ok": False, "error": msg,
                           "records": [], "failed": []}
            except ray.exceptions.RayError as e:
                summary = {"trial_id": tid, "target": job.target, "label": job.label, "ok": False,
                           "error": f"{type(e).__name__}: {str(e).splitlines()[0]}", "records": [], "failed": []}
            out.append((tid, "device", summary))
        return out

    def cancel(self) -> None:
        import ray

        for ref in list(self.pending):
            try:
                ray.cancel(ref, force=True)
            except Exception:  # finished already, or Ray is going down
                pass
        self.pending.clear()
