"""A trial's result file, the record of "done": a trial whose result exists is never run again; if its MLflow
run is missing (another tracking server, a crash between the two writes) it is logged from the file. The
file is written before anything is logged, so an interrupt or a failing callback can lose a log line,
never a result."""

from __future__ import annotations

import json
from pathlib import Path

from ..core.layout import DataLayout


def result_path(data_dir: Path, trial_id: str) -> Path:
    return DataLayout(data_dir).result(trial_id)


def load_result(data_dir: Path, trial_id: str) -> dict | None:
    p = result_path(data_dir, trial_id)
    try:
        return json.loads(p.read_text())
    except (FileNotFoundError, ValueError):
        return None


def save_result(data_dir: Path, result: dict) -> None:
    p = result_path(data_dir, result["trial_id"])
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2, sort_keys=True))
    tmp.replace(p)


def primary_metric(result: dict) -> tuple[str | None, float | None]:
    for k, v in (result.get("metrics") or {}).items():
        if k.startswith("ppl/"):
            return k, v
    return None, None
