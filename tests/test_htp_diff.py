"""`farm diff EXPORT --runtime qnn-htp` (farm.cli.diff_cmd over devicelab.divergence): which tensor breaks.

* The SQNR maths against a direct computation, and ``first_below`` naming the first tensor in graph order
  under the threshold, on arrays where the answer is known.
* A real one-layer SmolLM2 ``w8a8:device`` export, compiled, on the HTP emulator against onnxruntime's CPU
  and the simulation, 1 window of 32 tokens. Bounds: the simulation and the CPU graph share every integer
  code but a rare near-tie flip, so every tensor agrees at 25 dB or more (measured: 58.9 dB at the
  worst, top-1 100%); the HTP
  against the CPU stays above the 10 dB bar on every tensor with the logits' top-1 at 95% or more
  (measured: 26.2 dB at the worst, top-1 100%).
* Bad input: an export that was never compiled, and a machine without onnxruntime-qnn, each say what to run.
"""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest

from devicelab.divergence import Agreement, layer_of, sqnr_db
from farm.cli import main
from quant import CalibConfig, artifact, load_model, quantize
from quant.export import export_artifact

T = 32


def test_sqnr_and_the_first_layer_below_the_threshold():
    rng = np.random.default_rng(0)
    a = {f"model.layers.{i}.output": rng.standard_normal((1, T, 8)) for i in range(3)}
    a["logits"] = rng.standard_normal((1, T, 5))
    noise = {0: 1e-3, 1: 0.5, 2: 2.0}  # layer 1 falls below 10 dB (about 6 dB), layer 2 further
    b = {n: v + noise[layer_of(n)] * rng.standard_normal(v.shape) if n != "logits" else v for n, v in a.items()}
    agr = Agreement("onnx", "qnn-htp")
    agr.add(a, b)
    rows = {r["tensor"]: r for r in agr.rows()}
    x, y = a["model.layers.1.output"], b["model.layers.1.output"]
    assert rows["model.layers.1.output"]["sqnr_db"] == pytest.approx(10 * math.log10((x ** 2).sum() / ((y - x) ** 2).sum()))
    assert agr.first_below(10)["tensor"] == "model.layers.1.output"
    assert [r["layer"] for r in agr.layers()] == [0, 1, 2] and agr.top1 == 1.0
    assert sqnr_db(1.0, 0.0) == math.inf and agr.first_below(-100) is None


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("diff")
    lm = load_model("smollm2-135m", num_layers=1)
    res = quantize(lm, scheme="w8a8", method="rtn", calib=CalibConfig(4, T, 0), progress=False)
    art = artifact.save(lm.model, lm.tokenizer, root / "a", res.recipe)
    return art, export_artifact(art, prefill=T, ctx=2 * T, device_table=True, progress=False)


def test_diff_on_the_htp_emulator(saved, capsys):
    art, exp = saved
    assert main(["diff", str(exp), "--runtime", "qnn-htp"]) == 2  # not compiled yet: says what to run
    assert f"run `farm compile {exp}` first" in capsys.readouterr().err
    assert main(["compile", str(exp), "--graphs", "prefill"]) == 0
    capsys.readouterr()
    assert main(["diff", str(exp), "--artifact", str(art), "--windows", "1", "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["scheme"] == "w8a8:device" and rec["windows"] == 1 and rec["prompt_len"] == T
    sim = rec["cpu_vs_sim"]
    joined = sim["tensors"]  # the quantizers whose tensor the graph names alike
    assert {"model.layers.0.attn_residual", "model.layers.0.input_layernorm.output", "model.layers.0.output",
            "model.layers.0.mlp.down_proj.input", "model.norm.output", "lm_head.output"} <= {r["tensor"] for r in joined}
    assert all(r["sqnr_db"] is None or r["sqnr_db"] >= 25 for r in joined), min(r["sqnr_db"] for r in joined)
    assert sim["top1"] >= 0.95
    htp = rec["htp_vs_cpu"]
    assert len(htp["tensors"]) >= len(joined)
    assert htp["first_below"] is None, htp["first_below"]
    assert htp["top1"] >= 0.95
    assert [r["layer"] for r in htp["layers"]] == [0, None]


def test_diff_without_onnxruntime_qnn_says_what_to_install(saved, capsys, monkeypatch):
    import devicelab.backends.qnn_sim as qs

    art, exp = saved
    (exp / "compiled-sm8650").mkdir(exist_ok=True)
    if not (exp / "compiled-sm8650" / "compile.json").exists():
        (exp / "compiled-sm8650" / "compile.json").write_text("{}")
    monkeypatch.setattr(qs, "_registered", False)
    monkeypatch.setitem(sys.modules, "onnxruntime_qnn", None)
    assert main(["diff", str(exp)]) == 2
    err = capsys.readouterr().err
    assert "onnxruntime-qnn is not installed" in err and "pip install" in err
