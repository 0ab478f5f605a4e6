"""An artifact as the phone runs it (quant.device_table): learned encodings kept bit for bit, only the
model-level roles, the tensors the HTP runs at 16 bits and the per-channel weights made symmetric
recalibrated; its export compiles whole for
the Snapdragon 8 Gen 3 HTP, where the reference-scheme export of the same artifact does not."""

from __future__ import annotations

import json

import pytest
import torch

from devicelab.compile import CompileError, compile_export
from quant import CalibConfig, artifact, data, load_model, quantize
from quant.device_table import device_scheme_name, to_device_table
from quant.export import export_artifact
from quant.sim import quantizers


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("devtable")
    lm = load_model("smollm2-135m", num_layers=1)
    res = quantize(lm, scheme="w8a8", method="rtn", calib=CalibConfig(4, 32, 0), progress=False)
    return artifact.save(lm.model, lm.tokenizer, root / "a", res.recipe)


def test_learned_encodings_are_kept_and_new_ones_calibrated(saved):
    src = artifact.load(saved)
    dev = to_device_table(saved, progress=False)
    old, new = quantizers(src.model), quantizers(dev.model)
    info = dev.recipe["device_table"]
    assert dev.recipe["scheme"] == "w8a8:device" and dev.recipe["derived_from"] == src.recipe["content_hash"]
    assert sorted(info["recalibrated"]) == sorted(
        ["lm_head.output", "lm_head.weight", "model.embed_tokens.output", "model.layers.0.attn_residual",
         "model.layers.0.mlp.down_proj.weight", "model.layers.0.output", "model.norm.input", "model.norm.output",
         "model.norm.weight",
         # at 16 bits on the HTP: the norms' outputs and down_proj's input
         "model.layers.0.input_layernorm.output", "model.layers.0.post_attention_layernorm.output",
         "model.layers.0.mlp.down_proj.input"])
    # all but down_proj's weight (made symmetric) and the three tensors the HTP runs at 16 bits
    assert info["kept"] == len(old) - 4 == len(new) - len(info["recalibrated"])
    for name in set(new) - set(info["recalibrated"]):
        assert torch.equal(new[name].scale, old[name].scale) and torch.equal(new[name].offset, old[name].offset)
    down = new["model.layers.0.mlp.down_proj.weight"]
    assert down.spec.symmetric and down.spec.per_channel and torch.all(down.offset == 0)
    assert all(new[n].calibrated for n in info["recalibrated"])
    ids = data.eval_windows(dev.tokenizer, 32, limit=1)
    with torch.no_grad():
        a = src.model(input_ids=ids, use_cache=False).logits
        b = dev.model(input_ids=ids, use_cache=False).logits
    assert 0 < (a - b).norm() / a.norm() < 0.5  # a different model, but the same one quantized further
    assert device_scheme_name("w8a8:down.in=16") == "w8a8:down.in=16,device"
    assert device_scheme_name("w4a8:device") == "w4a8:device"
    with pytest.raises(ValueError, match="float model has no device table"):
        device_scheme_name("fp")


def test_device_export_compiles_whole_for_sm8650(saved, tmp_path):
    plain = export_artifact(saved, tmp_path / "plain", prefill=16, ctx=32)
    with pytest.raises(CompileError, match=r"refused 1 node\(s\): model.layers.0.mlp.down_proj"):
        compile_export(plain, graphs=("prefill",), progress=False)
    dev = export_artifact(saved, prefill=16, ctx=32, device_table=True, progress=False)
    assert dev.name == "a.device.export"
    index = json.loads((dev / "export.json").read_text())
    assert index["scheme"] == "w8a8:device" and index["artifact_hash"] != artifact.read_recipe(saved)["content_hash"]
    out = compile_export(dev, progress=False)  # prefill and decode, no CPU fallback allowed
    rec = json.loads((out / "compile.json").read_text())
    assert set(rec["graphs"]) == {"prefill", "decode"}
    assert all(g["cpu_nodes"] == [] and g["context_binary_bytes"] > 0 for g in rec["graphs"].values())


def test_farm_export_writes_the_device_table_by_default(saved, tmp_path, capsys):
    """The phone is the default path: `farm export ARTIFACT` is the device table (the README's
    `farm quantize --scheme w8a8` -> `farm export` -> `farm compile` compiles, as tested above);
    `--no-device-table` is the artifact's own scheme."""
    from farm.cli import main

    out = tmp_path / "dev"
    assert main(["export", str(saved), "--out", str(out), "--prefill", "16", "--ctx", "32"]) == 0
    assert json.loads((out / "export.json").read_text())["scheme"] == "w8a8:device"
    plain = tmp_path / "plain"
    assert main(["export", str(saved), "--out", str(plain), "--prefill", "16", "--ctx", "32", "--no-device-table"]) == 0
    assert json.loads((plain / "export.json").read_text())["scheme"] == "w8a8"
    assert "scheme w8a8:device" in capsys.readouterr().out
