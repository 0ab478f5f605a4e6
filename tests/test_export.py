"""The deployable export (quant.export): the QDQ graphs compute what the simulation computes.

Tolerances, and why:
* FP export against the float model: 1e-4 of the logit range (only float op order differs).
* Quantized prefill against the simulation, on real tokens: every QDQ pair carries the quantizer's exact
  scale and zero point and QuantizeLinear divides as the simulation does, so integer codes agree except
  where a float op (matmul accumulation, softmax) lands within an ulp of a rounding boundary; one flipped
  8-bit code then propagates through the later layers. So: top-1 agreement of at least 99% of positions,
  and the mean logit error at most a quarter of the simulation's own quantization error (mean |sim - float|);
  measured on 2-layer models: W4A8 below 0.01%, W8A8 1-5%, W8A16 4% (SmolLM2) and 15% (Gemma: with
  16-bit activations the quantization error itself is small, and a 16-bit code is one float32 ulp from
  its rounding boundary about once in 250 values).
* Decode through the uint8 cache: from an empty cache the decode graph equals the simulation with the
  shared cache encodings at attn.k / attn.v within 1e-4 of the range (measured 8e-6), so the difference
  to the plain simulation is the cache's cost, which is measured and bounded here.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from devicelab.exported import read_export
from devicelab.runtime import cpu_eval_session
from quant import CalibConfig, data, load_model, quantize
from quant.artifact import recipe_hash
from quant.export import ExportFolderError, build_graphs, export_model
from quant.export.decoder import ExportError
from quant.sim import decoder_layers, float_mode

T = 64


def _quantized(name: str, scheme: str, layers: int = 2):
    lm = load_model(name, num_layers=layers)
    res = quantize(lm, scheme=scheme, method="rtn", calib=CalibConfig(4, T, 0), progress=False)
    return lm, res


def _session(proto):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")  # devicelab.runtime's setting
    return ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
@pytest.mark.parametrize("scheme", ["w8a8", "w4a8", "w8a16"])
def test_prefill_graph_agrees_with_simulation(name, scheme):
    lm, _ = _quantized(name, scheme)
    graphs, _ = build_graphs(lm.model, prefill=T, ctx=2 * T, graphs=("prefill",))
    proto, io, sites = graphs["prefill"]
    widened = [n for n in sites if n.endswith(".input16")]  # the HTP's 16-bit copy of an 8-bit matmul input
    assert len(sites) - len(widened) == sum(1 for q in lm.model.modules() if getattr(q, "spec", None) is not None
                                            and hasattr(q, "observing"))  # one QDQ site per quantizer
    # down_proj's per-channel weights (o_proj's too under W4A8) with a 16-bit output take a 16-bit input
    expect = {"w8a8": ["down_proj"], "w4a8": ["o_proj", "down_proj"], "w8a16": []}[scheme]
    assert sorted(widened) == sorted(f"model.layers.{i}.{'self_attn' if m == 'o_proj' else 'mlp'}.{m}.input16"
                                     for i in range(2) for m in expect)
    sess = _session(proto)
    ids = data.eval_windows(lm.tokenizer, T, limit=3, add_bos=lm.add_bos)
    e_export, e_quant, agree = 0.0, 0.0, 0
    with torch.no_grad():
        for w in ids:
            sim = lm.model(input_ids=w[None], use_cache=False).logits[0].numpy()
            with float_mode(lm.model):
                fl = lm.model(input_ids=w[None], use_cache=False).logits[0].numpy()
            out = sess.run(["logits"], {"input_ids": w[None].numpy()})[0][0]
            e_export += np.abs(out - sim).mean()
            e_quant += np.abs(sim - fl).mean()
            agree += int((out.argmax(-1) == sim.argmax(-1)).sum())
    assert agree / ids.numel() >= 0.99
    assert e_export <= 0.25 * e_quant, (e_export, e_quant)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
def test_fp_export_equals_float_model(name):
    lm = load_model(name, num_layers=2)
    graphs, ex = build_graphs(lm.model, prefill=T, ctx=2 * T)
    assert ex.kv is None  # nothing quantized: the cache is float32
    sess = _session(graphs["prefill"][0])
    ids = data.eval_windows(lm.tokenizer, T, limit=2, add_bos=lm.add_bos)
    with torch.no_grad():
        for w in ids:
            ref = lm.model(input_ids=w[None], use_cache=False).logits[0].numpy()
            out = sess.run(["logits"], {"input_ids": w[None].numpy()})[0][0]
            assert np.abs(out - ref).max() <= 1e-4 * (ref.max() - ref.min())
    # the float decode graph, token by token through its float cache, gives the same logits
    shape = (len(ex.layers), ex.n_kv, 2 * T, ex.head_dim)
    first = ids[0][:12]
    dec = _decode(_session(graphs["decode"][0]), ex, first, 0, np.zeros(shape, np.float32), np.zeros(shape, np.float32))
    with torch.no_grad():
        ref = lm.model(input_ids=first[None], use_cache=False).logits[0].numpy()
    assert np.abs(dec - ref).max() <= 1e-4 * (ref.max() - ref.min())


def _with_shared_kv(model, kv, fn):
    """Run ``fn`` with every layer's attn.k / attn.v quantizer set to the shared cache encodings."""
    saved = []
    for layer in decoder_layers(model):
        for q, enc in ((layer.self_attn.attn_quant.k, kv[0]), (layer.self_attn.attn_quant.v, kv[1])):
            saved.append((q, q.scale.clone(), q.offset.clone()))
            q.set_qparams(torch.tensor([enc.scale]), torch.tensor([enc.offset]))
    try:
        return fn()
    finally:
        for q, s, o in saved:
            q.set_qparams(s, o)


def _decode(sess, ex, ids, start, kc, vc):
    """Token-by-token decode from position ``start``, writing each step's K/V into the cache."""
    ctx = kc.shape[2]
    outs = []
    names = {i.name for i in sess.get_inputs()}
    for pos in range(start, ids.numel()):
        bias = np.full((1, ctx + 1), np.finfo(np.float32).min, np.float32)
        bias[0, :pos] = 0
        bias[0, ctx] = 0
        feeds = {"input_ids": ids[None, pos:pos + 1].numpy(), "position_ids": np.array([[pos]]),
                 "k_cache": kc, "v_cache": vc, "attention_bias": bias}
        if "sliding_attention_bias" in names:
            sb = bias.copy()
            sb[0, :max(0, pos - ex.window + 1)] = np.finfo(np.float32).min
            feeds["sliding_attention_bias"] = sb
        lg, ko, vo = sess.run(["logits", "k_out", "v_out"], feeds)
        kc[:, :, pos:pos + 1] = ko
        vc[:, :, pos:pos + 1] = vo
        outs.append(lg[0, 0])
    return np.stack(outs)


@pytest.mark.parametrize("name,scheme", [("smollm2-135m", "w8a8"), ("gemma3-270m", "w4a8")])
def test_decode_through_uint8_cache(name, scheme):
    lm, _ = _quantized(name, scheme)
    prompt, steps, ctx = 24, 8, 48
    graphs, ex = build_graphs(lm.model, prefill=prompt, ctx=ctx)
    prefill, decode = _session(graphs["prefill"][0]), _session(graphs["decode"][0])
    ids = data.eval_windows(lm.tokenizer, prompt + steps, limit=1, add_bos=lm.add_bos)[0]
    shape = (len(ex.layers), ex.n_kv, ctx, ex.head_dim)
    with torch.no_grad():
        sim = lm.model(input_ids=ids[None], use_cache=False).logits[0].numpy()
        sim_kv = _with_shared_kv(lm.model, ex.kv, lambda: lm.model(input_ids=ids[None], use_cache=False).logits[0].numpy())
    rng = sim.max() - sim.min()

    # every position through the decode graph: exactly the simulation with the shared cache encodings
    dec = _decode(decode, ex, ids, 0, np.zeros(shape, np.uint8), np.zeros(shape, np.uint8))
    assert np.abs(dec - sim_kv).max() <= 1e-4 * rng
    assert (dec.argmax(-1) == sim_kv.argmax(-1)).all()

    # prefill writes the cache, decode continues: the error against the plain simulation is the cache's cost
    logits, k, v = prefill.run(["logits", "k_out", "v_out"], {"input_ids": ids[None, :prompt].numpy()})
    assert k.dtype == np.uint8 and k.shape == (shape[0], shape[1], prompt, shape[3])
    kc, vc = np.zeros(shape, np.uint8), np.zeros(shape, np.uint8)
    kc[:, :, :prompt], vc[:, :, :prompt] = k, v
    cont = _decode(decode, ex, ids, prompt, kc, vc)
    cost = np.abs(sim_kv[prompt:] - sim[prompt:]).mean()  # the shared uint8 encodings, measured
    err = np.abs(cont - sim[prompt:]).mean()
    assert 0 < cost and err <= 1.5 * cost, (err, cost)
    assert (cont.argmax(-1) == sim[prompt:].argmax(-1)).mean() >= 0.75
    # the prefill itself uses the per-layer encodings, as the simulation: equal but for a rare flipped code
    assert np.abs(logits[0] - sim[:prompt]).mean() <= 1e-3 * rng
    assert (logits[0].argmax(-1) == sim[:prompt].argmax(-1)).mean() >= 0.95


def test_export_folder_contract(tmp_path):
    lm, res = _quantized("smollm2-135m", "w4a8", layers=1)
    out = export_model(lm.model, lm.tokenizer, tmp_path / "e", res.recipe, prefill=32, ctx=64)
    exp = read_export(out)  # devicelab's reader accepts it
    idx = exp.index
    assert idx["exporter_version"] == 1 and idx["scheme"] == "w4a8" and idx["artifact_hash"] == recipe_hash(res.recipe)
    assert {g for g in idx["graphs"]} == {"prefill", "decode"}
    assert idx["graphs"]["prefill"]["inputs"] == [{"name": "input_ids", "shape": [1, 32], "dtype": "int64"}]
    kv_in = [i for i in idx["graphs"]["decode"]["inputs"] if i["name"] == "k_cache"][0]
    assert kv_in == {"name": "k_cache", "shape": [1, 3, 64, 64], "dtype": "uint8"}
    for f, meta in idx["files"].items():
        assert (out / f).stat().st_size == meta["bytes"]
    model = onnx.load(str(out / "prefill.onnx"))
    assert model.opset_import[0].version == 23  # RMSNormalization
    inits = {t.name: t for t in model.graph.initializer}
    params = dict(lm.model.named_parameters())
    weights = [n for n in inits if n.endswith(".weight.q")]
    assert weights and all(n[:-2] in params for n in weights)  # names map back to the model's parameters
    proj = [n for n in weights if "proj" in n]
    assert len(proj) == 7 and all(inits[n].data_type == onnx.TensorProto.UINT4 for n in proj)  # 4-bit, packed
    enc = json.loads((out / "prefill.encodings").read_text())
    assert enc["version"] == "0.6.1"
    nodes = {n.output[0]: n for n in model.graph.node}
    for name, entries in enc["activation_encodings"].items():
        e = entries[0]
        assert name in nodes or name in {i.name for i in model.graph.input}
        assert e["min"] == pytest.approx(e["offset"] * e["scale"], rel=1e-6, abs=1e-12)
        assert e["max"] == pytest.approx((2 ** e["bitwidth"] - 1 + e["offset"]) * e["scale"], rel=1e-6)
    down = enc["param_encodings"]["model.layers.0.mlp.down_proj.weight"]
    assert len(down) == lm.model.config.hidden_size  # per output channel
    assert set(enc["activation_encodings"]) >= {"k_out", "v_out"}
    # the folder is written atomically: the only entries are the export itself
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e"]


def test_large_graph_goes_to_external_data(tmp_path, monkeypatch):
    import quant.export as qe

    lm, res = _quantized("smollm2-135m", "w8a8", layers=1)
    monkeypatch.setattr(qe, "EXTERNAL_DATA_BYTES", 10_000_000)  # the embedding alone is 113 MB
    out = export_model(lm.model, lm.tokenizer, tmp_path / "e", res.recipe, prefill=16, ctx=32)
    assert (out / "prefill.onnx.data").stat().st_size > 100_000_000
    assert (out / "prefill.onnx").stat().st_size < 10_000_000
    ids = data.eval_windows(lm.tokenizer, 16, limit=1, add_bos=lm.add_bos)
    a = cpu_eval_session(out / "prefill.onnx").run(["logits"], {"input_ids": ids.numpy()})[0]
    graphs, _ = build_graphs(lm.model, prefill=16, ctx=32, graphs=("prefill",))
    b = _session(graphs["prefill"][0]).run(["logits"], {"input_ids": ids.numpy()})[0]
    np.testing.assert_array_equal(a, b)


def test_bad_input_is_refused_by_name(tmp_path):
    lm, res = _quantized("smollm2-135m", "w8a8:down.in=4", layers=1)
    with pytest.raises(ExportError, match=r"down_proj.input.*4-bit activation.*role down.in"):
        build_graphs(lm.model, prefill=16, ctx=32)
    lm, res = _quantized("smollm2-135m", "w8a8", layers=1)
    with pytest.raises(ExportFolderError, match="--ctx 9000 is above the model's context"):
        export_model(lm.model, lm.tokenizer, tmp_path / "x", res.recipe, prefill=16, ctx=9000)
    with pytest.raises(ExportFolderError, match="shorter than the prefill"):
        export_model(lm.model, lm.tokenizer, tmp_path / "x", res.recipe, prefill=64, ctx=32)
    assert not (tmp_path / "x").exists()
    (tmp_path / "y").mkdir()
    with pytest.raises(ExportFolderError, match="already exists"):
        export_model(lm.model, lm.tokenizer, tmp_path / "y", res.recipe, prefill=16, ctx=32)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["y"]  # nothing half-written
