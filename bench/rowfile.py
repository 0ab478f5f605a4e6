"""Resumable result rows for the bench scripts: one JSON object per line, appended as each row finishes,
so an interrupted table loses at most the row in progress and a rerun skips what is done."""

from __future__ import annotations

import json
import os
import sys
from typing import Callable


def read(path: str | None, keep: Callable[[dict], bool]) -> list[dict]:
    """The rows of ``path`` that ``keep`` accepts (none when there is no file yet). Rows another numerics
    version made (``quant.NUMERICS_VERSION``; none recorded: made before versions existed) are not resumed:
    they come from other arithmetic, and the row is computed again."""
    from quant import numerics

    if not path or not os.path.exists(path):
        return []
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    current = [r for r in rows if r.get("numerics_version") == numerics.NUMERICS_VERSION]
    if len(current) < len(rows):
        print(f"{path}: {len(rows) - len(current)} row(s) made by another numerics version are not reused "
              f"(this code is version {numerics.NUMERICS_VERSION})", file=sys.stderr)
    return [r for r in current if keep(r)]


def append(path: str | None, row: dict) -> None:
    """Append ``row`` with the numerics version that made it."""
    from quant import numerics

    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps({**row, "numerics_version": numerics.NUMERICS_VERSION}) + "\n")
