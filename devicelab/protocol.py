"""The one small protocol every device backend implements, and the record a measurement returns.

A backend (``host``, ``qnn-sim``, ``adb``, ``aihub``) is a :class:`Device`:

* ``info()``: who it is (model, SoC, OS build, runtime and its version), cheap, never runs a model;
* ``health()``: whether it can take work now (online, battery, temperature, charging, free storage);
* ``prepare(model)``: put a model (an export folder's graph, or its compiled form) where the device can run
  it and return a handle; raises :class:`DeviceError` naming the device when it cannot (too little storage);
* ``run(prepared, workload)``: run the workload and return a :class:`Measurement`.

Records are plain data (``to_dict``/``from_dict``) so they cross Ray, land in MLflow and JSON files, and are
read back by reports without importing this package. Every record carries the device identity and says
whether its latency means anything (``latency_meaningful``: the QNN HTP emulator runs the NPU's arithmetic
on x86 at emulation speed, so its times must never be read or plotted as latency).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

RECORD_VERSION = 1


class DeviceError(RuntimeError):
    """A device cannot do what was asked; the message names the device and the fault."""


class DeviceLost(DeviceError):
    """The device disappeared mid-run (unplugged, adb offline): the pool retries on another of its kind."""


@dataclass
class DeviceInfo:
    name: str  # unique in the pool: "host", "qnn-sim", "pixel8-1", "aihub:Samsung Galaxy S24 (Family)"
    kind: str  # backend: host | qnn-sim | adb | aihub
    model: str = ""  # phone model or CPU model
    soc: str = ""  # "SM8650" / "Snapdragon 8 Gen 3" / "x86_64"
    os_build: str = ""  # Android build fingerprint, or the host's kernel/OS
    runtime: str = ""  # onnxruntime / qnn-net-run / genie-t2t-run / qai-hub
    runtime_version: str = ""
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DeviceInfo":
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


@dataclass
class Health:
    online: bool
    battery_pct: float | None = None
    temperature_c: float | None = None
    charging: bool | None = None
    free_storage_bytes: int | None = None
    detail: str = ""  # why it is not usable, in words

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Workload:
    """What to run. ``graph``: ``prefill`` (a prompt of ``prompt_len`` tokens) or ``decode`` (one token
    against a cache of ``ctx`` positions; ``tokens`` steps give tokens/s)."""

    graph: str = "prefill"
    prompt_len: int = 128
    tokens: int = 16
    warmup: int = 3
    repeats: int = 20
    threads: int = 1
    measure_power: bool = True
    allow_charging: bool = False

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Workload":
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


@dataclass
class Measurement:
    device: DeviceInfo
    workload: Workload
    model_id: str = ""  # the export's content hash (export.json), so records of one model group together
    status: str = "ok"  # ok | failed
    error: str = ""
    latency_meaningful: bool = True
    samples_ms: list = field(default_factory=list)  # one per repeat, in run order
    median_ms: float | None = None
    p90_ms: float | None = None
    ci_low_ms: float | None = None  # bootstrap confidence interval of the median
    ci_high_ms: float | None = None
    ci_level: float = 0.95
    tokens_per_s: float | None = None  # decode: tokens / second from the median step
    power_mw: float | None = None  # average power above the idle baseline, while the workload ran
    energy_mj_per_token: float | None = None
    peak_memory_bytes: int | None = None
    compute_units: dict = field(default_factory=dict)  # e.g. {"NPU": 812, "CPU": 3} ops per unit (AI Hub)
    extra: dict = field(default_factory=dict)
    record_version: int = RECORD_VERSION

    def to_dict(self) -> dict:
        d = asdict(self)
        d["device"] = self.device.to_dict()
        d["workload"] = self.workload.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Measurement":
        kw = {f.name: d[f.name] for f in fields(cls) if f.name in d}
        kw["device"] = DeviceInfo.from_dict(d["device"])
        kw["workload"] = Workload.from_dict(d["workload"])
        return cls(**kw)


class Device(ABC):
    """A backend instance. ``name`` is unique in the pool, ``kind`` names the backend."""

    name: str
    kind: str

    @abstractmethod
    def info(self) -> DeviceInfo: ...

    @abstractmethod
    def health(self) -> Health: ...

    @abstractmethod
    def prepare(self, model: Path) -> object:
        """``model``: an ONNX file (QDQ or EPContext) or a compiled folder; returns an opaque handle."""

    @abstractmethod
    def run(self, prepared: object, workload: Workload) -> Measurement: ...

    def close(self) -> None:  # release sessions, connections
        pass
