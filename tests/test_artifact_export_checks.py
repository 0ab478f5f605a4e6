"""An export folder is checked when it is read (devicelab.read_export, used by eval, bench and compile): NaN,
negative or zero scales, offsets off AIMET's grid, min/max that disagree, a bad cache encoding, and a
truncated or edited graph or encodings file are refused with the file and tensor named. On the tiny QDQ
export of the devicelab fixtures (no torch model to build), plus the real exporter's output in
tests/test_bad_input.py."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest

from devicelab.exported import ExportError, read_export
from tests.devicelab_fixtures import make_tiny_export


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = make_tiny_export(tmp_path_factory.mktemp("exp") / "tiny.export")
    index = json.loads((root / "export.json").read_text())
    index["files"] = {f: {"bytes": (root / f).stat().st_size, "sha256": hashlib.sha256((root / f).read_bytes()).hexdigest()}
                      for f in ("prefill.onnx", "decode.onnx", "prefill.encodings", "decode.encodings")}
    (root / "export.json").write_text(json.dumps(index))  # as the real exporter writes it
    return root


@pytest.fixture
def exp(tiny, tmp_path):
    return shutil.copytree(tiny, tmp_path / "e.export")


def _first(enc: dict) -> tuple[str, dict]:
    name, entries = next(iter(enc["activation_encodings"].items()))
    return name, entries[0]


def _edit_encodings(exp, fn, relist: bool = True):
    p = exp / "prefill.encodings"
    enc = json.loads(p.read_text())
    name, e = _first(enc)
    fn(e)
    p.write_text(json.dumps(enc))
    if relist:  # as someone would who also rewrote export.json's table: the value check must refuse it
        index = json.loads((exp / "export.json").read_text())
        index["files"]["prefill.encodings"] = {"bytes": p.stat().st_size,
                                               "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
        (exp / "export.json").write_text(json.dumps(index))
    return name


def test_the_untouched_export_reads(tiny):
    assert read_export(tiny).index["graphs"]["prefill"]["file"] == "prefill.onnx"


@pytest.mark.parametrize("case,fn,want", [
    ("nan scale", lambda e: e.update(scale=float("nan")), "scale nan is not a finite positive number"),
    ("negative scale", lambda e: e.update(scale=-0.5), "scale -0.5 is not a finite positive number"),
    ("zero scale", lambda e: e.update(scale=0), "scale 0 is not a finite positive number"),
    ("offset positive", lambda e: e.update(offset=3, is_symmetric="False"), "offset 3 is outside AIMET's 8-bit unsigned grid"),
    ("offset fraction", lambda e: e.update(offset=-2.5), "offset -2.5 is not an integer"),
    ("bitwidth text", lambda e: e.update(bitwidth="8"), "bitwidth '8' is not an integer"),
    ("min edited", lambda e: e.update(min=9.9), "min 9.9 is not what its scale and offset imply"),
    ("no scale", lambda e: e.pop("scale"), "no 'scale' key"),
])
def test_a_bad_aimet_entry_is_refused_naming_file_and_tensor(exp, case, fn, want):
    name = _edit_encodings(exp, fn)
    with pytest.raises(ExportError, match=want) as e:
        read_export(exp)
    assert f"{exp / 'prefill.encodings'}: tensor {name}" in str(e.value)


def test_a_same_size_edit_of_the_encodings_is_caught_by_its_hash(exp):
    p = exp / "prefill.encodings"
    text = p.read_text()
    i = text.index('"scale": ') + len('"scale": ')
    p.write_text(text[:i] + ("9" if text[i] != "9" else "8") + text[i + 1:])  # one digit, same size
    with pytest.raises(ExportError, match="prefill.encodings does not match the sha256"):
        read_export(exp)


def test_a_truncated_graph_is_refused_by_its_size(exp):
    p = exp / "prefill.onnx"
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(ExportError, match=f"{p} has {len(data) // 2} bytes, export.json says {len(data)}"):
        read_export(exp)
    p.unlink()
    with pytest.raises(ExportError, match=f"{p} is missing"):
        read_export(exp)


@pytest.mark.parametrize("where", ["kv_encoding", "output"])
def test_a_bad_cache_encoding_is_refused(exp, where):
    index = json.loads((exp / "export.json").read_text())
    if where == "kv_encoding":
        index["kv_encoding"]["k"]["scale"] = float("nan")
        want = "kv_encoding k: scale nan"
    else:
        index["graphs"]["prefill"]["outputs"][1]["encoding"] = {"scale": -1.0, "offset": 0, "bitwidth": 8}
        want = "prefill output k_out: scale -1.0"
    (exp / "export.json").write_text(json.dumps(index))
    with pytest.raises(ExportError, match=want):
        read_export(exp)
