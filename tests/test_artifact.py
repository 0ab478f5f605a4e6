"""The artifact folder: bit-exact reload, encodings, refusal to overwrite, nothing half-written."""

import json

import pytest
import torch

from quant import CalibConfig, artifact, load_model, quantize
from quant.sim import quantizers


def _quantized(scheme, layers=2):
    lm = load_model("smollm2-135m", num_layers=layers)
    res = quantize(lm, scheme, "rtn", CalibConfig(samples=4, seqlen=64), progress=False)
    return lm, res


@pytest.mark.parametrize("scheme", ["w8a8", "w4a8"])
def test_reload_is_bit_exact(scheme, tmp_path, small_ids):
    ids = small_ids["smollm2-135m"][0]
    lm, res = _quantized(scheme)
    with torch.no_grad():
        before = lm.model(input_ids=ids).logits
    path = artifact.save(lm.model, lm.tokenizer, tmp_path / "art", res.recipe)
    again = artifact.load(path)
    with torch.no_grad():
        after = again.model(input_ids=ids).logits
    assert torch.equal(before, after)
    assert again.recipe["scheme"] == scheme and again.recipe["content_hash"] == artifact.recipe_hash(again.recipe)
    enc = json.loads((path / "encodings.json").read_text())
    assert len(enc["param_encodings"]) + len(enc["activation_encodings"]) == len(quantizers(lm.model))
    down = enc["param_encodings"]["model.layers.0.mlp.down_proj.weight"]
    assert down["per_channel"] and len(down["scale"]) == 576 and down["bitwidth"] == (8 if scheme == "w8a8" else 4)
    probs = enc["activation_encodings"]["model.layers.1.self_attn.attn.probs"]
    assert probs["bitwidth"] == 16 and probs["min"] == [0.0] and 0.99 < probs["max"][0] <= 1.0 + 1e-3
    assert probs["aimet_offset"] == [-o for o in probs["offset"]]
    # the saved weights are a plain transformers checkpoint
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(path)
    assert torch.equal(plain.model.layers[0].mlp.up_proj.weight, lm.model.model.layers[0].mlp.up_proj.weight)


def test_recipe_identifies_the_run(tmp_path):
    lm, res = _quantized("w8a8", layers=1)
    r = res.recipe
    assert r["model"] == "smollm2-135m" and r["method"] == "rtn" and r["num_layers"] == 1
    assert r["calibration"]["samples"] == 4 and r["calibration"]["corpus_id"].startswith("news:")
    assert {"torch", "transformers", "quant"} <= set(r["versions"])
    h = artifact.recipe_hash(r)
    assert artifact.recipe_hash({**r, "timing": {"quantize_s": 99}}) == h  # timings do not change identity
    assert artifact.recipe_hash({**r, "scheme": "w4a8"}) != h


def test_existing_folder_is_refused_and_failures_leave_nothing(tmp_path):
    lm, res = _quantized("w8a8", layers=1)
    out = tmp_path / "art"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(artifact.ArtifactError, match="already exists; pass --overwrite"):
        artifact.save(lm.model, lm.tokenizer, out, res.recipe)
    assert (out / "keep.txt").read_text() == "mine"

    class Boom(Exception):
        pass

    def broken_save(*a, **k):
        raise Boom()

    tok = lm.tokenizer
    orig = tok.save_pretrained
    tok.save_pretrained = broken_save
    with pytest.raises(Boom):
        artifact.save(lm.model, tok, tmp_path / "new", res.recipe)
    tok.save_pretrained = orig
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]  # no temporary folder left behind
    with pytest.raises(artifact.ArtifactError, match="not written by this tool"):  # a user's folder, kept
        artifact.save(lm.model, lm.tokenizer, out, res.recipe, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    artifact.save(lm.model, lm.tokenizer, out, res.recipe, overwrite=True)  # an empty folder holds nothing to lose
    (out / "notes.txt").write_text("added later")
    artifact.save(lm.model, lm.tokenizer, out, res.recipe, overwrite=True)  # ours: replaced whole
    assert not (out / "notes.txt").exists() and (out / "encodings.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]  # the old folder is gone too


def test_uncalibrated_model_cannot_be_saved(tmp_path):
    from quant.sim import simulate

    lm = load_model("smollm2-135m", num_layers=1)
    simulate(lm.model, "w8a8")
    with pytest.raises(artifact.ArtifactError, match="has no range"):
        artifact.save(lm.model, lm.tokenizer, tmp_path / "x", {})
    assert not (tmp_path / "x").exists()


def test_not_an_artifact(tmp_path):
    with pytest.raises(artifact.ArtifactError, match="no recipe.json"):
        artifact.load(tmp_path)
