"""`farm gc` on a data folder laid out as farm writes it, with a real sqlite MLflow registry: exact
entries removed and bytes freed, the best-registered artifact kept, nothing touched while a sweep runs."""

from __future__ import annotations

import fcntl
import json
import subprocess
import sys

from mlflow import MlflowClient

from farm.orchestrate.gc import collect


def _entry(root, stage, key, nbytes):
    art = root / "stages" / stage / key / "artifact"
    art.mkdir(parents=True)
    (art / "model.safetensors").write_bytes(b"\0" * nbytes)
    (art.parent / "meta.json").write_text(json.dumps({"stage": stage, "key": key}))  # 32 bytes
    return art.parent


def _farm(*args):
    return subprocess.run([sys.executable, "-m", "farm.cli", *args], capture_output=True, text=True, timeout=120)


def test_gc_removes_unregistered_artifacts_and_refuses_during_a_sweep(tmp_path):
    old = _entry(tmp_path, "quantize", "a1", 1000)
    best = _entry(tmp_path, "quantize", "b2", 2000)
    partial = _entry(tmp_path, "quantize", ".c3.tmp-x", 500)  # a computation that never committed
    stats = _entry(tmp_path, "activation_stats", "d4", 300)
    (tmp_path / "stages" / "quantize" / "a1.lock").write_text("")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = MlflowClient(uri)
    c.create_registered_model("s.smollm2-135m.w8a8")
    mv = c.create_model_version("s.smollm2-135m.w8a8", source=str(best / "artifact"))
    c.set_registered_model_alias("s.smollm2-135m.w8a8", "best", mv.version)
    meta = len(json.dumps({"stage": "quantize", "key": "a1"}))

    dry = collect(tmp_path, uri, dry_run=True)
    assert sorted(p.name for p in dry.removed) == [".c3.tmp-x", "a1"] and dry.kept == [best]
    assert dry.freed_bytes == 1000 + 500 + meta + len(json.dumps({"stage": "quantize", "key": ".c3.tmp-x"}))
    assert old.exists() and partial.exists()

    (tmp_path / "sweeps").mkdir()
    with open(tmp_path / "sweeps" / "nightly.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        busy = _farm("gc", "--data", str(tmp_path))
        fcntl.flock(fh, fcntl.LOCK_UN)
    assert busy.returncode == 2 and "sweep 'nightly' is running" in busy.stderr
    assert old.exists() and partial.exists()

    out = _farm("gc", "--data", str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert "removed 2 cache entries" in out.stdout and "kept 1 registered as best" in out.stdout
    assert not old.exists() and not partial.exists() and best.exists() and stats.exists()
    assert (tmp_path / "stages" / "quantize" / "a1.lock").exists()  # locks are not entries

    everything = _farm("gc", "--data", str(tmp_path), "--all", "--stage", "quantize", "--stage", "activation_stats")
    assert everything.returncode == 0 and "removed 2 cache entries" in everything.stdout
    assert not best.exists() and not stats.exists()


def _tree(root):
    """Every path under ``root`` with its bytes (files) or link target: for byte-for-byte comparisons."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = ("link", str(p.readlink())) if p.is_symlink() else ("dir",) if p.is_dir() else p.read_bytes()
    return out


def test_gc_never_removes_outside_the_data_folder(tmp_path, capsys):
    """The user's folder beside the data folder survives every path gc can be given, byte for byte: a stage
    that is a path, an unknown stage, a symlinked entry or stage folder pointing at it. In this process
    (farm.cli.main), but for the symlinked entry, run as the real command."""
    from farm.cli import main

    def farm(*args):
        capsys.readouterr()
        rc = main(list(args))
        out = capsys.readouterr()
        return subprocess.CompletedProcess(args, rc, out.out, out.err)

    data = tmp_path / "data"
    victim = tmp_path / "victim"
    (victim / "chapter1").mkdir(parents=True)
    (victim / "chapter2").mkdir()
    (victim / "thesis.tex").write_text("\\chapter{Results}\n" * 100)
    (victim / "chapter1" / "draft.tex").write_text("draft")
    keep = _entry(data, "quantize", "a1", 100)
    before = _tree(tmp_path)

    cases = [
        (["--stage", "../../victim"], "--stage '../../victim' is not a stage of the cache; known stages: quantize"),
        (["--stage", str(victim)], "is not a stage of the cache"),
        (["--stage", "nosuchstage"], "--stage 'nosuchstage' is not a stage of the cache"),
    ]
    for extra, want in cases:
        r = farm("gc", "--data", str(data), *extra)
        assert r.returncode == 2 and want in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert "Traceback" not in r.stderr
        assert _tree(tmp_path) == before

    r = farm("gc", "--data", str(tmp_path / "nonexistent"))
    assert r.returncode == 2 and f"farm data folder {tmp_path / 'nonexistent'} does not exist" in r.stderr

    link = data / "stages" / "quantize" / "b2"
    link.symlink_to(victim, target_is_directory=True)
    before = _tree(tmp_path)
    r = _farm("gc", "--data", str(data))
    assert r.returncode == 2 and f"cache entry {link} is a symbolic link (to {victim})" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert _tree(tmp_path) == before and keep.exists()  # refused before anything was removed
    link.unlink()

    stats = data / "stages" / "activation_stats"
    stats.symlink_to(victim, target_is_directory=True)
    r = farm("gc", "--data", str(data), "--stage", "activation_stats")
    assert r.returncode == 2 and f"{stats} is a symbolic link" in r.stderr
    stats.unlink()
    assert _tree(victim) == {k[len("victim/"):]: v for k, v in before.items() if k.startswith("victim/")}
    r = farm("gc", "--data", str(data))
    assert r.returncode == 0 and "removed 1 cache entries" in r.stdout and not keep.exists()
