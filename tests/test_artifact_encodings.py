"""Every encoding is checked on load: a negative, zero or NaN scale, an offset outside its bitwidth's codes,
a bitwidth or symmetry that is not the scheme's, a missing key, a min/max that disagree with the scale are
refused with the file and the quantizer named; a same-size edit is caught by the manifest (small files are
hashed on every load); a damaged model.safetensors is one error naming it. One real 1-layer SmolLM2 W8A8
RTN artifact, saved once for the module."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from quant import CalibConfig, artifact, load_model, quantize
from quant.files import write_manifest
from quant.sim import quantizers

W = "model.layers.0.mlp.down_proj.weight"  # per-channel asymmetric weight
A = "model.layers.0.self_attn.q_proj.output"  # per-tensor activation


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    lm = load_model("smollm2-135m", num_layers=1)
    res = quantize(lm, "w8a8", "rtn", CalibConfig(samples=2, seqlen=32), progress=False)
    return artifact.save(lm.model, lm.tokenizer, tmp_path_factory.mktemp("enc") / "art", res.recipe)


@pytest.fixture
def art(saved, tmp_path):
    return shutil.copytree(saved, tmp_path / "art")


def edit(art, fn, remanifest: bool = True):
    """Change encodings.json with ``fn(enc)``; ``remanifest``: as someone would who also rewrote the manifest,
    so that the value check, not the hash, is what refuses it."""
    p = art / "encodings.json"
    enc = json.loads(p.read_text())
    fn(enc)
    p.write_text(json.dumps(enc))
    if remanifest:
        write_manifest(art, "manifest.json")


def entry(enc, name):
    return enc["param_encodings"].get(name) or enc["activation_encodings"][name]


def test_a_valid_artifact_loads_with_the_values_it_saved(saved):
    lm = artifact.load(saved)
    enc = json.loads((saved / "encodings.json").read_text())
    qs = quantizers(lm.model)
    assert set(qs) == set(enc["param_encodings"]) | set(enc["activation_encodings"])
    for name, q in qs.items():
        e = entry(enc, name)
        assert torch.equal(q.scale, torch.tensor(e["scale"], dtype=torch.float32))
        assert torch.equal(q.offset, torch.tensor(e["offset"], dtype=torch.float32))


def _set(name, key, value, index=0):
    def fn(enc):
        e = entry(enc, name)
        if isinstance(e[key], list):
            e[key][index] = value
        else:
            e[key] = value
    return fn


CASES = {
    "negative scale": (_set(A, "scale", -0.01), f"quantizer {A}: scale -0.01 is not a finite positive number"),
    "zero scale": (_set(W, "scale", 0.0, 7), f"quantizer {W}: scale 0.0 \\(channel 7\\) is not a finite positive"),
    "NaN scale": (_set(W, "scale", float("nan"), 3), f"quantizer {W}: scale nan \\(channel 3\\)"),
    "infinite scale": (_set(A, "scale", float("inf")), f"quantizer {A}: scale inf"),
    "scale a string": (_set(A, "scale", "0.1"), f"quantizer {A}: 'scale' is not a number"),
    "offset above 255": (_set(A, "offset", 256.0), f"quantizer {A}: offset 256.0 is not an integer in \\[0, 255\\]"),
    "offset not an integer": (_set(A, "offset", 12.5), "offset 12.5 is not an integer"),
    "bitwidth changed": (_set(A, "bitwidth", 4), f"quantizer {A}: bitwidth 4 does not match its scheme, which "
                                                  "quantizes it to 8 bits"),
    "symmetry changed": (_set(W, "symmetric", True), f"quantizer {W}: symmetric True does not match"),
    "missing scale": (lambda enc: entry(enc, A).pop("scale"), f"quantizer {A}: no 'scale' key"),
    "channels missing": (lambda enc: entry(enc, W).update(scale=entry(enc, W)["scale"][:-1]),
                         f"quantizer {W}: 575 scales for 576 output channels"),
    "min edited": (_set(A, "min", 9.9), f"quantizer {A}: min 9.9 is not what its scale and offset imply"),
    "quantizer missing": (lambda enc: enc["activation_encodings"].pop(A), "encodings do not match the model"),
    "no param table": (lambda enc: enc.pop("param_encodings"), "no 'param_encodings' table"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_bad_encoding_is_refused_on_load_naming_the_quantizer(art, case):
    fn, want = CASES[case]
    edit(art, fn)
    with pytest.raises(artifact.ArtifactError, match=want) as e:
        artifact.load(art)
    assert str(art / "encodings.json") in str(e.value) and "\n" not in str(e.value)


def test_a_same_size_edit_is_caught_by_the_hash_of_the_small_files(art):
    p = art / "encodings.json"
    text = p.read_text()
    i = text.index('"bitwidth": 8')
    p.write_text(text[:i] + '"bitwidth": 4' + text[i + len('"bitwidth": 8'):])  # same size, manifest unchanged
    with pytest.raises(artifact.ArtifactError, match="encodings.json does not match the sha256"):
        artifact.load(art)


def test_a_damaged_model_safetensors_is_one_error_naming_it(art):
    st = art / "model.safetensors"
    data = bytearray(st.read_bytes())
    data[8:16] = b"{garbage"  # same size: the manifest's default check passes, the header does not
    st.write_bytes(bytes(data))
    with pytest.raises(artifact.ArtifactError, match=f"{st} cannot be loaded .*damaged"):
        artifact.load(art)
    st.write_bytes(bytes(data[: len(data) // 2]))  # truncated: the manifest's sizes say so first
    with pytest.raises(artifact.ArtifactError, match=f"{st} has {len(data) // 2} bytes, its manifest says"):
        artifact.load(art)
