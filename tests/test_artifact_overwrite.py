"""--overwrite replaces only what the tool wrote, and replaces it whole: a user's folder is refused by name and
left byte for byte as it was; Ctrl-C at any moment of a rewrite leaves the old folder or the new one, each
complete (real SIGINTs to a real writer process, and each step of the swap interrupted in this process)."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from quant import files

ROOT = Path(__file__).resolve().parents[1]


def snapshot(root: Path) -> dict:
    """Every entry under ``root`` (itself included): kind, and the bytes' sha256 or the link's target."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p))
            elif p.is_dir():
                out[rel] = ("dir",)
            else:
                out[rel] = ("file", hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def user_folder(root: Path) -> Path:
    root.mkdir(parents=True)
    (root / "thesis.tex").write_text("\\chapter{Results}\n" * 100)
    (root / "sub").mkdir()
    (root / "sub" / "data.bin").write_bytes(os.urandom(4096))
    (root / "manifest.json").write_text('{"name": "my web app", "version": 3}')  # a manifest, not ours
    return root


def ours(root: Path, tag: str, n: int = 9) -> Path:
    """A folder as the tool writes it: n files and our manifest."""
    with files.atomic_folder(root) as tmp:
        for i in range(n):
            (tmp / f"f{i}.bin").write_text(tag * (1000 + i))
        files.write_manifest(tmp, "manifest.json")
    return root


def whole(root: Path) -> str:
    """The tag of a complete folder of ours; fails on anything half-written or mixed."""
    files.check_manifest(root, "manifest.json", full=True)
    names = sorted(p.name for p in root.iterdir())
    assert names == sorted([f"f{i}.bin" for i in range(9)] + ["manifest.json"]), names
    tags = {(root / f"f{i}.bin").read_text()[0] for i in range(9)}
    assert len(tags) == 1, tags
    return tags.pop()


def siblings(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir())


def test_a_user_folder_is_refused_by_name_and_left_byte_for_byte(tmp_path):
    victim = user_folder(tmp_path / "victim")
    before = snapshot(tmp_path)
    for overwrite in (False, True):
        with pytest.raises(files.FileCheckError, match=f"{victim}.*(already exists|not written by this tool)"):
            files.check_replaceable(victim, overwrite)
    with pytest.raises(files.FileCheckError, match="not written by this tool"):
        with files.atomic_folder(victim) as tmp:  # even a caller that forgot to check cannot replace it
            (tmp / "x").write_text("new")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("case", ["symlink", "file", "under-a-file", "unwritable"])
def test_outs_that_cannot_be_written_are_refused_by_name(tmp_path, case):
    target = user_folder(tmp_path / "real")
    if case == "symlink":
        out = tmp_path / "link"
        out.symlink_to(target)
        want = "is a symbolic link"
    elif case == "file":
        out = tmp_path / "notes.txt"
        out.write_text("mine")
        want = "is a file, not a folder"
    elif case == "under-a-file":
        (tmp_path / "notes.txt").write_text("mine")
        out = tmp_path / "notes.txt" / "a" / "out"
        want = "is under .*notes.txt, which is a file"
    else:  # root may write anywhere on a normal file system: /proc refuses everyone
        out = Path("/proc/1/mq-out")
        want = "no write permission in /proc/1"
    before = snapshot(tmp_path)
    with pytest.raises(files.FileCheckError, match=want):
        files.check_replaceable(out, overwrite=True)
    with pytest.raises(files.FileCheckError, match=want):
        with files.atomic_folder(out):
            pass
    assert snapshot(tmp_path) == before


def test_overwrite_replaces_a_folder_of_ours_whole(tmp_path):
    out = ours(tmp_path / "art", "a")
    (out / "notes.txt").write_text("added later")  # ours with an addition is still ours
    ours(out, "b")
    assert whole(out) == "b"
    assert siblings(tmp_path) == ["art"]  # neither the temporary nor the old folder is left


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_ctrl_c_while_writing_or_swapping_leaves_one_whole_folder(tmp_path, monkeypatch, exchange):
    out = ours(tmp_path / "art", "a")
    if not exchange:
        monkeypatch.setattr(files, "_exchange", lambda a, b: False)

    with pytest.raises(KeyboardInterrupt):  # while the new files are being written: the old one stays
        with files.atomic_folder(out) as tmp:
            (tmp / "f0.bin").write_text("b" * 1000)
            raise KeyboardInterrupt
    assert whole(out) == "a" and siblings(tmp_path) == ["art"]

    # a real SIGINT arriving in the middle of the swap is held until the swap is done, then raised
    real_swap = files._swap_into_place

    def swap_with_sigint(tmp, dest):
        os.kill(os.getpid(), signal.SIGINT)
        real_swap(tmp, dest)

    monkeypatch.setattr(files, "_swap_into_place", swap_with_sigint)
    with pytest.raises(KeyboardInterrupt):
        ours(out, "b")
    assert whole(out) == "b" and siblings(tmp_path) == ["art"]
    monkeypatch.setattr(files, "_swap_into_place", real_swap)

    # a real SIGINT the moment the temporary folder exists, before the writer holds its name: held, then
    # raised with the folder removed (CI once found a `.art.tmp-` left by a Ctrl-C in that window)
    real_mkdtemp = files.tempfile.mkdtemp

    def mkdtemp_then_sigint(*args, **kwargs):
        made = real_mkdtemp(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGINT)
        return made

    monkeypatch.setattr(files.tempfile, "mkdtemp", mkdtemp_then_sigint)
    with pytest.raises(KeyboardInterrupt):
        ours(out, "c")
    monkeypatch.setattr(files.tempfile, "mkdtemp", real_mkdtemp)
    assert whole(out) == "b" and siblings(tmp_path) == ["art"]

    if not exchange:  # the fallback's window between its two renames: the old folder comes back
        real_rename = Path.rename

        def rename(self, target):
            if ".tmp-" in self.name:
                raise KeyboardInterrupt
            return real_rename(self, target)

        monkeypatch.setattr(Path, "rename", rename)
        with pytest.raises(KeyboardInterrupt):
            ours(out, "c")
        monkeypatch.setattr(Path, "rename", real_rename)
        assert whole(out) == "b" and siblings(tmp_path) == ["art"]


WRITER = r"""
import importlib.util, signal, sys, time
# a process started in the background by a non-interactive shell inherits SIGINT ignored, and Python then
# keeps it ignored: Ctrl-C must raise KeyboardInterrupt here whatever started the test run
signal.signal(signal.SIGINT, signal.default_int_handler)
spec = importlib.util.spec_from_file_location("files", sys.argv[1])
files = importlib.util.module_from_spec(spec); spec.loader.exec_module(files)
out, tag = sys.argv[2], sys.argv[3]
print("start", flush=True)
with files.atomic_folder(out) as tmp:
    for i in range(9):
        (tmp / f"f{i}.bin").write_text(tag * (1000 + i))
        time.sleep(0.03)
    files.write_manifest(tmp, "manifest.json")
print("done", flush=True)
time.sleep(30)  # a SIGINT now comes after the swap
"""


def test_real_ctrl_c_at_any_moment_of_a_rewrite(tmp_path):
    """A writer process (the file module alone: no torch to import) rewriting a folder of ours, interrupted
    by SIGINT at 11 moments from the first file on, and once after it said the swap was done: the folder is
    always whole, old or new, and no temporary or old folder is left beside it."""
    out = ours(tmp_path / "art", "a")
    tags = "bcdefghijklm"
    delays = [0.0, 0.02, 0.05, 0.08, 0.11, 0.14, 0.17, 0.2, 0.23, 0.26, 0.3, None]  # None: after "done"
    interrupted_before = 0
    for k, delay in enumerate(delays):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(ROOT / "quant" / "files.py"), str(out), tags[k]],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "start"
        if delay is None:
            assert proc.stdout.readline().strip() == "done"
        else:
            time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode != 0 and "KeyboardInterrupt" in err, (proc.returncode, err)
        now = whole(out)
        assert now in "a" + tags[:k + 1], now  # some complete write, never a mixture
        assert siblings(tmp_path) == ["art"], siblings(tmp_path)
        if delay is None:
            assert now == tags[k]
        interrupted_before += now != tags[k]
    assert interrupted_before >= 1  # the early signals did land before the swap
