"""`farm gc`: free the disk that finished sweeps hold. Quantized artifacts (a full model each) are by far
the largest entries of the stage cache; results, MLflow runs and the small shared stages stay.

Safe by construction: it refuses while any sweep of the data folder is running (it takes every sweep's
lock, so none starts meanwhile), keeps the artifacts that MLflow's registry points at as ``best`` unless
told otherwise, and removes a stage entry whole, so a later trial needing it recomputes it instead of
finding half an entry.
"""

from __future__ import annotations

import fcntl
import shutil
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path


class SweepRunning(ValueError):  # exit status 2 with the message, like SweepBusy
    pass


@dataclass
class GcReport:
    removed: list[Path] = field(default_factory=list)
    kept: list[Path] = field(default_factory=list)     # registered as best
    freed_bytes: int = 0
    dry_run: bool = False


def tree_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def registered_sources(tracking_uri: str, alias: str = "best") -> set[Path]:
    """Local folders that a registered model version with ``alias`` points at."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    out = set()
    for rm in client.search_registered_models():
        version = (rm.aliases or {}).get(alias)
        if version is None:
            continue
        src = client.get_model_version(rm.name, version).source
        if src and "://" not in src:
            out.add(Path(src).resolve())
    return out


def _lock_all_sweeps(data_dir: Path, stack: ExitStack) -> None:
    for lock in sorted((data_dir / "sweeps").glob("*.lock")):
        fh = stack.enter_context(open(lock, "a"))
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SweepRunning(f"sweep {lock.stem!r} is running on {data_dir}; run farm gc when it has ended "
                               "(its trials may be reading the artifacts)") from None
        stack.callback(fcntl.flock, fh, fcntl.LOCK_UN)


def collect(data_dir: str | Path, tracking_uri: str | None = None, stages: tuple = ("quantize",),
            keep_best: bool = True, dry_run: bool = False) -> GcReport:
    data_dir = Path(data_dir)
    report = GcReport(dry_run=dry_run)
    with ExitStack() as stack:
        _lock_all_sweeps(data_dir, stack)
        keep = registered_sources(tracking_uri) if keep_best and tracking_uri else set()
        for stage in stages:
            root = data_dir / "stages" / stage
            if not root.is_dir():
                continue
            for entry in sorted(p for p in root.iterdir() if p.is_dir()):
                # ".<key>.tmp-*" folders are computations that never committed: always garbage
                if not entry.name.startswith(".") and any(p == entry.resolve() or entry.resolve() in p.parents
                                                          for p in keep):
                    report.kept.append(entry)
                    continue
                report.freed_bytes += tree_size(entry)
                report.removed.append(entry)
                if not dry_run:
                    shutil.rmtree(entry)
    return report
