"""A sweep file's ``devices:`` entries resolved on the driver, against the devices file it reads, into
device jobs: the workloads to measure, the SoC to compile for, and the Ray resources that put the job on
the node the phone hangs on."""

from __future__ import annotations

import re
from dataclasses import dataclass

PHONE_KINDS = ("adb",)  # kinds that run a compiled model and live on a node's USB bus
# kinds whose measurement is the node's own CPU: nothing else may run on the node while they measure
HOST_KINDS = {"host"}


@dataclass(frozen=True)
class DeviceJob:
    """One device entry of a sweep file, resolved on the driver."""

    target: str  # device name or kind, as the sweep file says
    label: str  # the metric-safe form of target
    workloads: tuple  # Workload dicts
    prefill: int
    ctx: int
    resources: dict  # Ray resources beyond the CPU (phone:<soc>)
    compile_target: str | None  # the SoC to compile for, None when the device runs the export as is
    devices_file: str  # the inventory file the driver read ("" = defaults)
    exclusive_node: bool = False  # the job measures the node's CPU: it takes the whole node when it runs


def label(target: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", target).strip("_") or "device"


@dataclass(frozen=True)
class DevicePlan:
    """The sweep's device targets: ``jobs`` to run and ``skipped`` (target, why) for kinds the pool has no
    device of (a sweep file written for a cluster with phones still runs on a laptop, and says what it
    left out)."""

    jobs: list
    skipped: list

    def notes(self) -> list[str]:
        return [f"device {t}: skipped ({why})" for t, why in self.skipped]


def plan_devices(specs: list, devices_file: str | None = None) -> DevicePlan:
    """The sweep's ``devices:`` entries as jobs. A *kind* the pool has no device of is skipped with the
    reason; a *name* the inventory lacks, or a target mixing SoCs, is an error here, on the driver, before
    any trial runs."""
    from devicelab import inventory
    from devicelab.pool import Pool, PoolError

    inv = inventory.load(devices_file)
    pool = Pool(inv)
    jobs, skipped = [], []
    for spec in specs:
        try:
            entries = pool.resolve(spec.device)
        except PoolError as e:
            if spec.device in inventory.KINDS:
                skipped.append((spec.device, str(e)))
                continue
            raise
        kinds = {e.kind for e in entries}
        resources = dict(spec.resources)
        compile_target = None
        if kinds & set(PHONE_KINDS):
            socs = {str(e.options.get("soc") or "SM8650").lower() for e in entries}
            if len(socs) > 1:
                raise ValueError(f"device target {spec.device!r} mixes phones of SoCs {', '.join(sorted(socs))}; "
                                 "name one phone or give each SoC its own entry")
            compile_target = socs.pop()
            if not resources:
                resources = {f"phone:{compile_target}": 1}
        workloads = tuple({"graph": g, "warmup": spec.warmup, "repeats": spec.repeats, "tokens": spec.tokens,
                           "allow_charging": spec.allow_charging} for g in spec.graphs)
        jobs.append(DeviceJob(spec.device, label(spec.device), workloads, spec.prefill, spec.ctx, resources,
                              compile_target, str(inv.path.resolve()) if inv.path else "",
                              exclusive_node=kinds <= HOST_KINDS))
    return DevicePlan(jobs, skipped)


def plan_jobs(specs: list, devices_file: str | None = None) -> list[DeviceJob]:
    """The jobs of :func:`plan_devices` (skipped kinds left out)."""
    return plan_devices(specs, devices_file).jobs
