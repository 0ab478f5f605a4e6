"""The AIMET encodings an export writes (quant/export/aimet.py) against the QDQ graph they describe.

AIMET's own loader is checked by ``bench/aimet_check.py`` in a separate venv (docs/deploy.md, "AIMET
interop"); these are the invariants that loader relies on, checked here without aimet-onnx:

* every quantizer of the ONNX graph (QuantizeLinear input, weight DequantizeLinear output, cache input and
  output) has exactly one entry, under ``param_encodings`` for weights, with the graph's bit width,
  signedness and number of channels, and no entry names a tensor the graph does not quantize. The decode
  graph's bare cache QuantizeLinear nodes (Gather of the past cache, Concat of past and new) are included:
  before this was checked they had no entry and AIMET's strict loader refused the decode file;
* each entry's numbers are the graph's: ``scale`` equals the graph's float32 scale, AIMET's ``offset``
  is ``-zero_point`` (shifted by ``-2^(b-1)`` for symmetric entries, AIMET's unsigned-grid convention),
  ``min = offset * scale`` and ``max = min + (2^b - 1) * scale``;
* the cache entries (k_cache, v_cache, k_out, v_out) equal ``export.json``'s shared ``kv_encoding``.

* every entry names a tensor of the float graph (``devicelab.qdq.strip_qdq``), the graph AIMET, QNN's
  overrides and AI Hub key by: the device table's stacked QDQ pairs (a re-quantization on a
  DequantizeLinear output, lossless) have no entry of their own.

Schemes: W8A8 (asymmetric per-tensor weights, per-channel down_proj, 16-bit exceptions), W8A16 (symmetric
per-channel weights), W4A8 (4-bit per-channel) and W8A8 with the device table (16-bit residual stream,
8-bit lm_head, stacked QDQ pairs), on a one-layer SmolLM2.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import onnx
import pytest

from devicelab.qdq import strip_qdq
from quant import CalibConfig, load_model, quantize
from quant.export import export_model

_spec = importlib.util.spec_from_file_location("aimet_check", Path(__file__).parents[1] / "bench" / "aimet_check.py")
aimet_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(aimet_check)  # its graph readers need only onnx and numpy


@pytest.fixture(scope="module", params=["w8a8", "w8a16", "w4a8", "w8a8:device"])
def export(request, tmp_path_factory):
    lm = load_model("smollm2-135m", num_layers=1)
    quantize(lm, scheme=request.param, method="rtn", calib=CalibConfig(2, 32, 0), progress=False)
    out = tmp_path_factory.mktemp(request.param) / "export"
    return export_model(lm.model, None, out, {"model": "smollm2-135m"}, prefill=16, ctx=32, progress=False)


@pytest.mark.slow
@pytest.mark.parametrize("graph", ["prefill", "decode"])
def test_every_quantizer_has_its_entry_and_its_numbers(export, graph, tmp_path):
    index = json.loads((export / "export.json").read_text())
    enc = json.loads((export / f"{graph}.encodings").read_text())
    table = aimet_check.qdq_quantizers(onnx.load(str(export / f"{graph}.onnx")))
    assert enc["version"] == "0.6.1"
    assert aimet_check.file_vs_graph(enc, table) == []
    entries = {**enc["activation_encodings"], **enc["param_encodings"]}
    assert len(entries) == len(table)
    params = sum(t["kind"] == "param" for t in table.values())
    device = index["scheme"].endswith(":device")  # + the final norm's gain and lm_head
    assert params == len(enc["param_encodings"]) == 7 + 2 + (2 if device else 0)  # 7 linears, 2 norm gains

    # keyed by the float graph's tensors (what AIMET, QNN's overrides and AI Hub read), none by a DQ output
    float_graph = strip_qdq(export / f"{graph}.onnx", tmp_path / f"{graph}_float.onnx").graph
    tensors = ({t for n in float_graph.node for t in n.output} | {i.name for i in float_graph.input}
               | {t.name for t in float_graph.initializer})
    assert sorted(set(entries) - tensors) == []
    if graph == "decode":  # the cache re-quantizations that had no entry before
        for name in ("model.layers.0.k_cache_past", "model.layers.0.v_cache_past", "model.layers.0.k_cache_full",
                     "model.layers.0.v_cache_full", "k_cache", "v_cache"):
            assert name in enc["activation_encodings"], name

    for name, t in table.items():
        for i, e in enumerate(entries[name]):
            scale, zp, bits = float(t["scale"][i]), int(t["zero_point"][i]), t["bits"]
            signed_shift = 2 ** (bits - 1) if e["is_symmetric"] == "True" else 0
            assert abs(e["scale"] - scale) <= 1e-6 * scale, name
            assert e["offset"] + signed_shift == -zp, name
            assert e["min"] == pytest.approx(e["offset"] * e["scale"], rel=1e-12, abs=1e-12 * e["scale"]), name
            assert e["max"] == pytest.approx(e["min"] + (2 ** bits - 1) * e["scale"], rel=1e-12,
                                             abs=1e-9 * e["scale"]), name

    kv = index["kv_encoding"]
    cache = (("k_out", "k"), ("v_out", "v")) + ((("k_cache", "k"), ("v_cache", "v")) if graph == "decode" else ())
    for name, which in cache:
        (e,) = enc["activation_encodings"][name]
        assert e["bitwidth"] == 8 and e["is_symmetric"] == "False"
        assert e["scale"] == pytest.approx(kv[which]["scale"], rel=1e-12)
        assert e["offset"] == -kv[which]["offset"]
