"""The device pool: find devices by name or kind, keep one benchmark per device at a time, and retry a
measurement whose device disappeared on another device of the same kind.

* ``resolve(target)``: ``target`` is a device name from the inventory, or a kind (``host``, ``qnn-sim``,
  ``adb``, ``aihub``), which means any available device of that kind;
* one benchmark per device: an exclusive ``flock`` on ``<lock_dir>/<device>.lock`` held for the whole
  prepare + run, so it also holds between processes (two ``farm bench``, a sweep's Ray workers on one
  node). Ray's custom resources (``phone:sm8650``) keep a cluster from over-booking a node's phones; the
  lock is what keeps two processes off one phone;
* a :class:`DeviceLost` while preparing or running turns into a failed record (status ``failed``, the
  error, the device's identity) and the workloads go to the next device of the target; records already
  taken stay.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import backends, stats
from .inventory import KINDS, DeviceEntry, Inventory
from .protocol import Device, DeviceError, DeviceInfo, DeviceLost, Health, Measurement, Workload


class PoolError(ValueError):
    """A target that names no usable device; the message lists what exists."""


class DeviceBusy(DeviceError):
    """Another benchmark held the device for longer than the wait allowed."""


def lock_path(lock_dir: Path, name: str) -> Path:
    # device names carry spaces and parentheses ("aihub:Samsung Galaxy S24 (Family)"): keep a readable
    # stem and a hash so that two names never share a lock file
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")[:60] or "device"
    return Path(lock_dir) / f"{stem}-{hashlib.sha256(name.encode()).hexdigest()[:8]}.lock"


@contextmanager
def device_lock(lock_dir: Path, name: str, timeout: float | None = None,
                on_wait: Callable[[str], None] | None = None, poll_s: float = 0.05):
    """Hold device ``name`` exclusively; yields the seconds spent waiting. ``timeout`` None waits forever."""
    path = lock_path(lock_dir, name)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(path, "a")
    except OSError as e:  # a lock_dir that cannot be written: one line naming it, not a traceback
        raise PoolError(f"lock_dir {lock_dir}: cannot hold the lock of device {name!r} there "
                        f"({e.strerror or e}); set lock_dir in the devices file to a writable folder") from None
    with fh:
        t0 = time.monotonic()
        told = False
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not told and on_wait is not None:
                    on_wait(name)
                    told = True
                if timeout is not None and time.monotonic() - t0 > timeout:
                    raise DeviceBusy(f"device {name!r} is busy with another benchmark (lock {path}) for more "
                                     f"than {timeout:g}s") from None
                time.sleep(poll_s)
        try:
            yield time.monotonic() - t0
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _is_free(lock_dir: Path, name: str) -> bool:
    path = lock_path(lock_dir, name)
    if not path.exists():
        return True
    with open(path, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(fh, fcntl.LOCK_UN)
        return True


def failed_record(info: DeviceInfo, workload: Workload, error: str, model_id: str = "") -> Measurement:
    return Measurement(device=info, workload=workload, model_id=model_id, status="failed", error=error)


@dataclass
class BenchResult:
    records: list[Measurement]  # one ok record per workload measured, in order
    failed: list[Measurement] = field(default_factory=list)  # one per device lost on the way
    device: str = ""  # the device that measured the last record
    wanted: int = 0  # workloads asked for

    @property
    def ok(self) -> bool:
        return len(self.records) == self.wanted


class Pool:
    """Devices of an inventory. ``devices`` pre-built Device objects by name (tests inject stand-ins);
    the others are built from their entries when first used."""

    def __init__(self, inventory: Inventory, devices: dict[str, Device] | None = None,
                 lock_timeout: float | None = None, on_event: Callable[[str], None] | None = None):
        self.inventory = inventory
        self._devices: dict[str, Device] = dict(devices or {})
        self.lock_timeout = lock_timeout
        self.on_event = on_event or (lambda msg: None)

    # ------------------------------------------------------------ finding devices
    def resolve(self, target: str) -> list[DeviceEntry]:
        """The entries ``target`` names: one for a device name, all of a kind for a kind."""
        entry = self.inventory.get(target)
        if entry is not None:
            return [entry]
        of_kind = [e for e in self.inventory.entries if e.kind == target]
        if of_kind:
            return of_kind
        where = f" ({self.inventory.path})" if self.inventory.path else " (no devices file: defaults)"
        if target in KINDS:
            raise PoolError(f"no {target} device is configured{where}; kinds with devices: "
                            f"{', '.join(self.inventory.kinds())}")
        raise PoolError(f"unknown device {target!r}{where}; devices: {', '.join(self.inventory.names())}; "
                        f"or a kind: {', '.join(self.inventory.kinds())}")

    def device(self, entry: DeviceEntry) -> Device:
        if entry.name not in self._devices:
            self._devices[entry.name] = backends.create(entry)
        return self._devices[entry.name]

    def health(self, entry: DeviceEntry) -> Health:
        """The device's health; an error while asking is an offline device with the error as detail."""
        try:
            return self.device(entry).health()
        except DeviceError as e:
            return Health(online=False, detail=str(e))

    def available(self, target: str) -> list[DeviceEntry]:
        """The target's devices that are online, free ones first; PoolError when none is."""
        entries = self.resolve(target)
        ok, why = [], []
        for e in entries:
            h = self.health(e)
            if h.online:
                ok.append(e)
            else:
                why.append(f"{e.name}: {h.detail or 'offline'}")
        if not ok:
            kinds = sorted({e.kind for e in self.inventory.entries if self.health(e).online})
            raise PoolError(f"no available device for {target!r} ({'; '.join(why)}); kinds with an available "
                            f"device: {', '.join(kinds) or 'none'}")
        return sorted(ok, key=lambda e: not _is_free(self.inventory.lock_dir, e.name))

    # ------------------------------------------------------------ measuring
    def bench(self, export: Path, target: str, workloads: list[Workload], windows=None) -> BenchResult:
        """Measure ``workloads`` on one device of ``target`` (all of them on the same device, under one
        lock). DeviceLost moves every workload not yet measured to the next device; other errors (a bad
        export, too little storage) propagate, naming the device. ``windows``: token ids of real text for
        the devices whose inputs are files (phones: ``prepare(export, windows=...)``)."""
        result = BenchResult([], wanted=len(workloads))
        pending = list(workloads)
        candidates = self.available(target)
        for i, entry in enumerate(candidates):
            dev = self.device(entry)
            with device_lock(self.inventory.lock_dir, entry.name, self.lock_timeout,
                             on_wait=lambda n: self.on_event(f"waiting for {n}: another benchmark holds it")) as waited:
                try:
                    self.on_event(f"{entry.name}: preparing {export}")
                    prepared = _prepare(dev, Path(export), windows)
                    while pending:
                        w = pending[0]
                        self.on_event(f"{entry.name}: {w.graph}, {w.warmup} warm-up + {w.repeats} runs")
                        t0 = time.time()
                        rec = dev.run(prepared, w)
                        rec.extra.update(lock_wait_s=round(waited, 3), started_at=t0, ended_at=time.time())
                        result.records.append(rec)
                        result.device = entry.name
                        pending.pop(0)
                except DeviceLost as e:
                    result.failed.append(failed_record(_safe_info(dev, entry), pending[0], f"device lost: {e}"))
                    left = len(candidates) - i - 1
                    self.on_event(f"{entry.name}: lost ({e}); " + (f"retrying on another {entry.kind} device"
                                                                    if left else "no other device to retry on"))
                finally:
                    try:
                        dev.close()
                    except Exception:  # a lost device may fail to close: the record says what happened
                        pass
            if not pending:
                break
        return result


    def compare(self, exports: dict[str, Path], target: str, workload: Workload, rounds: int = 5,
                windows=None) -> dict:
        """Variants (label -> export folder) measured on ONE device of ``target``, interleaved: ``rounds``
        rounds of A, B, A, B, ... each running ``ceil(repeats / rounds)`` timed runs (warm-up in the first
        round only), so the device's drift (heat, clocks, background load) is shared by every variant
        instead of charged to whichever ran second. Returns label -> Measurement over all its samples.
        A device lost mid-comparison raises: half a comparison on two devices would compare devices.

        A device with ``compare_blocks`` (phones) runs the rounds as alternating blocks in one session of
        its own (one battery check, one cool-down, one process per block) and returns the same records."""
        if len(exports) < 2:
            raise ValueError("compare needs at least two exports")
        if rounds < 1:
            raise ValueError(f"rounds must be at least 1, got {rounds}")
        entry = self.available(target)[0]
        dev = self.device(entry)
        per = -(-workload.repeats // rounds)
        with device_lock(self.inventory.lock_dir, entry.name, self.lock_timeout,
                         on_wait=lambda n: self.on_event(f"waiting for {n}: another benchmark holds it")):
            prepared = {label: _prepare(dev, Path(p), windows) for label, p in exports.items()}
            if hasattr(dev, "compare_blocks"):
                return dev.compare_blocks(prepared, workload, rounds)
            parts: dict[str, list[Measurement]] = {label: [] for label in exports}
            for r in range(rounds):
                for label in exports:
                    w = dataclasses.replace(workload, repeats=per, warmup=workload.warmup if r == 0 else 0)
                    parts[label].append(dev.run(prepared[label], w))
                self.on_event(f"{entry.name}: round {r + 1}/{rounds} of {', '.join(exports)}")
        out = {}
        for label, recs in parts.items():
            first = recs[0]
            samples = [s for rec in recs for s in rec.samples_ms]
            summary = stats.summarize(samples)
            tps = 1000.0 / summary["median_ms"] if first.tokens_per_s is not None else None
            wl = dataclasses.replace(first.workload, repeats=len(samples), warmup=workload.warmup)
            energy = [r.energy_mj_per_token for r in recs if r.energy_mj_per_token is not None]
            power = [r.power_mw for r in recs if r.power_mw is not None]
            out[label] = dataclasses.replace(
                first, workload=wl, samples_ms=samples, tokens_per_s=tps,
                energy_mj_per_token=stats.median(energy) if energy else None,
                power_mw=stats.median(power) if power else None,
                extra={**first.extra, "variant": label, "interleaved": {"rounds": rounds, "variants": list(exports)}},
                **summary)
            if "prefill_tok_s" in first.extra:
                out[label].extra["prefill_tok_s"] = wl.prompt_len / (summary["median_ms"] / 1000.0)
        return out


def _prepare(dev: Device, export: Path, windows):
    """``windows`` go to the devices whose inputs are files (their ``prepare`` takes them); the others
    synthesize inputs from export.json."""
    import inspect

    if windows is not None and "windows" in inspect.signature(dev.prepare).parameters:
        return dev.prepare(export, windows=windows)
    return dev.prepare(export)


def _safe_info(dev: Device, entry: DeviceEntry) -> DeviceInfo:
    try:
        return dev.info()
    except Exception:  # the device is gone: its identity from the inventory is all there is
        return DeviceInfo(name=entry.name, kind=entry.kind, extra=dict(entry.options))
