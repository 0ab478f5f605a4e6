"""`farm compile` (devicelab.compile): QNN context binaries for the Snapdragon 8 Gen 3 HTP, made on x86 by
onnxruntime-qnn's real HTP compiler, and run back on its HTP emulator.

Bound for the emulator against onnxruntime's CPU on the same W8A16 export (one SmolLM2 layer): top-1 on at
least 95% of positions, mean |HTP - CPU| logit difference at most half the simulation's own quantization
error (mean |sim - float|), max at most 0.5% of the logit range. Measured: 97-100% top-1, a fifth of the
quantization error, 0.09% of the range. The HTP runs the float parts of the graph (embedding, residual
stream, final norm, lm_head: float in the reference scheme) in fp16, and requantizes with its own integer
arithmetic, so it is not expected to be bit-exact; the difference is the point of `--runtime qnn-htp`.
"""

from __future__ import annotations

import json
import os
import stat
import sys

import numpy as np
import pytest
import torch

from devicelab.compile import CompileError, compile_export, parse_target
from devicelab.runtime import cpu_eval_session, htp_session
from quant import CalibConfig, data, load_model, quantize
from quant.export import export_model
from quant.sim import float_mode

T = 32


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("compile")
    out = {}
    # w8a8 with 16-bit norm outputs: still the reference's asymmetric per-channel down_proj the HTP refuses,
    # but norms it can finalize in front of a matmul (a 16-bit norm with an 8-bit output cannot be, so the
    # reference w8a8 graph fails whole even with CPU fallback; docs/deploy.md, the device table)
    for key, scheme in (("w8a16", "w8a16"), ("w8a8", "w8a8:norm.out=16")):
        lm = load_model("smollm2-135m", num_layers=1)
        res = quantize(lm, scheme=scheme, method="rtn", calib=CalibConfig(4, T, 0), progress=False)
        out[key] = (export_model(lm.model, lm.tokenizer, root / key, res.recipe, prefill=T, ctx=2 * T), lm)
    return out


def test_compile_for_sm8650_and_run_on_the_htp(exported):
    path, lm = exported["w8a16"]
    compiled = compile_export(path, "sm8650", graphs=("prefill",), progress=False)
    assert compiled == path / "compiled-sm8650"
    rec = json.loads((compiled / "compile.json").read_text())
    assert rec["target"] == {"name": "sm8650", "soc_model": "57", "htp_arch": "75",
                             "description": "Snapdragon 8 Gen 3 (HTP v75)"}
    g = rec["graphs"]["prefill"]
    binary = compiled / g["context_binary"]
    assert binary.stat().st_size == g["context_binary_bytes"] > 1_000_000 and g["cpu_nodes"] == []
    assert rec["versions"]["onnxruntime-qnn"] and rec["export_hash"] == json.loads((path / "export.json").read_text())["content_hash"]
    # the EPContext model points at the binary and records the SoC it was made for
    import onnx

    ctx = onnx.load(str(compiled / "prefill.onnx"))
    node = [n for n in ctx.graph.node if n.op_type == "EPContext"]
    assert len(node) == 1
    attrs = {a.name: a for a in node[0].attribute}
    assert attrs["ep_cache_context"].s.decode() == binary.name
    assert "57" in (compiled / "compile.log").read_text() or rec["target"]["soc_model"] == "57"
    assert stat.S_IMODE(os.stat(compiled).st_mode) & 0o055  # not a private 0700 folder (umask applied)

    cpu = cpu_eval_session(path / "prefill.onnx")
    htp = htp_session(compiled / "prefill.onnx")  # CPU fallback is off: every op ran on the emulated HTP
    ids = data.eval_windows(lm.tokenizer, T, limit=2, add_bos=lm.add_bos)
    agree, d_htp, d_quant, worst = 0, 0.0, 0.0, 0.0
    with torch.no_grad():
        for w in ids:
            a = cpu.run(["logits"], {"input_ids": w[None].numpy()})[0][0]
            b = htp.run(["logits"], {"input_ids": w[None].numpy()})[0][0]
            sim = lm.model(input_ids=w[None], use_cache=False).logits[0].numpy()
            with float_mode(lm.model):
                fl = lm.model(input_ids=w[None], use_cache=False).logits[0].numpy()
            agree += int((a.argmax(-1) == b.argmax(-1)).sum())
            d_htp += np.abs(a - b).mean()
            d_quant += np.abs(sim - fl).mean()
            worst = max(worst, np.abs(a - b).max() / (a.max() - a.min()))
    assert agree / ids.numel() >= 0.95
    assert d_htp <= 0.5 * d_quant, (d_htp, d_quant)
    assert worst <= 5e-3


def test_htp_refusal_names_the_nodes_and_fallback_lists_them(exported, tmp_path):
    """W8A8 keeps down_proj per-channel *asymmetric* (the reference's simulation); the HTP takes only
    symmetric per-channel weights, so the compile is refused with that matmul named, or with
    --allow-cpu-fallback compiled with its nodes listed as left on the CPU."""
    path, _ = exported["w8a8"]
    with pytest.raises(CompileError, match=r"HTP refused 1 node\(s\): model\.layers\.0\.mlp\.down_proj\.output "
                                           r"\(MatMul\).*symmetric"):
        compile_export(path, "sm8650", out=tmp_path / "c", graphs=("prefill",), progress=False)
    assert not (tmp_path / "c").exists() and not list(tmp_path.glob(".c.tmp-*"))
    out = compile_export(path, "sm8550", out=tmp_path / "c", graphs=("prefill",), allow_cpu_fallback=True,
                         progress=False)
    rec = json.loads((out / "compile.json").read_text())
    assert rec["target"]["htp_arch"] == "73"
    left = rec["graphs"]["prefill"]["cpu_nodes"]
    assert {"name": "model.layers.0.mlp.down_proj.output", "op": "MatMul"} in left
    assert all("down_proj" in n["name"] for n in left)  # the matmul with its weight and input QDQ, nothing else


def test_targets_are_data():
    assert parse_target("SM8650").soc_model == "57"
    t = parse_target("soc_model=60,htp_arch=79")
    assert (t.name, t.soc_model, t.htp_arch) == ("soc60-v79", "60", "79")
    with pytest.raises(CompileError, match=r"unknown target 'sm9999'; known: sm8650, sm8550, sm8450"):
        parse_target("sm9999")


def test_bad_input(exported, tmp_path, monkeypatch):
    path, _ = exported["w8a16"]
    (tmp_path / "exists").mkdir()
    with pytest.raises(CompileError, match="already exists"):
        compile_export(path, out=tmp_path / "exists", progress=False)
    from devicelab.exported import ExportError

    with pytest.raises(ExportError, match="no export.json"):
        compile_export(tmp_path, progress=False)
    with pytest.raises(CompileError, match="route qnn-sdk needs the QAIRT/QNN SDK's qnn-onnx-converter"):
        monkeypatch.setenv("PATH", str(tmp_path))
        compile_export(path, route="qnn-sdk", out=tmp_path / "sdk", progress=False)
    # onnxruntime-qnn missing: the error says how to install it
    import devicelab.backends.qnn_sim as qs

    monkeypatch.setattr(qs, "_registered", False)
    monkeypatch.setitem(sys.modules, "onnxruntime_qnn", None)
    with pytest.raises(CompileError, match="pip install onnxruntime-qnn"):
        compile_export(path, out=tmp_path / "noqnn", graphs=("prefill",), progress=False)
    assert not (tmp_path / "noqnn").exists()


def _sdk_on_path(tmp_path, monkeypatch):
    from tests.devicelab_fixtures import sdk_host_tools

    bindir = sdk_host_tools(tmp_path / "bin")
    calls = tmp_path / "calls.jsonl"
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    monkeypatch.setenv("MQ_SDK_CALLS", str(calls))
    return calls


# the QNN converter's documented quantization switches (its --input_list help: "Must be specified for
# quantization. All subsequent quantization options are ignored when this is not provided")
CALIBRATE = {"--input_list", "--use_per_row_quantization", "--use_per_channel_quantization",
             "--param_quantizer_schema", "--quantization_overrides"}


def test_qnn_sdk_route_calibrates_with_the_documented_flags(exported, tmp_path, monkeypatch):
    """The QNN SDK cannot be installed here (it downloads from Qualcomm); its three host tools are the
    stand-ins of tests/data/qnn_sdk_host, which refuse what the real converter refuses (their docstrings
    cite its option help). With calibration windows the converter gets the float graph (QDQ folded: it
    loads in onnxruntime, and every overrides key is one of its tensors), the AIMET overrides, an input
    list of absolute paths to float32 raw files of exactly the graph's input size, per-row and per-channel
    quantization and the symmetric parameter schema, and reports that it quantized with the 3 samples;
    the context binary gets the target's soc_id / dsp_arch; compile.json records the mode, why, and the
    QNN version that built the binary."""
    from quant import data

    path, lm = exported["w8a16"]
    calls = _sdk_on_path(tmp_path, monkeypatch)
    windows = data.calibration_windows(lm.tokenizer, 3, T, 0, add_bos=lm.add_bos).numpy()
    out = compile_export(path, "sm8650", out=tmp_path / "sdk", graphs=("prefill",), route="qnn-sdk",
                         progress=False, calibration=windows)
    recorded = [json.loads(line) for line in calls.read_text().splitlines()]
    assert [c[0] for c in recorded] == ["qnn-onnx-converter", "qnn-model-lib-generator", "qnn-context-binary-generator"]
    conv = recorded[0][1:]
    assert CALIBRATE <= set(conv) and "--float_fallback" not in conv
    assert conv[conv.index("--quantization_overrides") + 1] == str(path / "prefill.encodings")
    assert conv[conv.index("--param_quantizer_schema") + 1] == "symmetric"
    rec = json.loads((out / "compile.json").read_text())
    g = rec["graphs"]["prefill"]
    assert g["quantization"]["mode"] == "calibrate" and "3 calibration window(s)" in g["quantization"]["why"]
    assert g["qnn_version"] == rec["versions"]["qnn"] == "2.51.0"
    assert rec["route"] == "qnn-sdk" and sorted(p.name for p in out.iterdir()) == ["compile.json", "compile.log",
                                                                                   "prefill.bin"]
    log = (out / "compile.log").read_text()
    assert "Failed" not in log and "ERROR" not in log


def test_qnn_sdk_route_float_fallback_without_calibration(exported, tmp_path, monkeypatch):
    """Without calibration windows: --float_fallback (fp16), never with an input list (the converter's
    help: "input list must not be provided"); the stand-in refuses the two together, which the route
    never asks for."""
    path, _ = exported["w8a16"]
    calls = _sdk_on_path(tmp_path, monkeypatch)
    out = compile_export(path, "sm8650", out=tmp_path / "sdk", graphs=("prefill",), route="qnn-sdk", progress=False)
    conv = json.loads(calls.read_text().splitlines()[0])[1:]
    assert "--float_fallback" in conv and "--input_list" not in conv
    assert conv[conv.index("--float_bitwidth") + 1] == "16"
    assert json.loads((out / "compile.json").read_text())["graphs"]["prefill"]["quantization"]["mode"] == "float_fallback"
    import subprocess

    bad = subprocess.run([str(tmp_path / "bin" / "qnn-onnx-converter"), "--input_network", str(path / "prefill.onnx"),
                          "--float_fallback", "--input_list", str(tmp_path / "x.txt")], capture_output=True, text=True)
    assert bad.returncode == 1 and "the input list must not be provided" in bad.stderr


def test_strip_qdq_writes_a_graph_onnxruntime_loads(exported, tmp_path):
    """The folded float graph of the real export: unique node names (onnxruntime refuses duplicates), no
    Q/DQ node left, every encodings key one of its tensors, and it computes the export's logits up to the
    activations' quantization (top-1 on most positions)."""
    import onnx
    import onnxruntime as ort

    from devicelab.qdq import strip_qdq

    path, lm = exported["w8a8"]
    model = strip_qdq(path / "prefill.onnx", tmp_path / "prefill.float.onnx")
    names = [n.name for n in model.graph.node if n.name]
    assert len(names) == len(set(names))
    assert not [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    g = onnx.load(str(tmp_path / "prefill.float.onnx")).graph
    tensors = {t.name for t in g.initializer} | {x for n in g.node for x in (*n.input, *n.output)} | {
        v.name for v in g.input}
    enc = json.loads((path / "prefill.encodings").read_text())
    assert set(enc["activation_encodings"]) | set(enc["param_encodings"]) <= tensors
    sess = ort.InferenceSession(str(tmp_path / "prefill.float.onnx"), providers=["CPUExecutionProvider"])
    from quant import data

    ids = data.eval_windows(lm.tokenizer, T, limit=1, add_bos=lm.add_bos)[0][None].numpy()
    fl = sess.run(["logits"], {"input_ids": ids})[0][0]
    qdq = cpu_eval_session(path / "prefill.onnx").run(["logits"], {"input_ids": ids})[0][0]
    assert (fl.argmax(-1) == qdq.argmax(-1)).mean() >= 0.8
