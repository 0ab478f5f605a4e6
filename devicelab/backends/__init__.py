"""Backends by kind. Each backend module exposes ``from_entry(entry: DeviceEntry) -> Device`` and is
imported only when a device of its kind is built, so a missing optional package (adbutils, qai-hub,
onnxruntime-qnn) affects only that kind.
"""

from __future__ import annotations

import importlib

from ..inventory import DeviceEntry
from ..protocol import Device, DeviceError

MODULES = {"host": "devicelab.backends.host", "qnn-sim": "devicelab.backends.qnn_sim",
           "adb": "devicelab.backends.adb", "aihub": "devicelab.backends.aihub"}


def create(entry: DeviceEntry) -> Device:
    """The backend instance of an inventory entry; DeviceError naming the device when its backend is
    not available here."""
    if entry.kind not in MODULES:
        raise DeviceError(f"device {entry.name!r}: unknown kind {entry.kind!r} (kinds: {', '.join(MODULES)})")
    try:
        mod = importlib.import_module(MODULES[entry.kind])
    except ImportError as e:
        raise DeviceError(f"device {entry.name!r}: the {entry.kind} backend cannot load here ({e})") from None
    factory = getattr(mod, "from_entry", None)
    if factory is None:
        raise DeviceError(f"device {entry.name!r}: backend module {MODULES[entry.kind]} has no from_entry()")
    return factory(entry)
