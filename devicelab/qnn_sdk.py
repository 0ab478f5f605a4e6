"""What the QNN SDK (QAIRT) asks of a phone run: the files to push, the version rule, and qnn-net-run's command.

Sources (Qualcomm AI Engine Direct SDK, "Tools" page, ``qnn-net-run`` and ``qnn-profile-viewer``,
https://docs.qualcomm.com/bundle/publicresource/topics/80-63442-50/tools.html):

* REQUIRED ARGUMENTS of qnn-net-run: ``--model`` or ``--retrieve_context`` (mutually exclusive),
  ``--backend`` and ``--input_list`` ("Path to a file listing the inputs for the network"); each line of
  the list is one inference's inputs, ``name:=path`` entries separated by spaces;
* ``--num_inferences N`` "loops over the input_list until the number of inferences has transpired", so one
  process (one context load) serves a whole block of measurements; ``--keep_num_outputs K``: "once the
  number of outputs reach the limit, subsequent outputs would be just discarded"; ``--shared_buffer``:
  graph I/O in buffers shared with the coprocessor (no copy per inference); ``--config_file`` the backend
  extensions JSON (``libQnnHtpNetRunExtensions.so`` + an HTP config with the perf profile); inputs are read
  as float32 unless ``--use_native_input_files`` (quantized by the tool with the tensor's encodings), outputs
  are written as float32 to ``OUTPUT_DIR/Result_<i>/<tensor>.raw`` unless ``--use_native_output_files``;
* the on-device file set (the SDK's "Running on Android" steps): ``qnn-net-run``, ``libQnnHtp.so``,
  ``libQnnHtpV<arch>Stub.so``, ``libQnnHtpPrepare.so``, ``libQnnSystem.so``,
  ``libQnnHtpNetRunExtensions.so`` from ``lib/aarch64-android``, the DSP side
  ``lib/hexagon-v<arch>/unsigned/libQnnHtpV<arch>Skel.so`` (found by the DSP through ``ADSP_LIBRARY_PATH``)
  and ``qnn-profile-viewer``: the skel and stub follow the phone's HTP architecture;
* a context binary loads only in a runtime at least as new as the one that wrote it.
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass, field

from .protocol import DeviceError

# SoC -> (QNN soc_model, HTP architecture); the same ids as devicelab.compile.TARGETS
SOCS = {"SM8650": ("57", "75"), "SM8550": ("43", "73"), "SM8450": ("36", "69")}
PERF_PROFILES = ("low_balanced", "balanced", "default", "high_performance", "sustained_high_performance", "burst",
                 "low_power_saver", "power_saver", "high_power_saver", "extreme_power_saver")
_VERSION_RE = re.compile(r"v?(\d+\.\d+\.\d+)(?:\.(\d+))?")


def soc_arch(soc: str) -> tuple[str, str]:
    """(soc_model, htp_arch) of a phone's SoC (``ro.soc.model``); DeviceError for one we have no ids for."""
    key = str(soc).upper()
    if key not in SOCS:
        raise DeviceError(f"SoC {soc!r} has no known QNN soc_model / HTP arch (known: {', '.join(SOCS)})")
    return SOCS[key]


def sdk_files(htp_arch: str) -> tuple[str, ...]:
    """The 8 files a phone run needs, relative to an SDK root, for HTP ``v<htp_arch>``."""
    a = str(htp_arch).lstrip("vV")
    return ("bin/aarch64-android/qnn-net-run", "bin/aarch64-android/qnn-profile-viewer",
            "lib/aarch64-android/libQnnHtp.so", f"lib/aarch64-android/libQnnHtpV{a}Stub.so",
            "lib/aarch64-android/libQnnHtpPrepare.so", "lib/aarch64-android/libQnnSystem.so",
            "lib/aarch64-android/libQnnHtpNetRunExtensions.so", f"lib/hexagon-v{a}/unsigned/libQnnHtpV{a}Skel.so")


def parse_version(text: str) -> tuple[int, ...] | None:
    """``2.22.6`` / ``v2.22.6.240515`` / ``QNN SDK v2.51.0.260929181845`` -> (2, 22, 6); None if none."""
    m = _VERSION_RE.search(text or "")
    return tuple(int(p) for p in m.group(1).split(".")) if m else None


def version_text(v: tuple[int, ...] | None) -> str:
    return ".".join(map(str, v)) if v else "unknown"


def check_runtime_version(device: str, runtime: str, built_by: str, context: str) -> None:
    """Refuse a phone runtime older than the QNN that wrote the context binary, naming both."""
    have, need = parse_version(runtime), parse_version(built_by)
    if need is None:
        return  # compile.json without a version: nothing to compare (old compiled folders)
    if have is None:
        raise DeviceError(f"{device}: cannot read the phone's QNN version ({runtime!r}); {context} was built by "
                          f"QNN {version_text(need)}")
    if have[:3] < need[:3]:
        raise DeviceError(f"{device}: the phone's QNN runtime {version_text(have)} is older than QNN "
                          f"{version_text(need)}, which built {context}: push a QNN SDK of {version_text(need)} "
                          f"or newer (runtime_dir), or compile with the phone's version")


def htp_config(soc_model: str, htp_arch: str, perf_profile: str = "burst", graph_names=()) -> dict:
    """The HTP backend-extension config (``--config_file`` points at the wrapper, :func:`backend_config`)."""
    cfg = {"devices": [{"soc_id": int(soc_model), "dsp_arch": f"v{htp_arch}",
                        "cores": [{"core_id": 0, "perf_profile": perf_profile, "rpc_control_latency": 100}]}]}
    if graph_names:
        cfg["graphs"] = [{"graph_names": list(graph_names), "vtcm_mb": 8, "O": 3}]
    return cfg


def backend_config(htp_config_path: str) -> dict:
    return {"backend_extensions": {"shared_library_path": "libQnnHtpNetRunExtensions.so",
                                   "config_file_path": htp_config_path}}


@dataclass
class NetRun:
    """One qnn-net-run process: a block of ``inferences`` over ``input_list`` with one context load."""

    remote_dir: str  # absolute folder on the phone holding the runtime and the model
    context: str
    input_list: str
    output_dir: str
    inferences: int
    keep_outputs: int = 1
    config_file: str = "htp_backend_ext.json"
    perf_profile: str = "burst"
    profiling_level: str = "basic"
    shared_buffer: bool = True
    extra: list = field(default_factory=list)

    def argv(self) -> list[str]:
        if self.inferences < 1:
            raise ValueError(f"num_inferences must be at least 1, got {self.inferences}")
        d = self.remote_dir
        args = [f"{d}/qnn-net-run", f"--retrieve_context={d}/{self.context}", f"--backend={d}/libQnnHtp.so",
                f"--input_list={d}/{self.input_list}", f"--output_dir={self.output_dir}",
                f"--num_inferences={self.inferences}", f"--keep_num_outputs={self.keep_outputs}",
                f"--perf_profile={self.perf_profile}", f"--profiling_level={self.profiling_level}",
                f"--config_file={d}/{self.config_file}"]
        if self.shared_buffer:
            args.append("--shared_buffer")
        return args + list(self.extra)

    def command(self) -> str:
        """The shell line: absolute library paths (the DSP's loader searches ADSP_LIBRARY_PATH itself; a
        relative entry means nothing to it), the vendor DSP folders after ours."""
        d = self.remote_dir
        env = (f"LD_LIBRARY_PATH={d} ADSP_LIBRARY_PATH=\"{d};/vendor/dsp/cdsp;/vendor/lib/rfsa/adsp;"
               f"/system/lib/rfsa/adsp;/dsp\"")
        return env + " " + " ".join(self.argv())


_PV_SECTION = re.compile(r"^Execute Stats \((\w+)\):")
_PV_NETRUN = re.compile(r"^\s+NetRun:\s+(\d+)\s+us")
_PV_STATS = re.compile(r"^(Init|Finalize|De-Init|Compose Graphs|Lib-Load) Stats:")


def parse_profile_viewer(text: str) -> dict:
    """Timings of one ``qnn-profile-viewer --input_log`` text report (layout: tests/data/qnn_profile_viewer.txt).

    Returns ``execute_avg_us`` / ``execute_min_us`` / ``execute_max_us`` (the NetRun line of the "Execute
    Stats (Average|Min|Max)" blocks) and, where present, ``init_us``, ``finalize_us``, ``deinit_us``,
    ``libload_us`` (the "Lib-Load Stats" block of the report's heading).
    """
    out, section = {}, None
    for line in text.splitlines():
        m = _PV_SECTION.match(line)
        if m:
            section = m.group(1).lower()
            continue
        m = _PV_STATS.match(line)
        if m:
            section = m.group(1).lower().replace("-", "")
            continue
        if line and not line[0].isspace() and line.endswith("Stats:"):
            section = None
            continue
        m = _PV_NETRUN.match(line)
        if not m or section is None:
            continue
        key = {"average": "execute_ave_us", "min": "execute_min_us", "max": "execute_max_us", "init": "init_us",
               "finalize": "finalize_us", "deinit": "deinit_us", "libload": "libload_us"}.get(section)
        if key and key not in out:
            out[key] = int(m.group(1))
    if "execute_ave_us" not in out:
        raise DeviceError("qnn-profile-viewer report has no 'Execute Stats (Average)' NetRun time; was "
                          "qnn-net-run run with --profiling_level=basic? Report starts: " + text[:300])
    out["execute_avg_us"] = out.pop("execute_ave_us")
    return out


def parse_profile_csv(text: str) -> list[int]:
    """Per-inference NetRun execute times (µs, in run order) from ``qnn-profile-viewer --output FILE.csv``:
    the rows whose ``Event`` is the execute NetRun event (``Message`` column "NetRun", ``Identifier``
    "execute"), one per inference. The layout read here is our reading of the viewer's CSV writer and has
    not been checked against a real one (docs/devices.md says so)."""
    rows = list(csv.DictReader(io.StringIO(text)))
    if not rows or not {"Identifier", "Message", "Value", "Unit"} <= set(rows[0]):
        raise DeviceError(f"qnn-profile-viewer CSV has no Identifier/Message/Value/Unit columns: {text[:200]!r}")
    times = [int(float(r["Value"])) for r in rows if r["Identifier"].strip().lower() == "execute"
             and r["Message"].strip() == "NetRun" and r["Unit"].strip() == "us"]
    if not times:
        raise DeviceError("qnn-profile-viewer CSV has no per-inference execute NetRun rows")
    return times


def read_json(text: str, what: str) -> dict:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DeviceError(f"{what} is not valid JSON: {e}") from None
