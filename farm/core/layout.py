"""The farm data folder (``--data``, default ``runs/farm`` or ``$MQFARM_FARM_DIR``): what lives where.
Every module that reads or writes the folder asks this object for the path, so the layout is written
down once::

    mlflow.db                         the default tracking store (sqlite)
    mlartifacts/<experiment>/         its artifacts
    stages/<stage>/<key>/             the stage cache (farm.core.cache): quantize, calib_tokens, ...,
                                      export, compile, bench
    trials/<trial id>/result.json     a finished trial's result (a later run of the sweep skips it)
    attempts/<trial id>.log           one line per attempt of a trial, written on the worker
    sweeps/<sweep>.lock               held while a sweep runs (farm gc waits for none)
    nightly/<suite>/baselines/<run>/  an accepted night's exports, pinned outside the stage cache
    reports/<name>/                   reports
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class DataLayout:
    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    @property
    def mlflow_db(self) -> Path:
        return self.root / "mlflow.db"

    @property
    def artifacts(self) -> Path:
        return self.root / "mlartifacts"

    @property
    def stages(self) -> Path:
        return self.root / "stages"

    def stage_entry(self, stage: str, key: str) -> Path:
        return self.stages / stage / key

    def stage_cache(self):
        from .cache import StageCache

        return StageCache(self.stages)

    def result(self, trial_id: str) -> Path:
        return self.root / "trials" / trial_id / "result.json"

    def attempts_log(self, trial_id: str) -> Path:
        return self.root / "attempts" / f"{trial_id}.log"

    @property
    def sweep_locks(self) -> Path:
        return self.root / "sweeps"

    def sweep_lock(self, sweep: str) -> Path:
        return self.sweep_locks / f"{sweep}.lock"

    def baselines(self, suite: str, run_id: str) -> Path:
        return self.root / "nightly" / suite / "baselines" / run_id

    def reports(self, name: str) -> Path:
        return self.root / "reports" / name
