"""An artifact protects its own content: a manifest with every file's size and sha256, checked by
`farm verify` (once in a subprocess, as a user runs it, otherwise in this process) and by loading; modes from the umask; malformed JSON
named by file. One real quantized decoder layer of SmolLM2 (W8A8 RTN) saved once for the module."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys

import pytest

from quant import CalibConfig, artifact, load_model, quantize
from quant.files import read_json

FILES = {"model.safetensors", "config.json", "encodings.json", "recipe.json", "generation_config.json",
         "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    lm = load_model("smollm2-135m", num_layers=1)
    res = quantize(lm, "w8a8", "rtn", CalibConfig(samples=2, seqlen=32), progress=False)
    old = os.umask(0o027)  # a lab's umask: group may read, others nothing
    try:
        path = artifact.save(lm.model, lm.tokenizer, tmp_path_factory.mktemp("m") / "art", res.recipe)
    finally:
        os.umask(old)
    return path


@pytest.fixture
def art(saved, tmp_path):
    """A fresh copy per test, so tampering stays local."""
    return shutil.copytree(saved, tmp_path / "art")


class Ran:
    def __init__(self, returncode: int, stdout: str, stderr: str):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


@pytest.fixture
def farm(capsys):
    """`farm ARGS` in this process (a subprocess per call would re-import torch each time)."""
    from farm.cli import main

    def run(*args: str) -> Ran:
        capsys.readouterr()
        rc = main(list(args))
        out = capsys.readouterr()
        return Ran(rc, out.out, out.err)
    return run


def test_the_manifest_lists_every_file_with_its_size_and_hash(saved):
    man = json.loads((saved / "manifest.json").read_text())
    names = {p.name for p in saved.iterdir()} - {"manifest.json"}
    assert set(man["files"]) == names and FILES <= names
    for name, entry in man["files"].items():
        assert entry["bytes"] == (saved / name).stat().st_size
    import hashlib

    weights = (saved / "model.safetensors").read_bytes()
    assert man["files"]["model.safetensors"]["sha256"] == hashlib.sha256(weights).hexdigest()


def test_modes_follow_the_umask_not_the_temporary_folder(saved):
    assert stat.S_IMODE(saved.stat().st_mode) == 0o750  # mkdtemp alone gives 0700
    for p in saved.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o640, p.name


def test_an_untouched_artifact_passes(art):
    r = subprocess.run([sys.executable, "-m", "farm.cli", "verify", str(art)], capture_output=True, text=True,
                       timeout=120)  # once through a real process, as a user runs it
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"{art}: ok, {len(FILES)} files,") and "sizes and sha256 match" in r.stdout
    assert artifact.verify(art, full=True)["files"] == len(FILES)
    assert artifact.load(art, verify_files=True).recipe["scheme"] == "w8a8"


def _flip_a_byte(path, offset=-1000):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_flipped_byte_in_the_weights_is_refused_by_verify_and_a_verifying_load(art, monkeypatch, farm):
    _flip_a_byte(art / "model.safetensors")
    r = farm("verify", str(art))
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip() == (f"farm verify: error: {art / 'model.safetensors'} does not match the sha256 in "
                                f"{art / 'manifest.json'}: its content was changed after it was written")
    with pytest.raises(artifact.ArtifactError, match="model.safetensors does not match the sha256"):
        artifact.load(art, verify_files=True)
    monkeypatch.setenv("MQFARM_VERIFY", "full")  # the same switch as the embedded models' cache
    with pytest.raises(artifact.ArtifactError, match="model.safetensors does not match the sha256"):
        artifact.load(art)
    monkeypatch.delenv("MQFARM_VERIFY")
    assert artifact.verify(art, full=False)["files"] == len(FILES)  # same size: only the hash sees it
    r = farm("eval", str(art), "--limit", "1")
    assert r.returncode == 0  # a plain load checks sizes only (by design: no full read per load)


def test_a_changed_size_is_refused_by_every_load(art, farm):
    with open(art / "encodings.json", "a") as f:
        f.write(" ")
    with pytest.raises(artifact.ArtifactError, match=r"encodings.json has \d+ bytes, its manifest says \d+"):
        artifact.load(art, verify_files=False)
    r = farm("eval", str(art), "--limit", "1")
    assert r.returncode == 2 and "encodings.json has" in r.stderr and "changed or truncated" in r.stderr


def test_a_missing_file_is_refused(art, farm):
    (art / "tokenizer.json").unlink()
    r = farm("verify", str(art))
    assert r.returncode == 2
    assert r.stderr.strip() == (f"farm verify: error: {art / 'tokenizer.json'} is missing "
                                f"(listed in {art / 'manifest.json'})")
    with pytest.raises(artifact.ArtifactError, match="tokenizer.json is missing"):
        artifact.load(art)


def test_a_missing_manifest_or_a_file_added_later(art, farm):
    (art / "NOTES.txt").write_text("mine")
    r = farm("verify", str(art), "--sizes-only")
    assert r.returncode == 0 and "not in the manifest (added later, not checked): NOTES.txt" in r.stdout
    (art / "manifest.json").unlink()
    r = farm("verify", str(art))
    assert r.returncode == 2 and "has no manifest.json: it was written before artifacts carried one" in r.stderr
    missing = farm("verify", str(art / "nope")).stderr.strip()
    assert missing == f"farm verify: error: artifact folder {art / 'nope'} does not exist"


def test_malformed_json_names_its_file(art, tmp_path, farm):
    (art / "recipe.json").write_text("{\n 'scheme': 'w8a8'}")
    r = farm("eval", str(art), "--limit", "1")
    assert r.returncode == 2
    assert r.stderr.strip() == (f"farm eval: error: recipe {art / 'recipe.json'} is not valid JSON: Expecting "
                                "property name enclosed in double quotes at line 2 column 2")
    bad = tmp_path / "x.json"
    bad.write_text("[1, 2")
    with pytest.raises(ValueError, match=f"encodings {bad} is not valid JSON: Expecting ',' delimiter at line 1"):
        read_json(bad, "encodings")
