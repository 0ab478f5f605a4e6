"""``farm devices --check NAME``: everything that would waste a night on a phone, checked in a minute.

In order (each a line: check, ok, detail): the phone is online; its SoC and HTP arch are known; the QNN
SDK files for that arch are all there (missing ones named); the battery nodes can be read (else energy
will be refused); it is not charging over USB; its thermal status and battery temperature; free storage
for the export's compiled folder, the runtime and the outputs; the export has a ``compiled-<soc>``
folder for this phone and the phone's QNN is not older than the one that built it; and one tiny known
graph (``y = x + 1``, compiled here for the phone's SoC by onnxruntime-qnn) runs on the phone with its
output checked. "Cannot load the context binary" and "the output is garbage" are the two failures that
cost a night; the last check catches both before one starts.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from . import qnn_sdk
from .protocol import DeviceError

KNOWN_INPUT = np.arange(8, dtype=np.float32)[None] / 4.0  # exactly representable in fp16
KNOWN_TOL = 1e-2  # the HTP runs float ops in fp16


@dataclass
class Check:
    check: str
    ok: bool
    detail: str

    def to_dict(self) -> dict:
        return asdict(self)


def known_graph(folder: Path) -> Path:
    """``known.onnx`` (y = x + 1 on a (1, 8) float input) in ``folder``."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "known.onnx"
    if not path.exists():
        g = helper.make_graph([helper.make_node("Add", ["x", "one"], ["y"], name="add_one")], "known",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
                              [numpy_helper.from_array(np.ones((1, 8), np.float32), "one")])
        onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)], ir_version=10), path)
    return path


def compile_known(folder: Path, soc: str) -> tuple[Path, dict]:
    """The known graph's QNN context binary for ``soc`` (cached in ``folder``) and its record."""
    from .compile import Target, _ort_compile, ort_qnn_version
    from .export_checks import sha256_file

    soc_model, arch = qnn_sdk.soc_arch(soc)
    out = folder / f"known-{soc.lower()}"
    rec_path = out / "known.json"
    if rec_path.is_file():
        return out, json.loads(rec_path.read_text())
    out.mkdir(parents=True, exist_ok=True)
    src = known_graph(folder)
    _ort_compile(src, out / "known_ctx.onnx", Target(soc.lower(), soc_model, arch), out / "compile.log", False)
    binary = next(p for p in out.glob("*.bin"))
    rec = {"binary": binary.name, "sha256": sha256_file(binary), "soc_model": soc_model, "htp_arch": arch,
           "qnn_version": ort_qnn_version(), "onnx": str(src.resolve())}
    rec_path.write_text(json.dumps(rec))
    return out, rec


def default_cache() -> Path:
    """Where the known graph's context binaries are kept: $MQFARM_PREFLIGHT_DIR, else ~/.mqfarm/preflight."""
    import os

    return Path(os.environ.get("MQFARM_PREFLIGHT_DIR") or Path("~/.mqfarm/preflight").expanduser())


def run_checks(device, export: str | Path | None = None, cache_dir: str | Path | None = None) -> list[Check]:
    """The preflight of an :class:`~devicelab.backends.adb.AdbDevice` (see the module docstring)."""
    out: list[Check] = []
    state = device.phone.state()
    out.append(Check("online", state == "device", f"adb state {state!r} (serial {device.serial})"))
    if state != "device":
        return out
    info = device.info()
    known = info.soc.upper() in qnn_sdk.SOCS
    arch = qnn_sdk.SOCS[info.soc.upper()][1] if known else ""
    out.append(Check("soc", known, f"{info.model}: {info.soc}" + (f", soc_model {qnn_sdk.SOCS[info.soc.upper()][0]}, "
                                                                   f"HTP v{arch}" if known else " (no known QNN ids)")))
    try:
        files = device.runtime_files()
        out.append(Check("sdk files", True, f"{len(files)} files for HTP v{arch} in {device.options.runtime_dir}"))
    except DeviceError as e:
        out.append(Check("sdk files", False, str(e)))
        files = None
    why = device.phone.battery_nodes()
    out.append(Check("battery nodes", not why, "current_now and voltage_now readable" if not why else
                     f"unreadable ({why}): latency only, energy will be refused"))
    bat = device.battery()
    usb = bat["charging"] and bat["usb_powered"]
    out.append(Check("charging", not usb, "on USB charge: current_now reads the charger; unplug and use adb over "
                     "Wi-Fi" if usb else f"not charging over USB ({bat['level_pct']:.0f}% battery)"))
    status = device.phone.thermal_status()
    hot = bat["temperature_c"] is not None and bat["temperature_c"] > device.options.max_temp_c
    out.append(Check("thermal", not hot and status in ("", "0", "1"),
                     f"battery {bat['temperature_c']} °C (limit {device.options.max_temp_c}), thermal status "
                     f"{status or 'not reported'}"))
    free = device.free_bytes()
    need = sum(p.stat().st_size for p in files) if files else 0
    folder = record = None
    if export is not None:
        try:
            folder, exp, record = device.compiled_folder(Path(export))
            from .net_inputs import output_bytes

            need += sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
            if exp is not None:
                need += sum(output_bytes(exp, g) for g in exp.index.get("graphs", {}))
            out.append(Check("compiled folder", True, f"{folder.name} (target {record.get('target', {}).get('name', '?')}, "
                             f"built by QNN {record.get('versions', {}).get('qnn') or 'unknown'})"))
        except DeviceError as e:
            out.append(Check("compiled folder", False, str(e)))
    out.append(Check("storage", need <= free, f"{free} bytes free in /data/local/tmp, {need} needed (runtime, "
                     f"model and one set of outputs)"))
    if files is None or not known:
        return out
    try:
        out += _known_run(device, files, record, Path(cache_dir) if cache_dir else default_cache())
    except DeviceError as e:
        out.append(Check("known graph", False, str(e)))
    return out


def _known_run(device, files: list[Path], record: dict | None, cache: Path) -> list[Check]:
    out = []
    soc = device.info().soc
    kfolder, krec = compile_known(cache, soc)
    remote = "/data/local/tmp/mqfarm/preflight"
    stage = Path(tempfile.mkdtemp(prefix="mqfarm-preflight-"))
    KNOWN_INPUT.astype("<f4").tofile(stage / "x.raw")
    (stage / "known_input_list.txt").write_text(f"x:={remote}/x.raw\n")
    soc_model, arch = qnn_sdk.soc_arch(soc)
    (stage / "htp_config.json").write_text(json.dumps(qnn_sdk.htp_config(soc_model, arch)))
    (stage / "htp_backend_ext.json").write_text(json.dumps(qnn_sdk.backend_config(f"{remote}/htp_config.json")))
    device.shell(f"rm -rf {remote} && mkdir -p {remote}", "create the preflight folder")
    for f in [*files, kfolder / krec["binary"], *stage.iterdir()]:
        device.phone.push(f, f"{remote}/{f.name}")
    res = device.shell(f"cd {remote} && LD_LIBRARY_PATH={remote} ./qnn-net-run --version", "ask qnn-net-run its version",
                       check=False)
    version = qnn_sdk.parse_version(res.stdout)
    built = (record or {}).get("versions", {}).get("qnn", "")
    try:
        if built:
            qnn_sdk.check_runtime_version(device.name, res.stdout, built, "the export's context binaries")
        out.append(Check("runtime version", version is not None,
                         f"phone QNN {qnn_sdk.version_text(version)}" + (f", binaries built by QNN {built}" if built else "")))
    except DeviceError as e:
        out.append(Check("runtime version", False, str(e)))
    run = qnn_sdk.NetRun(remote, krec["binary"], "known_input_list.txt", f"{remote}/out", inferences=1, keep_outputs=1)
    r = device.shell(run.command(), "run the known graph", check=False)
    if r.returncode != 0:
        out.append(Check("known graph", False, f"qnn-net-run exited with {r.returncode}: "
                                               f"{(r.stderr or r.stdout).strip()[-300:]}"))
        return out
    dest = stage / "y.raw"
    device.phone.pull(f"{remote}/out/Result_0/y.raw", dest)
    y = np.fromfile(dest, dtype="<f4")
    want = (KNOWN_INPUT + 1.0).ravel()
    ok = y.shape == want.shape and float(np.abs(y - want).max()) <= KNOWN_TOL
    out.append(Check("known graph", ok, f"y = x + 1 on 8 values: max error "
                     f"{float(np.abs(y - want).max()) if y.shape == want.shape else 'shape ' + str(y.shape)}"
                     f" (tolerance {KNOWN_TOL})"))
    return out
