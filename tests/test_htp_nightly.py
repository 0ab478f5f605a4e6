"""The nightly's HTP-agreement bar (farm.orchestrate.nightly.htp_agreement / htp_checks): the suite's small
W8A8 RTN trial, exported under the device table, compiled, and run on the QNN HTP emulator against
onnxruntime's CPU.

* A real 2-layer SmolLM2 artifact through the whole check (export, compile for SM8650, one window of 32
  tokens): the bars are the nightly's own, every quantized tensor at 10 dB or more and the logits' top-1
  at 95% or more (2 layers are shallow enough that the two runtimes' rounding differences have not grown:
  measured 27 dB at the worst, top-1 100%; at 16-30 layers top-1 falls to 83-87% between any two
  implementations that are not bit-exact, docs/deploy.md). The slot's result is kept for the night record.
* Which trials the bar applies to, and a result under the bar as regression verdicts.
"""

from __future__ import annotations

import onnx
import pytest

from devicelab.divergence import quantized_tensors
from devicelab.exported import read_export
from farm.orchestrate import nightly
from quant import CalibConfig, artifact, load_model, quantize
from quant.export import export_artifact

T = 32


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    root = tmp_path_factory.mktemp("htpnight")
    lm = load_model("smollm2-135m", num_layers=2)
    res = quantize(lm, scheme="w8a8", method="rtn", calib=CalibConfig(4, T, 0), progress=False)
    return artifact.save(lm.model, lm.tokenizer, root / "a", res.recipe)


def test_the_htp_bar_on_a_two_layer_export(art, tmp_path):
    slot = "smollm2-135m.L2.w8a8.rtn"
    slots = {slot: {"config": {"model": "smollm2-135m", "layers": 2, "scheme": "w8a8", "method": "rtn"},
                    "artifact_dir": str(art), "run_id": "r1"},
             "smollm2-135m.L2.fp.fp": {"config": {"model": "smollm2-135m", "layers": 2, "scheme": "fp",
                                                  "method": "fp"}, "artifact_dir": str(art)}}
    notes = []
    verdicts = nightly.htp_checks(slots, notes.append,
                                  runner=lambda a: nightly.htp_agreement(a, prefill=T, windows=1))
    res = slots[slot]["htp"]
    assert res["scheme"] == "w8a8:device" and res["windows"] == 1 and res["prefill"] == T
    # every quantized tensor of the prefill graph, not just the logits: the same export's own count
    folder = export_artifact(art, tmp_path / "export", prefill=T, ctx=2 * T, device_table=True, progress=False)
    graph = onnx.load(str(read_export(folder).graph("prefill").path))
    assert res["tensors"] == len(quantized_tensors(graph)) > 2 * 20
    assert res["top1"] >= nightly.HTP_TOP1_BAR and res["worst_sqnr_db"] >= nightly.HTP_SQNR_BAR, res
    assert res["first_below"] is None
    assert [v.metric for v in verdicts] == ["htp/top1", "htp/worst_sqnr_db"]
    assert not any(v.regression for v in verdicts) and all(v.candidate_run == "r1" for v in verdicts)
    assert "htp" not in slots["smollm2-135m.L2.fp.fp"] and len(notes) == 1 and slot in notes[0]


def test_which_trials_and_a_result_under_the_bar():
    assert nightly.htp_slot({"scheme": "w8a8:device", "method": "rtn", "layers": 2})
    assert not nightly.htp_slot({"scheme": "w8a8", "method": "rtn", "layers": None})  # the whole model: too slow
    assert not nightly.htp_slot({"scheme": "w8a8", "method": "rtn", "layers": 16})
    assert not nightly.htp_slot({"scheme": "w4a8", "method": "rtn", "layers": 2})
    assert not nightly.htp_slot({"scheme": "w8a8", "method": "smoothquant", "layers": 2})
    bad = nightly.htp_verdicts("s", {"top1": 0.90, "worst_sqnr_db": 12.0})
    assert [v.regression for v in bad] == [True, False]
    assert bad[0].baseline == nightly.HTP_TOP1_BAR and bad[0].change == pytest.approx(0.90 / 0.95 - 1)
    assert "REGRESSION: htp/top1 of s" in bad[0].sentence()
    with pytest.raises(nightly.NightlyError, match="HTP agreement of s .*RuntimeError: refused"):
        nightly.htp_checks({"s": {"config": {"scheme": "w8a8", "method": "rtn", "layers": 2}, "artifact_dir": "x"}},
                           print, runner=lambda a: (_ for _ in ()).throw(RuntimeError("refused")))
