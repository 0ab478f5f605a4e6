"""``host``: onnxruntime on this machine's CPU, pinned (devicelab.timing). Always present: the stand-in
device for a sweep that has no phone, and the reference the other backends' outputs are checked against.

Identity: the CPU model from /proc/cpuinfo (the platform's processor name elsewhere), the machine
architecture, the OS and kernel, onnxruntime's version. Health: online, free storage in the temporary
folder; no battery, temperature or charging (None: not a phone). Power is not measured (no sensor that
every host has), so records carry no energy.
"""

from __future__ import annotations

import os
import platform
import shutil
import tempfile
from pathlib import Path

from ..inventory import DeviceEntry
from ..protocol import Device, DeviceInfo, Health, Measurement, Workload
from ..timing import cpu_session, pinned
from .ort_session import PreparedExport, infer, measure, prepare_export


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class HostDevice(Device):
    kind = "host"

    def __init__(self, name: str = "host", threads: int = 1, pin: bool = True):
        self.name, self.threads, self.pin = name, max(1, int(threads)), pin

    def info(self) -> DeviceInfo:
        import onnxruntime as ort

        return DeviceInfo(name=self.name, kind=self.kind, model=cpu_model(), soc=platform.machine(),
                          os_build=f"{platform.system()} {platform.release()} ({platform.platform()})",
                          runtime="onnxruntime", runtime_version=ort.__version__,
                          extra={"cores": os.cpu_count(), "threads": self.threads, "pinned": self.pin,
                                 "python": platform.python_version()})

    def health(self) -> Health:
        free = shutil.disk_usage(tempfile.gettempdir()).free
        return Health(online=True, free_storage_bytes=int(free))

    def prepare(self, model: Path) -> PreparedExport:
        # pinning happens around the timing, not here: the session's thread pool is created unpinned
        return prepare_export(Path(model), lambda p: cpu_session(p, self.threads, pin=False)[0], self.name)

    def run(self, prepared: PreparedExport, workload: Workload) -> Measurement:
        with pinned(self.threads) if self.pin else _nothing() as cores:
            rec = measure(self.info(), prepared, workload, latency_meaningful=True,
                          extra={"pinned_cores": cores, "power": "not measured on the host"})
        return rec

    def outputs(self, prepared: PreparedExport, graph: str, feeds: dict | None = None) -> dict:
        return infer(prepared, self.name, graph, feeds)


class _nothing:
    def __enter__(self):
        return []

    def __exit__(self, *exc):
        return False


def from_entry(entry: DeviceEntry) -> HostDevice:
    return HostDevice(entry.name, threads=entry.options.get("threads", 1), pin=entry.options.get("pin", True))
