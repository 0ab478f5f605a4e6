"""`farm gc`: free the disk that finished sweeps hold. Quantized artifacts (a full model each) are by far
the largest entries of the stage cache; results, MLflow runs and the small shared stages stay.

Safe by construction: it refuses while any sweep of the data folder is running (it takes every sweep's
lock, so none starts meanwhile), keeps the artifacts that MLflow's registry points at as ``best`` unless
told otherwise, and removes a stage entry whole, so a later trial needing it recomputes it instead of
finding half an entry. A stage is a name from the known list, and nothing outside the data folder is ever
removed: a symbolic link (a stage folder or an entry) is refused before anything goes.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from ..core.layout import DataLayout


class SweepRunning(ValueError):  # exit status 2 with the message, like SweepBusy
    pass


class GcError(ValueError):
    """A stage name, data folder or cache entry farm gc will not touch; nothing is removed."""


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
    for lock in sorted(DataLayout(data_dir).sweep_locks.glob("*.lock")):
        fh = stack.enter_context(open(lock, "a"))
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SweepRunning(f"sweep {lock.stem!r} is running on {data_dir}; run farm gc when it has ended "
                               "(its trials may be reading the artifacts)") from None
        stack.callback(fcntl.flock, fh, fcntl.LOCK_UN)


def known_stages() -> tuple[str, ...]:
    """The stage folders farm writes under DATA/stages: the trials' artifacts, the shared stages, the device
    stages."""
    from ..work.stages import STAGES

    return ("quantize", *STAGES, "export", "compile", "bench")


def _plan(data_dir: Path, stages: tuple, keep: set, report: GcReport) -> None:
    """What would be removed, every path checked first: inside the data folder, no link followed."""
    base = data_dir.resolve()
    stages_dir = DataLayout(data_dir).stages
    if stages_dir.is_symlink():
        raise GcError(f"{stages_dir} is a symbolic link: farm gc removes only folders inside {data_dir}, never "
                      "through a link")
    for stage in stages:
        root = stages_dir / stage
        if root.is_symlink():
            raise GcError(f"{root} is a symbolic link: farm gc removes only folders inside {data_dir}, never "
                          "through a link")
        if not root.is_dir():
            continue
        for entry in sorted(root.iterdir()):
            if entry.is_symlink():
                raise GcError(f"cache entry {entry} is a symbolic link (to {os.readlink(entry)}): farm gc removes "
                              "nothing through a link; nothing was removed (remove the link yourself)")
            if not entry.is_dir():
                continue  # lock files
            if base not in entry.resolve().parents:
                raise GcError(f"cache entry {entry} is outside the data folder {base}; nothing was removed")
            # ".<key>.tmp-*" folders are computations that never committed: always garbage
            if not entry.name.startswith(".") and any(p == entry.resolve() or entry.resolve() in p.parents
                                                      for p in keep):
                report.kept.append(entry)
                continue
            report.freed_bytes += tree_size(entry)
            report.removed.append(entry)


def collect(data_dir: str | Path, tracking_uri: str | None = None, stages: tuple = ("quantize",),
            keep_best: bool = True, dry_run: bool = False) -> GcReport:
    """Remove the stage cache's entries of ``stages`` (names from :func:`known_stages`) under ``data_dir``.
    Every entry is checked before anything is removed; a symbolic link anywhere on the way is refused."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise GcError(f"farm data folder {data_dir} {'is not a folder' if data_dir.exists() else 'does not exist'}")
    known = known_stages()
    for stage in stages:
        if stage not in known:
            raise GcError(f"--stage {stage!r} is not a stage of the cache; known stages: {', '.join(known)}")
    report = GcReport(dry_run=dry_run)
    with ExitStack() as stack:
        _lock_all_sweeps(data_dir, stack)
        keep = registered_sources(tracking_uri) if keep_best and tracking_uri else set()
        _plan(data_dir, tuple(dict.fromkeys(stages)), keep, report)
        if not dry_run:
            for entry in report.removed:
                shutil.rmtree(entry)  # a real folder inside the data folder: rmtree unlinks links, never follows
    return report
