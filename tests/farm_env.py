"""Helpers for farm tests that run real Ray and MLflow: a contained folder for Ray's files, sweep files
written from text, and reading runs back."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HELPER = "tests.farm_helpers:fake_method"


@contextmanager
def contained_env():
    """HOME, TMPDIR and RAY_TMPDIR in a short private folder (Ray's socket paths must stay short).

    On the way out the whole environment is put back as it was, not only the variables set here: what
    runs inside (ray.init, a sweep, a nightly) may set others, and a later test must not inherit them."""
    root = Path(tempfile.mkdtemp(prefix="mqf-", dir="/tmp"))
    old = dict(os.environ)
    os.environ.update(HOME=str(root), TMPDIR=str(root), RAY_TMPDIR=str(root), RAY_AUTH_MODE="disabled",
                      RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0")
    tempfile.tempdir = None
    try:
        yield root
    finally:
        restore_environ(old)
        tempfile.tempdir = None
        shutil.rmtree(root, ignore_errors=True)


def restore_environ(old: dict) -> None:
    """os.environ exactly as ``old``: variables added since removed, changed ones put back."""
    for k in set(os.environ) - set(old):
        del os.environ[k]
    for k, v in old.items():
        if os.environ.get(k) != v:
            os.environ[k] = v


def write_sweep(folder: Path, name: str, text: str) -> Path:
    p = Path(folder) / f"{name}.yaml"
    p.write_text(textwrap.dedent(text).replace("NAME", name).replace("HELPER", HELPER))
    return p


def lines(path: Path) -> list[str]:
    return Path(path).read_text().split() if Path(path).exists() else []


def count_lines(path: Path) -> list[str]:
    """Labels of the executions recorded by the fake method (one "label pid" line each)."""
    return [ln.split()[0] for ln in Path(path).read_text().splitlines()] if Path(path).exists() else []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 60.0, proc: subprocess.Popen | None = None) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer in {timeout}s")


def farm_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "farm.cli", *args]
