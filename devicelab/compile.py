"""Compiling an export for a Snapdragon NPU: a QNN context binary per graph, written beside the export.

Two routes, one result (``compiled-<target>/``):

* ``ort`` (default, needs only PyPI): onnxruntime with the QNN execution provider of ``onnxruntime-qnn``
  (HTP backend, ``soc_model``/``htp_arch`` of the target). Creating a session with ``ep.context_enable=1``
  writes an EPContext ONNX model (``<graph>.onnx``) and the context binary it points to
  (``<graph>_qnn.bin``) for that SoC. CPU fallback is off: a graph the HTP cannot take whole is refused,
  naming the nodes QNN rejected (``--allow-cpu-fallback`` compiles the rest and lists them).
* ``qnn-sdk`` (where the user's QAIRT/QNN SDK is on PATH): the float graph (QDQ folded away,
  :mod:`devicelab.qdq`) and its AIMET encodings as ``--quantization_overrides`` -> ``qnn-onnx-converter``
  -> ``qnn-model-lib-generator`` -> ``qnn-context-binary-generator`` with an HTP config for the target ->
  ``<graph>.bin``. The converter quantizes only when told how (its ``--input_list`` help: "Must be specified
  for quantization. All subsequent quantization options are ignored when this is not provided"), so one of
  two modes is always passed and recorded in compile.json:

  - ``calibrate`` (calibration windows given: token ids of the artifact's own calibration text): raw
    float32 inputs and an input list of absolute paths, plus ``--use_per_row_quantization`` /
    ``--use_per_channel_quantization`` and ``--param_quantizer_schema symmetric`` (the HTP takes
    per-channel weights only symmetric); tensors the overrides do not cover get calibrated ranges;
  - ``float_fallback`` (no windows): ``--float_fallback --float_bitwidth 16``, never with an input list
    (its help: "input list must not be provided"): every tensor the export quantized is covered by the
    overrides, and the ones it left float (embedding, residual stream, norms, lm_head in the reference
    schemes) stay float, in fp16 on the HTP, which is what the export means.

``compile.json`` also records the QNN version that built each context binary (onnxruntime-qnn's bundled
QNN for ``ort``, ``qnn-context-binary-generator --version`` for ``qnn-sdk``): a phone refuses a binary
from a newer QNN than its runtime.

``compile.json`` records the target, the route, package and tool versions, each binary's size and sha256,
the seconds taken and the nodes left on the CPU; ``compile.log`` keeps everything the compiler printed.
The folder is written into a temporary sibling and renamed at the end: a failed compile leaves nothing.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

from .export_checks import sha256_file
from .exported import Export, read_export


class CompileError(RuntimeError):
    """The export cannot be compiled for the target; the message names the target, graph or tool."""


@dataclass(frozen=True)
class Target:
    name: str
    soc_model: str  # QNN's SoC id
    htp_arch: str  # HTP (Hexagon) architecture version
    description: str = ""


TARGETS = {  # QNN soc_model / dsp_arch ids, as in the QNN SDK's HTP backend docs and the reference's configs
    "sm8650": Target("sm8650", "57", "75", "Snapdragon 8 Gen 3 (HTP v75)"),
    "sm8550": Target("sm8550", "43", "73", "Snapdragon 8 Gen 2 (HTP v73)"),
    "sm8450": Target("sm8450", "36", "69", "Snapdragon 8 Gen 1 (HTP v69)"),
}
ROUTES = ("ort", "qnn-sdk")
SDK_TOOLS = ("qnn-onnx-converter", "qnn-model-lib-generator", "qnn-context-binary-generator")


def parse_target(spec: str) -> Target:
    """``sm8650`` (a known target) or ``soc_model=57,htp_arch=75`` (any pair, named ``soc57-v75``)."""
    spec = str(spec).strip()
    if spec.lower() in TARGETS:
        return TARGETS[spec.lower()]
    m = re.fullmatch(r"soc_model=(\d+),\s*htp_arch=v?(\d+)", spec)
    if m:
        return Target(f"soc{m.group(1)}-v{m.group(2)}", m.group(1), m.group(2), "user-given soc_model/htp_arch")
    raise CompileError(f"unknown target {spec!r}; known: {', '.join(TARGETS)}, or soc_model=N,htp_arch=V "
                       f"(for example soc_model=57,htp_arch=75)")


def _version(pkg: str) -> str:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return ""


@contextmanager
def _native_output_to(log: Path):
    """QNN's libraries write to fds 1 and 2 directly; collect all of it in the compile log."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log, "ab") as f:
        try:
            os.dup2(f.fileno(), 1)
            os.dup2(f.fileno(), 2)
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


_UNSUPPORTED = re.compile(r"Unsupported nodes in QNN EP: (.*)")
_NODE = re.compile(r"\{ name: ([^,]+), type: (\w+) \}")


def unsupported_nodes(log_text: str) -> list[tuple[str, str]]:
    """``(node name, op type)`` pairs that the QNN EP refused, from its log."""
    out = []
    for line in log_text.splitlines():
        m = _UNSUPPORTED.search(line)
        if m:
            out += [(a, b) for a, b in _NODE.findall(m.group(1)) if (a, b) not in out]
    return out


def _ort_compile(graph_path: Path, out_onnx: Path, target: Target, log: Path, allow_cpu_fallback: bool) -> dict:
    try:
        import onnxruntime as ort
    except ImportError:
        raise CompileError("compiling needs onnxruntime and onnxruntime-qnn: pip install 'mobilequant-farm[device]'") from None
    from .backends.qnn_sim import qnn_ep_devices
    from .protocol import DeviceError

    try:
        devices = qnn_ep_devices()
    except DeviceError as e:
        raise CompileError(f"{e}. onnxruntime-qnn ships QNN's HTP compiler for x86_64 Linux and Windows: "
                           f"pip install onnxruntime-qnn") from None
    so = ort.SessionOptions()
    so.log_severity_level = 2  # warnings: where QNN says which nodes it refused
    so.add_session_config_entry("ep.context_enable", "1")
    so.add_session_config_entry("ep.context_file_path", str(out_onnx))
    so.add_session_config_entry("ep.context_embed_mode", "0")
    so.add_session_config_entry("session.disable_cpu_ep_fallback", "0" if allow_cpu_fallback else "1")
    so.add_provider_for_devices(devices, {"backend_type": "htp", "soc_model": target.soc_model,
                                          "htp_arch": target.htp_arch})
    start = log.stat().st_size if log.exists() else 0
    t0 = time.perf_counter()
    try:
        with _native_output_to(log):
            ort.InferenceSession(str(graph_path), so)
        error = None
    except Exception as e:  # onnxruntime's own exception types
        error = e
    seconds = time.perf_counter() - t0
    with open(log, "rb") as f:
        f.seek(start)
        text = f.read().decode(errors="replace")
    cpu_nodes = unsupported_nodes(text)
    if error is not None or not out_onnx.exists():
        nodes = "; ".join(f"{n} ({op})" for n, op in cpu_nodes[:8])
        why = f"the HTP refused {len(cpu_nodes)} node(s): {nodes}" if cpu_nodes else str(error).splitlines()[0] if error else "no context written"
        hint = (" Per-channel weights must be symmetric on the HTP (use a -sym scheme or the device "
                "overrides, w8a8:device); --allow-cpu-fallback compiles the rest.") if cpu_nodes else ""
        raise CompileError(f"{graph_path.name} for {target.name}: {why}.{hint}")
    # what stayed outside the context binary, from the EPContext model itself (the log is not always explicit)
    import onnx

    left = [(n.name or n.output[0], n.op_type) for n in onnx.load(str(out_onnx), load_external_data=False).graph.node
            if n.op_type != "EPContext"]
    return {"seconds": round(seconds, 3), "cpu_nodes": [{"name": n, "op": op} for n, op in left]}


def ort_qnn_version() -> str:
    """The QNN SDK version onnxruntime-qnn bundles (its HTP compiler writes the context binaries)."""
    try:
        from onnxruntime_qnn import build_and_package_info as info

        return str(getattr(info, "qnn_version", ""))
    except ImportError:
        return ""


def sdk_qnn_version() -> str:
    from .qnn_sdk import parse_version, version_text

    try:
        out = subprocess.run(["qnn-context-binary-generator", "--version"], capture_output=True, text=True,
                             timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    v = parse_version(out)
    return version_text(v) if v else ""


def calibration_list(export: Export, graph: str, windows, folder: Path) -> Path:
    """Raw float32 calibration inputs of ``graph`` and the converter's input list: one line per sample,
    absolute paths in graph-input order (the converter's documented format)."""
    from .net_inputs import write_inputs

    gi = write_inputs(export, graph, windows, folder, str(folder.resolve()))
    lines = []
    for line in (folder / gi.list_file).read_text().splitlines():
        lines.append(" ".join(e.split(":=", 1)[1] for e in line.split()))
    path = folder / f"{graph}_calibration_list.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def _sdk_compile(graph: str, export: Export, work: Path, target: Target, log: Path, calibration=None) -> dict:
    """The QNN SDK chain on the float graph with the AIMET encodings as overrides (see the module docstring)."""
    from .qdq import strip_qdq

    spec = export.graph(graph)
    enc = export.root / export.index["graphs"][graph]["encodings"]
    float_model = work / f"{graph}.float.onnx"
    strip_qdq(spec.path, float_model)
    if calibration is not None:
        quant = ["--input_list", str(calibration_list(export, graph, calibration, work / f"{graph}_calib")),
                 "--use_per_channel_quantization", "--use_per_row_quantization",
                 "--param_quantizer_schema", "symmetric", "--act_quantizer_calibration", "min-max"]
        mode = {"mode": "calibrate", "why": f"{len(calibration)} calibration window(s) given: the converter quantizes "
                                            "with them, the overrides fix every tensor the export quantized"}
    else:
        quant = ["--float_fallback", "--float_bitwidth", "16"]
        mode = {"mode": "float_fallback", "why": "no calibration windows: every tensor the export quantized has an "
                                                 "override; those it left float stay float (fp16 on the HTP)"}
    cpp = work / f"{graph}_qnn.cpp"
    lib_dir = work / f"{graph}_libs"
    cfg = work / f"{graph}_htp_config.json"
    cfg.write_text(json.dumps({"graphs": [{"graph_names": [f"{graph}_qnn"], "vtcm_mb": 8, "O": 3}],
                               "devices": [{"soc_id": int(target.soc_model), "dsp_arch": f"v{target.htp_arch}",
                                            "cores": [{"core_id": 0, "perf_profile": "burst", "rpc_control_latency": 100}]}]}))
    backend_cfg = work / f"{graph}_backend_extensions.json"
    backend_cfg.write_text(json.dumps({"backend_extensions": {"shared_library_path": "libQnnHtpNetRunExtensions.so",
                                                              "config_file_path": str(cfg)}}))
    steps = [
        ["qnn-onnx-converter", "--input_network", str(float_model), "--output_path", str(cpp),
         "--quantization_overrides", str(enc), "--act_bitwidth", "8", "--bias_bitwidth", "32", *quant],
        ["qnn-model-lib-generator", "-c", str(cpp), "-b", str(cpp.with_suffix(".bin")), "-o", str(lib_dir),
         "-t", "x86_64-linux-clang"],
        ["qnn-context-binary-generator", "--model", str(lib_dir / "x86_64-linux-clang" / f"lib{graph}_qnn.so"),
         "--backend", "libQnnHtp.so", "--binary_file", f"{graph}", "--output_dir", str(work),
         "--config_file", str(backend_cfg)],
    ]
    t0 = time.perf_counter()
    with open(log, "a") as f:
        for cmd in steps:
            f.write("$ " + " ".join(cmd) + "\n")
            f.flush()
            r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
            if r.returncode != 0:
                f.flush()
                tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
                raise CompileError(f"{graph} for {target.name}: {cmd[0]} exited with status {r.returncode}; "
                                   f"the end of its output:\n{tail}")
    if not (work / f"{graph}.bin").exists():
        raise CompileError(f"{graph} for {target.name}: qnn-context-binary-generator wrote no {graph}.bin")
    return {"seconds": round(time.perf_counter() - t0, 3), "cpu_nodes": [], "quantization": mode}


def sdk_available() -> bool:
    return all(shutil.which(t) for t in SDK_TOOLS)


def default_out(export_dir: Path, target: Target) -> Path:
    return Path(export_dir) / f"compiled-{target.name}"


def compile_export(export_dir: str | Path, target: str | Target = "sm8650", out: str | Path | None = None, *,
                   graphs: tuple[str, ...] | None = None, route: str = "ort", allow_cpu_fallback: bool = False,
                   overwrite: bool = False, progress: bool = True, calibration=None) -> Path:
    """Compile the export's graphs for ``target``; returns the compiled folder (see the module docstring).
    ``calibration``: token-id windows (the artifact's own calibration text) for the qnn-sdk route."""
    target = target if isinstance(target, Target) else parse_target(target)
    if route not in ROUTES:
        raise CompileError(f"unknown route {route!r}; known: {', '.join(ROUTES)}")
    if route == "qnn-sdk" and not sdk_available():
        missing = [t for t in SDK_TOOLS if not shutil.which(t)]
        raise CompileError(f"route qnn-sdk needs the QAIRT/QNN SDK's {', '.join(missing)} on PATH "
                           f"(source the SDK's bin/envsetup.sh); the default route 'ort' needs only onnxruntime-qnn")
    export = read_export(export_dir)
    names = list(graphs or export.index["graphs"])
    for g in names:
        export.graph(g)  # ExportError naming a missing graph
    dest = Path(out) if out else default_out(export.root, target)
    if dest.exists() and not overwrite:
        raise CompileError(f"compiled folder {dest} already exists; pass --overwrite to replace it")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.tmp-"))
    log = tmp / "compile.log"
    try:
        record = {"target": asdict(target), "route": route, "export": str(export.root.resolve()),
                  "export_hash": export.content_hash, "allow_cpu_fallback": allow_cpu_fallback,
                  "versions": {"onnxruntime": _version("onnxruntime"), "onnxruntime-qnn": _version("onnxruntime-qnn"),
                               "python": platform.python_version(),
                               "qnn": ort_qnn_version() if route == "ort" else sdk_qnn_version()},
                  "graphs": {}}
        for g in names:
            if progress:
                print(f"compiling {g} for {target.name} ({target.description}) via {route}", file=sys.stderr, flush=True)
            if route == "ort":
                ctx = tmp / f"{g}.onnx"
                info = _ort_compile(export.graph(g).path, ctx, target, log, allow_cpu_fallback)
                bins = sorted(p.name for p in tmp.glob(f"{g}*.bin"))
                files = [ctx.name] + bins
            else:
                build = tmp / "build"
                build.mkdir(exist_ok=True)
                info = _sdk_compile(g, export, build, target, log, calibration)
                (build / f"{g}.bin").rename(tmp / f"{g}.bin")
                shutil.rmtree(build)  # the float graph, generated C++ and libraries: rebuilt on demand
                bins = [f"{g}.bin"]
                files = bins
            if not bins:
                raise CompileError(f"{g} for {target.name}: the compiler wrote no context binary")
            info["files"] = {f: {"bytes": (tmp / f).stat().st_size, "sha256": sha256_file(tmp / f)} for f in files}
            info["context_binary"] = bins[0]
            info["context_binary_bytes"] = (tmp / bins[0]).stat().st_size
            info["qnn_version"] = record["versions"]["qnn"]
            if route == "ort":
                info["epcontext_model"] = f"{g}.onnx"
            record["graphs"][g] = info
            if progress:
                print(f"  {bins[0]}: {info['context_binary_bytes'] / 1e6:.1f} MB in {info['seconds']:.1f}s", file=sys.stderr)
        (tmp / "compile.json").write_text(json.dumps(record, indent=2, sort_keys=True))
        mask = os.umask(0o022)  # mkdtemp's folder is 0700: give it the mode a plain mkdir would have
        os.umask(mask)
        os.chmod(tmp, 0o777 & ~mask)
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest
