"""``qnn-sim``: the QNN HTP backend of ``onnxruntime-qnn``, which on x86 *emulates* the Snapdragon NPU.

It runs the QDQ graph with the NPU's integer arithmetic, so its outputs are what the phone computes (up
to the emulator's fidelity), which makes it the checking device. Its times are emulation times (tens of
ms for a tiny MatMul): every record says ``latency_meaningful=False`` and reports must never show them as
latency. CPU fallback is disabled, so a graph that the HTP cannot take fully fails at prepare, naming the
device, instead of silently running partly on the CPU.

Registration (onnxruntime's plug-in EP API): ``register_execution_provider_library("QNNExecutionProvider", path)`` once per
process, then ``SessionOptions.add_provider_for_devices(qnn_devices, {"backend_type": "htp",
"soc_model": "57", "htp_arch": "75"})``; 57/v75 is SM8650 (Snapdragon 8 Gen 3).
"""

from __future__ import annotations

import os
import sys
import threading
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

from ..inventory import DeviceEntry
from ..protocol import Device, DeviceError, DeviceInfo, Health, Measurement, Workload
from .ort_session import PreparedExport, infer, measure, prepare_export

EP_NAME = "QNNExecutionProvider"
SOCS = {"57": "SM8650", "43": "SM8550", "36": "SM8450"}  # QNN soc_model ids of the Snapdragon 8 Gen 3/2/1
_lock = threading.Lock()
_registered = False


@contextmanager
def _native_stdout_to_stderr():
    """QNN's native libraries print banners on fd 1; they must not mix into a command's JSON on stdout."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def qnn_ep_devices() -> list:
    """The QNN EP's devices, registering the plug-in library on first use (once per process)."""
    global _registered
    import onnxruntime as ort

    with _lock:
        if not _registered:
            try:
                import onnxruntime_qnn
            except ImportError as e:
                raise DeviceError(f"qnn-sim: onnxruntime-qnn is not installed ({e}); "
                                  "pip install 'mobilequant-farm[device]'") from None
            try:
                with _native_stdout_to_stderr():
                    ort.register_execution_provider_library(EP_NAME, onnxruntime_qnn.get_library_path())
            except Exception as e:  # registered already by someone else in this process
                if "already" not in str(e).lower():
                    raise DeviceError(f"qnn-sim: cannot register the QNN execution provider: {e}") from e
            _registered = True
    devs = [d for d in ort.get_ep_devices() if d.ep_name == EP_NAME]
    if not devs:
        raise DeviceError("qnn-sim: onnxruntime lists no QNN execution provider device after registration")
    return devs


class QnnSimDevice(Device):
    kind = "qnn-sim"

    def __init__(self, name: str = "qnn-sim", soc_model: str = "57", htp_arch: str = "75"):
        self.name, self.soc_model, self.htp_arch = name, str(soc_model), str(htp_arch)

    def info(self) -> DeviceInfo:
        import platform

        try:
            version = metadata.version("onnxruntime-qnn")
        except metadata.PackageNotFoundError:
            version = ""
        soc = SOCS.get(self.soc_model, f"soc_model {self.soc_model}")
        return DeviceInfo(name=self.name, kind=self.kind, model="QNN HTP emulator", soc=f"{soc} (emulated)",
                          os_build=f"{platform.system()} {platform.release()} {platform.machine()}",
                          runtime="onnxruntime-qnn", runtime_version=version,
                          extra={"soc_model": self.soc_model, "htp_arch": f"v{self.htp_arch}"})

    def health(self) -> Health:
        try:
            qnn_ep_devices()
        except DeviceError as e:
            return Health(online=False, detail=str(e))
        return Health(online=True)

    def session(self, path: Path):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
        so.add_provider_for_devices(qnn_ep_devices(), {"backend_type": "htp", "soc_model": self.soc_model,
                                                       "htp_arch": self.htp_arch})
        with _native_stdout_to_stderr():
            return ort.InferenceSession(str(path), so)

    def prepare(self, model: Path) -> PreparedExport:
        try:
            return prepare_export(Path(model), self.session, self.name)
        except DeviceError as e:
            if "fallback to CPU EP has been explicitly disabled" not in str(e):
                raise
            # onnxruntime's error says only that some node fell back; its QNN EP logged which ones (stderr)
            raise DeviceError(f"{e}; the HTP cannot run every node of this graph (the QNN EP's "
                              "'Unsupported nodes in QNN EP' log line above names them)") from None

    def run(self, prepared: PreparedExport, workload: Workload) -> Measurement:
        return measure(self.info(), prepared, workload, latency_meaningful=False,
                       extra={"note": "HTP emulator on x86: outputs are the NPU's arithmetic, times are not latency"})

    def outputs(self, prepared: PreparedExport, graph: str, feeds: dict | None = None) -> dict:
        return infer(prepared, self.name, graph, feeds)


def from_entry(entry: DeviceEntry) -> QnnSimDevice:
    o = entry.options
    return QnnSimDevice(entry.name, soc_model=o.get("soc_model", "57"), htp_arch=o.get("htp_arch", "75"))
