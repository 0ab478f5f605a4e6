"""The trial runs of one sweep, read back from MLflow (the layout farm.orchestrate.tracking writes: one experiment per
sweep, one run per trial execution tagged ``farm_role=trial`` and ``trial_id``)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from farm.core.vocab import ROLE, ROLE_TRIAL

from .device_metrics import DeviceResult, device_results

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a report reads one recipe per corpus


@dataclass
class TrialRun:
    trial_id: str
    status: str                      # FINISHED | FAILED | KILLED | RUNNING
    params: dict = field(default_factory=dict)   # flattened trial config, values parsed back from strings
    metrics: dict = field(default_factory=dict)
    tags: dict = field(default_factory=dict)
    run_id: str = ""
    start_ms: int = 0
    executions: int = 1              # MLflow runs recorded for this trial (failed attempts, resumed sweeps)
    experiment_id: str = ""

    @property
    def devices(self) -> dict[str, DeviceResult]:
        """Its measurements per device (``reports.device_metrics``), by device name."""
        return device_results(self.metrics, self.tags)

    @property
    def short(self) -> str:
        return self.trial_id[:8]


def parse_param(v: str):
    """MLflow stores params as strings; farm wrote them with str() or json.dumps()."""
    if v in ("None", "True", "False"):
        return {"None": None, "True": True, "False": False}[v]
    try:
        return int(v)
    except ValueError:
        pass
    try:
        return float(v)
    except ValueError:
        pass
    if v[:1] in "[{":
        try:
            return json.loads(v)
        except ValueError:
            pass
    return v


def search_all(client, experiment_id: str, filter_string: str, order_by: str) -> list:
    """Every run of an experiment matching ``filter_string``, page by page (MLflow returns 1000 at most)."""
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string, max_results=1000, page_token=token,
                                  order_by=[order_by])
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def load_trials(sweep: str, tracking_uri: str) -> list[TrialRun]:
    """One entry per trial of ``sweep``: its newest FINISHED run, else its newest run of any status."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(sweep)
    if exp is None:
        raise ValueError(f"no sweep named {sweep!r} in the MLflow store {tracking_uri}")
    runs = search_all(client, exp.experiment_id, f"tags.{ROLE} = '{ROLE_TRIAL}'", "attributes.start_time DESC")
    by_trial: dict[str, TrialRun] = {}
    for r in runs:  # newest first
        tid = r.data.tags.get("trial_id", r.info.run_id)
        seen = by_trial.get(tid)
        if seen is not None:
            seen.executions += 1
            if seen.status == "FINISHED" or r.info.status != "FINISHED":
                continue
        by_trial[tid] = TrialRun(
            tid, r.info.status, {k: parse_param(v) for k, v in r.data.params.items()}, dict(r.data.metrics),
            dict(r.data.tags), r.info.run_id, r.info.start_time or 0, seen.executions if seen else 1,
            r.info.experiment_id)
    return sorted(by_trial.values(), key=lambda t: t.start_ms)
