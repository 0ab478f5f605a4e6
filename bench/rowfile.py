"""Resumable result rows for the bench scripts: one JSON object per line, appended as each row finishes,
so an interrupted table loses at most the row in progress and a rerun skips what is done."""

from __future__ import annotations

import json
import os
from typing import Callable


def read(path: str | None, keep: Callable[[dict], bool]) -> list[dict]:
    """The rows of ``path`` that ``keep`` accepts (none when there is no file yet)."""
    if not path or not os.path.exists(path):
        return []
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r for r in rows if keep(r)]


def append(path: str | None, row: dict) -> None:
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
