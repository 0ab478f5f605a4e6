"""A content-addressed cache of stage results on disk, safe for concurrent trials.

Every entry is a folder ``<root>/<stage>/<key>/`` where ``key`` is the hash of the stage's inputs; it
exists only once complete (written into a temporary sibling and renamed), and ``meta.json`` inside says
what made it. A per-entry ``flock`` makes concurrent computations of the same key wait for the first one
instead of repeating it, which is what lets shared stages run once per grid even when two workers reach
them at the same time. On a multi-node cluster the data folder must be a shared file system for entries
to be shared between nodes; otherwise each node fills its own cache (still correct, just repeated).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from quant.files import apply_umask, read_json


class Entry:
    def __init__(self, cache: "StageCache", stage: str, key: str):
        self.stage, self.key = stage, key
        self.path = cache.root / stage / key
        self.tmp: Path | None = None
        self.committed = False

    @property
    def hit(self) -> bool:
        return (self.path / "meta.json").exists()

    def meta(self) -> dict:
        return read_json(self.path / "meta.json", "stage cache entry")

    def workdir(self) -> Path:
        """A fresh folder to write the result into; :meth:`commit` moves it into place."""
        if self.tmp is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.tmp = Path(tempfile.mkdtemp(dir=self.path.parent, prefix=f".{self.key}.tmp-"))
        return self.tmp

    def commit(self, inputs: dict, **info) -> dict:
        work = self.workdir()
        meta = {"stage": self.stage, "key": self.key, "inputs": inputs, "created_at": time.time(),
                "host": socket.gethostname(), "pid": os.getpid(), **info}
        (work / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))
        apply_umask(work)  # mkdtemp's 0700 would keep the other users of a shared machine out
        if self.path.exists():  # an incomplete leftover (no meta.json): replace it
            shutil.rmtree(self.path)
        work.rename(self.path)
        self.tmp, self.committed = None, True
        return meta


class StageCache:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def peek(self, stage: str, key: str) -> Path | None:
        path = self.root / stage / key
        return path if (path / "meta.json").exists() else None

    @contextmanager
    def entry(self, stage: str, key: str):
        """Hold the entry's lock; inside, ``e.hit`` says whether it is done, else compute and ``e.commit``."""
        lock_dir = self.root / stage
        lock_dir.mkdir(parents=True, exist_ok=True)
        e = Entry(self, stage, key)
        with open(lock_dir / f"{key}.lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield e
            finally:
                if e.tmp is not None:
                    shutil.rmtree(e.tmp, ignore_errors=True)
                fcntl.flock(fh, fcntl.LOCK_UN)

    def computed(self, stage: str) -> list[dict]:
        """The meta of every finished entry of a stage."""
        d = self.root / stage
        return [json.loads(p.read_text()) for p in sorted(d.glob("*/meta.json"))] if d.exists() else []
