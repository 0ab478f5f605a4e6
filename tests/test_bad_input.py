"""Bad input through the real `farm` entry point: a table of faults a demanding user would try (damaged and
hand-edited artifacts and exports, impossible flags, outs that are not ours, store addresses, sweep and
device files), each of which must exit 2 with one line naming the fault, no traceback, and nothing changed
on disk: the shared folders (an artifact, its export, a user's folder beside them, the inputs) and the
case's own working folder are snapshotted byte for byte before and after.

The table runs `farm.cli.main([...])` in this process (one torch import for all of it); a few cases also
run as real `farm` subprocesses, to show the one-line, traceback-free stderr end to end. The artifact and
export are built once for the module from one real decoder layer of SmolLM2 (W8A8 RTN, 16-token prefill)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import pytest

from quant import CalibConfig, artifact, load_model, quantize
from quant.files import write_manifest
from tests.test_artifact_encodings import _set as _set_entry, entry  # one way to edit an encoding

ROOT = Path(__file__).resolve().parents[1]
A = "model.layers.0.self_attn.q_proj.output"
W = "model.layers.0.mlp.down_proj.weight"


def snapshot(root: Path, skip: Path | None = None) -> dict:
    """Every entry under ``root``: kind and the bytes' sha256 (large files: size and mtime) or link target."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        if skip is not None and Path(dirpath) == skip.parent:
            dirnames[:] = [d for d in dirnames if Path(dirpath) / d != skip]
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            st = p.lstat()
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p))
            elif p.is_dir():
                out[rel] = ("dir", st.st_mode)
            elif st.st_size > (8 << 20):
                out[rel] = ("file", st.st_size, st.st_mtime_ns, st.st_mode)
            else:
                out[rel] = ("file", hashlib.sha256(p.read_bytes()).hexdigest(), st.st_mode)
    return out


@dataclass
class World:
    root: Path
    art: Path
    exp: Path
    user: Path
    inputs: Path
    data: Path  # a farm data folder with an MLflow store holding sweep "s" (two trials)
    held: list  # sockets holding a port for the case that needs one taken


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    from quant.export import export_model

    root = tmp_path_factory.mktemp("bad-input")
    lm = load_model("smollm2-135m", num_layers=1)
    res = quantize(lm, "w8a8", "rtn", CalibConfig(samples=2, seqlen=32), progress=False)
    art = artifact.save(lm.model, lm.tokenizer, root / "data" / "art", res.recipe)
    exp = export_model(lm.model, lm.tokenizer, root / "data" / "art.export", res.recipe, prefill=16, ctx=32,
                       progress=False)
    user = root / "victim"  # a user's folder beside the data folder
    (user / "sub").mkdir(parents=True)
    (user / "thesis.tex").write_text("\\chapter{Results}\n" * 200)
    (user / "sub" / "figure.png").write_bytes(os.urandom(2048))
    inputs = root / "inputs"
    inputs.mkdir()
    (inputs / "latin1.txt").write_bytes("Caf\xe9 cr\xe8me, na\xefve r\xe9sum\xe9\n".encode("latin-1") * 50)
    (inputs / "empty.txt").write_text("  \n")
    (inputs / "a-file").write_text("not a folder")
    data = root / "farmdata"
    _store(data)
    (inputs / "devices-threads.yaml").write_text("host: {threads: 1000}\n")
    (inputs / "devices-python.yaml").write_text("host: !!python/object/apply:os.system ['echo pwned']\n")
    (inputs / "devices-lockdir.yaml").write_text("lock_dir: /proc/1/mq-locks\n")
    (inputs / "python-tag.yaml").write_text("name: t\nbase: {model: !!python/object/apply:os.system ['echo pwned']}\n")
    (inputs / "broken.yaml").write_text("name: t\nbase: [model\n")
    w = World(root, art, exp, user, inputs, data, [])
    yield w
    for sock in w.held:
        sock.close()


def _store(data: Path) -> None:
    """A real sqlite MLflow store with sweep "s": two trial runs tagged as farm tags them."""
    from mlflow import MlflowClient

    from reports.runs import ROLE, ROLE_TRIAL

    data.mkdir()
    c = MlflowClient(f"sqlite:///{data / 'mlflow.db'}")
    exp = c.create_experiment("s")
    for tid, scheme in (("t1", "w8a8"), ("t2", "w4a8")):
        run = c.create_run(exp, tags={ROLE: ROLE_TRIAL, "trial_id": tid})
        c.log_param(run.info.run_id, "scheme", scheme)
        c.log_param(run.info.run_id, "method", "rtn")
        c.set_terminated(run.info.run_id)


# ---------------------------------------------------------------- making damaged copies

def copy_folder(src: Path, dst: Path) -> Path:
    """A copy whose large files are hard links (cheap): edit them only through :func:`replace_bytes`."""
    for dirpath, _, filenames in os.walk(src):
        d = dst / Path(dirpath).relative_to(src)
        d.mkdir(parents=True, exist_ok=True)
        for f in filenames:
            s = Path(dirpath) / f
            if s.stat().st_size > (1 << 20):
                os.link(s, d / f)
            else:
                shutil.copy2(s, d / f)
    return dst


def replace_bytes(path: Path, data: bytes) -> None:
    path.unlink()  # never write through a hard link into the shared copy
    path.write_bytes(data)


def edit_encodings(art: Path, fn, remanifest: bool = True) -> None:
    p = art / "encodings.json"
    enc = json.loads(p.read_text())
    fn(enc)
    replace_bytes(p, json.dumps(enc).encode())
    if remanifest:  # as a user who also rewrote the manifest would: the value check must refuse it
        write_manifest(art, "manifest.json")


def edit_aimet(exp: Path, graph: str, fn) -> None:
    p = exp / f"{graph}.encodings"
    enc = json.loads(p.read_text())
    fn(enc)
    replace_bytes(p, json.dumps(enc).encode())
    index = json.loads((exp / "export.json").read_text())
    index["files"][p.name] = {"bytes": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
    replace_bytes(exp / "export.json", json.dumps(index).encode())


def with_art(change):
    """A setup: the case's own copy of the artifact, changed by ``change(path)``."""
    def setup(w: World, case: Path) -> dict:
        a = copy_folder(w.art, case / "art")
        change(a)
        return {"a": str(a)}
    return setup


def with_exp(change):
    def setup(w: World, case: Path) -> dict:
        e = copy_folder(w.exp, case / "exp")
        change(e)
        return {"e": str(e)}
    return setup


def _first_aimet(key, value):
    def fn(enc):
        name = next(iter(enc["activation_encodings"]))
        enc["activation_encodings"][name][0][key] = value
    return fn


def _truncate(rel):
    def change(folder):
        data = (folder / rel).read_bytes()
        replace_bytes(folder / rel, data[: len(data) // 2])
    return change


def _scramble_head(rel):
    def change(folder):
        data = bytearray((folder / rel).read_bytes())
        data[:64] = b"\xff" * 64  # same size: export.json's sizes pass, the graph does not parse
        replace_bytes(folder / rel, bytes(data))
    return change


def _corrupt_header(folder):
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[8:16] = b"{garbage"
    replace_bytes(folder / "model.safetensors", bytes(data))


def _same_size_bitwidth(folder):
    p = folder / "encodings.json"
    text = p.read_text()
    i = text.index('"bitwidth": 8')
    replace_bytes(p, (text[:i] + '"bitwidth": 4' + text[i + 13:]).encode())


def _json_edit(rel, fn):
    def change(folder):
        p = folder / rel
        data = json.loads(p.read_text())
        fn(data)
        replace_bytes(p, json.dumps(data).encode())
    return change


def _text(rel, text):
    def change(folder):
        replace_bytes(folder / rel, text.encode())
    return change


def _delete(rel):
    def change(folder):
        (folder / rel).unlink()
    return change


def in_case(**files):
    """A setup writing files into the case folder: name -> text."""
    def setup(w: World, case: Path) -> dict:
        for name, text in files.items():
            (case / name).parent.mkdir(parents=True, exist_ok=True)
            (case / name).write_text(text)
        return {}
    return setup


def taken_port(w: World, case: Path) -> dict:
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    w.held.append(sock)
    return {"port": str(sock.getsockname()[1])}


def linked_cache_entry(w: World, case: Path) -> dict:
    (case / "data" / "stages" / "quantize").mkdir(parents=True)
    (case / "data" / "stages" / "quantize" / "k1").symlink_to(w.user, target_is_directory=True)
    return {}


def symlink_out(w: World, case: Path) -> dict:
    (case / "link").symlink_to(w.user)
    return {}


Q = ["quantize", "--model", "smollm2-135m", "--layers", "1", "--calib-samples", "2", "--seqlen", "32"]

# id -> (argv with {art} {exp} {user} {inputs} {case} {a} {e}, setup or None, regex the one line must match)
CASES = {
    # artifacts: missing, not ours, damaged, hand-edited
    "eval a missing folder": (["eval", "{case}/nope"], None, r"artifact folder .*/nope does not exist"),
    "eval a user folder": (["eval", "{user}"], None, r"victim is not a quantized-model artifact: no recipe.json"),
    "eval a negative scale": (["eval", "{a}", "--limit", "1"], with_art(lambda a: edit_encodings(a, _set_entry(A, "scale", -0.01))),
                              rf"quantizer {A}: scale -0.01 is not a finite positive number"),
    "eval a NaN scale": (["eval", "{a}"], with_art(lambda a: edit_encodings(a, _set_entry(W, "scale", float("nan"), 5))),
                         rf"quantizer {W}: scale nan \(channel 5\)"),
    "eval a changed bitwidth": (["eval", "{a}"], with_art(lambda a: edit_encodings(a, _set_entry(A, "bitwidth", 4))),
                                rf"quantizer {A}: bitwidth 4 does not match its scheme"),
    "eval a missing scale key": (["eval", "{a}"], with_art(lambda a: edit_encodings(a, lambda e: entry(e, A).pop("scale"))),
                                 rf"quantizer {A}: no 'scale' key"),
    "eval an offset out of range": (["eval", "{a}"], with_art(lambda a: edit_encodings(a, _set_entry(A, "offset", 300))),
                                    r"offset 300.0 is not an integer in \[0, 255\]"),
    "eval a same-size edit": (["eval", "{a}"], with_art(_same_size_bitwidth), r"encodings.json does not match the sha256"),
    "eval a truncated model.safetensors": (["eval", "{a}"], with_art(_truncate("model.safetensors")),
                                           r"model.safetensors has \d+ bytes, its manifest says \d+"),
    "eval a corrupt model.safetensors": (["eval", "{a}"], with_art(_corrupt_header),
                                         r"model.safetensors cannot be loaded .*damaged"),
    "eval a recipe that is not JSON": (["eval", "{a}"], with_art(_text("recipe.json", "{scheme: w8a8")),
                                       r"recipe .*recipe.json is not valid JSON"),
    "verify a missing file": (["verify", "{a}"], with_art(_delete("config.json")), r"config.json is missing \(listed in"),
    "eval encodings for another scheme": (["eval", "{a}"], with_art(lambda a: edit_encodings(
        a, lambda e: e["scheme"].update(name="w8a16"))), r"encodings .* are for scheme 'w8a16', its recipe says 'w8a8'"),
    # exports
    "eval a truncated prefill.onnx": (["eval", "{e}"], with_exp(_truncate("prefill.onnx")),
                                      r"prefill.onnx has \d+ bytes, export.json says \d+"),
    "eval a damaged prefill.onnx of the same size": (["eval", "{e}"], with_exp(_scramble_head("prefill.onnx")),
                                                     r"onnxruntime: .*prefill.onnx failed"),
    "eval NaN in an export's encodings": (["eval", "{e}"], with_exp(lambda e: edit_aimet(e, "prefill", _first_aimet("scale", float("nan")))),
                                          r"prefill.encodings: tensor \S+: scale nan is not a finite positive number"),
    "compile a negative scale": (["compile", "{e}"], with_exp(lambda e: edit_aimet(e, "decode", _first_aimet("scale", -2.0))),
                                 r"decode.encodings: tensor \S+: scale -2.0 is not a finite positive number"),
    "eval an offset off the AIMET grid": (["eval", "{e}"], with_exp(lambda e: edit_aimet(e, "prefill", _first_aimet("offset", 7))),
                                     r"prefill.encodings: tensor \S+: offset 7 is outside AIMET's \d+-bit"),
    "eval an export of an unknown version": (["eval", "{e}"], with_exp(_json_edit("export.json", lambda d: d.update(exporter_version=99))),
                                             r"exporter_version 99 is not one this devicelab reads"),
    "eval a bad cache encoding": (["eval", "{e}"], with_exp(_json_edit("export.json", lambda d: d["kv_encoding"]["v"].update(scale=0.0))),
                                  r"kv_encoding v: scale 0.0 is not a finite positive number"),
    # quantize: flags
    "quantize --calib-samples 100000000": (Q[:5] + ["--calib-samples", "100000000", "--seqlen", "32", "--out", "{case}/o"], None,
                                           r"100000000 calibration samples asked, but calibration corpus 'news' holds only \d+ distinct windows"),
    "quantize --calib-samples 0": (Q[:5] + ["--calib-samples", "0", "--seqlen", "32", "--out", "{case}/o"], None,
                                   r"calibration samples must be at least 1, got 0"),
    "quantize a non-UTF-8 corpus": (Q + ["--calib-corpus", "{inputs}/latin1.txt", "--out", "{case}/o"], None,
                                    r"corpus file .*latin1.txt is not UTF-8 text"),
    "quantize an empty corpus": (Q + ["--calib-corpus", "{inputs}/empty.txt", "--out", "{case}/o"], None,
                                 r"corpus file .*empty.txt is empty"),
    "quantize a missing corpus": (Q + ["--calib-corpus", "{case}/none.txt", "--out", "{case}/o"], None,
                                  r"corpus '.*none.txt' is neither a known corpus"),
    "quantize --seqlen 1": (Q[:7] + ["--seqlen", "1", "--out", "{case}/o"], None, r"seqlen must be at least 2, got 1"),
    "quantize an unknown scheme": (Q + ["--scheme", "w3a8", "--out", "{case}/o"], None, r"w3a8"),
    "quantize an unknown method": (Q + ["--method", "nosuch", "--out", "{case}/o"], None, r"nosuch"),
    "quantize an unknown model": (["quantize", "--model", "nosuch-model", "--out", "{case}/o"], None, r"nosuch-model"),
    "quantize --layers 0": (["quantize", "--model", "smollm2-135m", "--layers", "0", "--out", "{case}/o"], None,
                            r"num_layers must be in \[1, 30\]"),
    # quantize / export: outs that are not ours
    "quantize --overwrite a user folder": (Q + ["--out", "{user}", "--overwrite"], None,
                                           r"victim exists and was not written by this tool"),
    "quantize onto a user folder": (Q + ["--out", "{user}"], None, r"victim already exists; pass --overwrite"),
    "quantize --out a file": (Q + ["--out", "{inputs}/a-file", "--overwrite"], None, r"a-file is a file, not a folder"),
    "quantize --out under a file": (Q + ["--out", "{inputs}/a-file/x/out"], None, r"is under .*a-file, which is a file"),
    "quantize --out a symlink": (Q + ["--out", "{case}/link", "--overwrite"], symlink_out, r"link is a symbolic link"),
    "quantize --out unwritable": (Q + ["--out", "/proc/1/mq-out"], None, r"no write permission in /proc/1"),
    "export --overwrite a user folder": (["export", "{art}", "--out", "{user}", "--overwrite"], None,
                                         r"victim exists and was not written by this tool"),
    "export --out a file": (["export", "{art}", "--out", "{inputs}/a-file"], None, r"a-file"),
    "quantize --seqlen 0": (Q[:7] + ["--seqlen", "0", "--out", "{case}/o"], None, r"--seqlen must be at least 2, got 0"),
    "quantize --scheme fp --method smoothquant": (Q + ["--scheme", "fp", "--method", "smoothquant", "--out", "{case}/o"],
                                                  None, r"--scheme fp is float: --method smoothquant would not run"),
    "compile --out a user folder": (["compile", "{exp}", "--out", "{user}", "--overwrite"], None,
                                    r"compiled folder .*victim exists and was not written by this tool"),
    # farm gc
    "gc --stage ../../victim": (["gc", "--data", "{data}", "--stage", "../../victim"], None,
                                r"--stage '../../victim' is not a stage of the cache; known stages: quantize"),
    "gc --stage nosuchstage": (["gc", "--data", "{data}", "--stage", "nosuchstage"], None, r"'nosuchstage' is not a stage"),
    "gc --data /nonexistent": (["gc", "--data", "{case}/nonexistent"], None, r"farm data folder .*nonexistent does not exist"),
    "gc a symlinked cache entry": (["gc", "--data", "{case}/data"], linked_cache_entry,
                                   r"cache entry .*k1 is a symbolic link \(to .*victim\)"),
    # tracking stores
    "status --tracking-uri foo://bar": (["status", "s", "--tracking-uri", "foo://bar"], None,
                                        r"'foo' is not a tracking store scheme"),
    "status of an unreachable server": (["status", "s", "--tracking-uri", "http://127.0.0.1:9/"], None,
                                        r"MLflow tracking server http://127.0.0.1:9/ is unreachable"),
    "status of a missing sqlite store": (["status", "s", "--tracking-uri", "sqlite:///{case}/nodir/x.db"], None,
                                         r"no MLflow store at .*nodir/x.db: nothing has been tracked there yet"),
    "report without a store": (["report", "s"], None, r"no MLflow store at .*runs/farm/mlflow.db"),
    "report --columns nosuch.param": (["report", "s", "--data", "{data}", "--columns", "nosuch.param"], None,
                                      r"--columns 'nosuch.param': no trial of sweep 's' has that param; params that "
                                      r"vary: scheme"),
    "report of an unknown sweep": (["report", "nosuch", "--data", "{data}"], None, r"no sweep named 'nosuch'"),
    # farm ui
    "ui --port 99999": (["ui", "--data", "{data}", "--port", "99999"], None, r"--port 99999 is not a TCP port"),
    "ui on a taken port": (["ui", "--data", "{data}", "--port", "{port}"], taken_port,
                           r"cannot serve on 127.0.0.1:\d+: Address already in use"),
    "ui --host that does not resolve": (["ui", "--data", "{data}", "--host", "nosuch.invalid"], None,
                                        r"--host 'nosuch.invalid' does not resolve"),
    # sweep and devices files
    "sweep file with a !!python tag": (["sweep", "{inputs}/python-tag.yaml", "--dry-run"], None,
                                       r"python-tag.yaml:2: base.model: the tag !!python/object/apply:os.system is not "
                                       r"allowed"),
    "sweep file that is not YAML": (["sweep", "{inputs}/broken.yaml", "--dry-run"], None, r"broken.yaml:\d+: not valid YAML"),
    "devices file with host threads 1000": (["bench", "{exp}", "--device", "host", "--devices", "{inputs}/devices-threads.yaml"],
                                            None, r"host.threads: 1000 is more than this machine's \d+ CPUs \(the limit\)"),
    "devices file with a !!python tag": (["devices", "--devices", "{inputs}/devices-python.yaml"], None,
                                         r"devices-python.yaml: not valid YAML: line 1 column 7: the tag is not allowed"),
    "bench --threads 64": (["bench", "{exp}", "--device", "host", "--threads", "64"], None,
                           r"--threads 64 is more than this machine's \d+ CPUs \(the limit\)"),
    "bench with an unwritable lock_dir": (["bench", "{exp}", "--device", "host", "--devices", "{inputs}/devices-lockdir.yaml",
                                           "--repeats", "1", "--warmup", "0", "--graph", "prefill"], None,
                                          r"lock_dir /proc/1/mq-locks: cannot hold the lock of device 'host'"),
    # evaluation flags
    "eval --seqlen 0": (["eval", "{art}", "--seqlen", "0"], None, r"--seqlen must be at least 2, got 0"),
    "eval --limit 0": (["eval", "{art}", "--seqlen", "32", "--limit", "0"], None, r"limit must be at least 1, got 0"),
    "eval a missing corpus": (["eval", "{art}", "--seqlen", "32", "--corpus", "{case}/none.txt"], None, r"neither a known corpus"),
}


def run_farm(argv: list[str]) -> tuple[int, str, str]:
    from farm.cli import main

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as e:  # argparse
            rc = e.code
    return rc, out.getvalue(), err.getvalue()


def _lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.strip()]


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2_and_changes_nothing(world, case, tmp_path, monkeypatch):
    argv, setup, want = CASES[case]
    here = tmp_path / "case"
    here.mkdir()
    fields = {"art": str(world.art), "exp": str(world.exp), "user": str(world.user), "inputs": str(world.inputs),
              "data": str(world.data), "case": str(here)}
    if setup is not None:
        fields.update(setup(world, here))
    argv = [a.format(**fields) for a in argv]
    monkeypatch.chdir(here)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    shared, own = snapshot(world.root), snapshot(here)
    rc, _, err = run_farm(argv)
    lines = _lines(err)
    assert rc == 2, (rc, err)
    assert "Traceback" not in err
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"farm {argv[0]}: error: "), lines
    assert re.search(want, lines[0]), lines[0]
    assert snapshot(world.root) == shared, "a file outside the case folder changed"
    assert snapshot(here) == own, "the command left something in its working folder"


def test_the_table_is_large_enough():
    assert len(CASES) >= 40


@pytest.mark.parametrize("case", ["quantize --overwrite a user folder", "eval a NaN scale"])
def test_as_a_real_process_one_line_and_no_traceback(world, case, tmp_path):
    """The console script itself: what a user's terminal shows."""
    argv, setup, want = CASES[case]
    fields = {"art": str(world.art), "exp": str(world.exp), "user": str(world.user), "inputs": str(world.inputs),
              "data": str(world.data), "case": str(tmp_path)}
    if setup is not None:
        fields.update(setup(world, tmp_path))
    shared = snapshot(world.root)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.run([sys.executable, "-m", "farm.cli", *[a.format(**fields) for a in argv]], cwd=tmp_path,
                          env={**env, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                               "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300)
    lines = _lines(proc.stderr)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr
    assert re.search(want, lines[0])
    assert snapshot(world.root) == shared


# ---------------------------------------------------------------- regressions beyond the table

def test_a_server_that_accepts_but_never_answers_is_one_line_within_seconds(world, tmp_path, monkeypatch):
    """`farm status` against a port that accepts and then says nothing: MLflow's defaults retried for
    minutes; a read-only command now gives up after one short request."""
    import socket
    import time

    monkeypatch.chdir(tmp_path)
    for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.setenv(k, "")  # recorded, so what farm sets in this process is undone afterwards
        monkeypatch.delenv(k)
    with socket.socket() as mute:
        mute.bind(("127.0.0.1", 0))
        mute.listen(8)
        t0 = time.monotonic()
        rc, _, err = run_farm(["status", "s", "--tracking-uri", f"http://127.0.0.1:{mute.getsockname()[1]}"])
        took = time.monotonic() - t0
    assert rc == 2 and len(_lines(err)) == 1 and "Read timed out" in err and "Traceback" not in err, err
    assert took < 40, took


def test_ui_warns_off_loopback_and_fails_when_its_server_fails(world, monkeypatch, capsys):
    """`farm ui --host 0.0.0.0` says the UI has no authentication; a server that exits with an error makes
    `farm ui` exit non-zero (here the server command is a real process that fails with status 3)."""
    from farm.cli import main, sweep_cmds

    monkeypatch.setattr(sweep_cmds, "ui_command", lambda *a: ([sys.executable, "-c", "import sys; sys.exit(3)"], dict(os.environ)))
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rc = main(["ui", "--data", str(world.data), "--host", "0.0.0.0", "--port", str(port)])
    err = capsys.readouterr().err
    assert rc == 2
    assert "warning: --host 0.0.0.0 serves the MLflow UI beyond this machine, and it has no authentication" in err
    assert _lines(err)[-1] == "farm ui: error: the MLflow server exited with status 3 (its output is above)"


def test_devices_stops_the_adb_server_it_started(tmp_path, monkeypatch, capsys):
    """A phone's health is asked through adbutils, which starts the real adb server when none runs; `farm
    devices` stops the one it started (on a port of its own here, so no other adb user is disturbed)."""
    import socket

    from farm.cli import main

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("ANDROID_ADB_SERVER_PORT", str(port))
    devices = tmp_path / "devices.yaml"
    devices.write_text(f"phones:\n  - {{name: p1, serial: 127.0.0.1:1}}\nlock_dir: {tmp_path / 'locks'}\n")
    assert main(["devices", "--devices", str(devices)]) == 0
    err = capsys.readouterr().err
    assert f"stopped the adb server this command started on 127.0.0.1:{port}" in err
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_ctrl_c_after_the_write_is_one_line_and_the_artifact_is_whole(world, tmp_path, monkeypatch):
    """Ctrl-C during `farm quantize --eval`, after the artifact was written: exit 130, one line, and the
    artifact on disk passes the full check."""
    import quant

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(quant, "evaluate_perplexity", interrupted)
    out = tmp_path / "art"
    rc, _, err = run_farm(Q + ["--out", str(out), "--eval"])
    assert rc == 130 and "Traceback" not in err and _lines(err)[-1] == "farm quantize: interrupted", err
    assert artifact.verify(out, full=True)["files"] >= 8


def test_a_dry_run_says_when_no_trial_can_start_here(tmp_path, capsys):
    """`--dry-run` listed trials that no node of this machine can ever run as pending, without a word."""
    from farm.cli import main

    sweep = tmp_path / "gpu.yaml"
    sweep.write_text("name: gpu\nbase: {model: smollm2-135m, layers: 1, seqlen: 32, samples: 2}\n"
                     "grid: {method: [rtn]}\nresources: {cpu: 1, gpu: 64}\n")
    assert main(["sweep", str(sweep), "--dry-run", "--data", str(tmp_path / "d")]) == 0
    err = capsys.readouterr().err
    import torch

    want = f"warning: no trial can run here: each needs 64 GPU (this machine has {torch.cuda.device_count()})"
    assert want in err, err
    assert not (tmp_path / "d").exists()  # a dry run writes nothing
