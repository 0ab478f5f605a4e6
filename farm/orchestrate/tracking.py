"""MLflow: the one place that writes runs. One experiment per sweep, a parent run for the sweep, one
nested run per trial (params = the trial's flattened config, per-step training loss, evaluation metrics,
timing, the artifact folder, tags), and the best model of each scheme registered with an alias.

Only the driver calls this module (workers send their results back), so a sqlite store has a single
writer and workers on other nodes need no access to the store.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from mlflow import MlflowClient  # noqa: E402
from mlflow.entities import Metric, Param, RunTag  # noqa: E402

from ..core.ids import FLOAT_METHOD, flatten  # noqa: E402
from ..core.layout import DataLayout  # noqa: E402
from ..core.vocab import BASELINE, ROLE, ROLE_NIGHT, ROLE_NIGHTLY, ROLE_PARENT, ROLE_SWEEP, ROLE_TRIAL, TRIAL_ID  # noqa: E402
from ..plan.spec import Sweep, Trial  # noqa: E402

logging.getLogger("mlflow").setLevel(logging.WARNING)
logging.getLogger("alembic").setLevel(logging.WARNING)

SWEEP = "sweep"
PARENT = "mlflow.parentRunId"
BEST_ALIAS = "best"


def default_uri(data_dir: str | Path) -> str:
    return f"sqlite:///{DataLayout(Path(data_dir).resolve()).mlflow_db}"


def is_local_store(uri: str) -> bool:
    return uri.startswith("sqlite:") or uri.startswith("file:") or "://" not in uri


def git_commit() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (sha + ("-dirty" if dirty else "")) if sha else "unknown"


def package_versions() -> dict:
    import mlflow
    import ray

    from quant.api import versions

    return {**versions(), "ray": ray.__version__, "mlflow": mlflow.__version__}


def _chunks(items: list, n: int):
    for i in range(0, len(items), n):
        yield items[i:i + n]


def _params(config: dict, resources: dict) -> dict:
    flat = flatten({k: v for k, v in config.items()})
    flat.update({f"resources.{k}": v for k, v in flatten(resources).items()})
    return {k: json.dumps(v) if isinstance(v, (list, dict)) else str(v) for k, v in flat.items()}


def _metric_ok(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf")


class Tracker:
    def __init__(self, tracking_uri: str, sweep_name: str, artifact_root: str | Path | None = None):
        self.uri = tracking_uri
        self.client = MlflowClient(tracking_uri)
        self.sweep_name = sweep_name
        self.artifact_root = Path(artifact_root) if artifact_root else None
        self.experiment_id: str | None = None
        self.parent_id: str | None = None
        self.common_tags: dict = {}

    # ------------------------------------------------------------ experiment and parent run
    def experiment(self, create: bool = True) -> str | None:
        exp = self.client.get_experiment_by_name(self.sweep_name)
        if exp is None:
            if not create:
                return None
            location = None
            if self.artifact_root is not None and is_local_store(self.uri):
                location = (self.artifact_root / self.sweep_name).resolve().as_uri()
            self.experiment_id = self.client.create_experiment(self.sweep_name, artifact_location=location,
                                                               tags={ROLE: ROLE_SWEEP})
        else:
            if exp.lifecycle_stage == "deleted":
                self.client.restore_experiment(exp.experiment_id)
            self.experiment_id = exp.experiment_id
        return self.experiment_id

    def start_parent(self, sweep: Sweep) -> str:
        self.experiment()
        self.common_tags = {SWEEP: sweep.name, "git_commit": git_commit(),
                            **{f"version.{k}": str(v) for k, v in package_versions().items()}}
        found = self.client.search_runs([self.experiment_id], f"tags.{ROLE} = '{ROLE_PARENT}'",
                                        order_by=["attributes.start_time DESC"], max_results=1)
        if found:
            self.parent_id = found[0].info.run_id
            self.client.update_run(self.parent_id, status="RUNNING")
        else:
            run = self.client.create_run(self.experiment_id, run_name=sweep.name,
                                         tags={ROLE: ROLE_PARENT, **self.common_tags})
            self.parent_id = run.info.run_id
        tags = {"sweep_file": str(sweep.file), "sweep_hash": sweep.hash, "trials": str(len(sweep.trials)),
                "mlflow.note.content": sweep.spec.description or f"farm sweep {sweep.file}", **self.common_tags}
        self.client.log_batch(self.parent_id, tags=[RunTag(k, v) for k, v in tags.items()])
        if sweep.text:
            self.client.log_text(self.parent_id, sweep.text, "sweep.yaml")
        return self.parent_id

    def end_parent(self, status: str, counts: dict, wall_s: float) -> None:
        now = int(time.time() * 1000)
        metrics = [Metric(f"trials_{k}", float(v), now, 0) for k, v in counts.items()]
        metrics.append(Metric("wall_s", float(wall_s), now, 0))
        self.client.log_batch(self.parent_id, metrics=metrics)
        self.client.set_terminated(self.parent_id, status=status)

    # ------------------------------------------------------------ trial runs
    def trial_runs(self, status: str | None = None) -> list:
        """Every trial run of this sweep's experiment (optionally with one status), newest first."""
        if self.experiment_id is None and self.experiment(create=False) is None:
            return []
        flt = f"tags.{ROLE} = '{ROLE_TRIAL}'"
        if status:
            flt += f" and attributes.status = '{status}'"
        out, token = [], None
        while True:
            page = self.client.search_runs([self.experiment_id], flt, max_results=1000, page_token=token,
                                           order_by=["attributes.start_time DESC"])
            out.extend(page)
            token = page.token
            if not token:
                return out

    def finished_trials(self) -> dict:
        return {r.data.tags.get(TRIAL_ID): r.info.run_id for r in self.trial_runs("FINISHED")}

    def kill_stale(self, note: str = "left running by an earlier driver; marked KILLED") -> int:
        """Mark every RUNNING trial run of the sweep KILLED: safe because the caller holds the sweep lock,
        so no other driver owns them (at start: a driver that died; at Ctrl-C: this one)."""
        runs = self.trial_runs("RUNNING")
        self.kill([r.info.run_id for r in runs], note)
        return len(runs)

    def start_trial(self, trial: Trial, resources: dict, start_time: float | None = None,
                    tags: dict | None = None) -> str:
        cfg = trial.config
        name = f"{cfg['scheme']}-{cfg['method']}-{trial.short}"
        all_tags = {ROLE: ROLE_TRIAL, TRIAL_ID: trial.id, PARENT: self.parent_id, **self.common_tags,
                    "scheme": cfg["scheme"], "method": cfg["method"], "model": cfg["model"],
                    "numerics_version": str(cfg.get("numerics", "")),
                    **{k: str(v) for k, v in (tags or {}).items()}}
        if trial.origin and trial.origin[0] == "baselines":  # added by `baselines:`, not by the grid
            all_tags[BASELINE] = trial.origin[1]
        run = self.client.create_run(self.experiment_id, run_name=name, tags=all_tags,
                                     start_time=int((start_time or time.time()) * 1000))
        rid = run.info.run_id
        params = [Param(k, v) for k, v in _params(cfg, resources).items()]
        for chunk in _chunks(params, 100):
            self.client.log_batch(rid, params=chunk)
        return rid

    def log_steps(self, run_id: str, steps: list[dict]) -> None:
        metrics = []
        for s in steps:
            ts = int(s.get("time", time.time()) * 1000)
            for k, v in s.items():
                if k in ("step", "time", "attempt") or not _metric_ok(v):
                    continue
                metrics.append(Metric(f"train/{k}", float(v), ts, int(s["step"])))
        for chunk in _chunks(metrics, 1000):
            self.client.log_batch(run_id, metrics=chunk)

    def finish_trial(self, run_id: str, result: dict, extra_tags: dict | None = None) -> None:
        now = int(result.get("ended_at", time.time()) * 1000)
        metrics = [Metric(k, float(v), now, 0) for k, v in result["metrics"].items() if _metric_ok(v)]
        tags = {"node": result.get("node", {}).get("node_ip") or result.get("node", {}).get("host", ""),
                "node_id": result.get("node", {}).get("node_id", ""),
                "artifact_dir": result.get("artifact_dir") or "", **{k: str(v) for k, v in (extra_tags or {}).items()}}
        content_hash = (result.get("recipe") or {}).get("content_hash")
        if content_hash:
            tags["recipe_hash"] = content_hash
        for chunk in _chunks(metrics, 1000):
            self.client.log_batch(run_id, metrics=chunk, tags=[RunTag(k, v) for k, v in tags.items()])
        self._log_files(run_id, result)
        self.client.set_terminated(run_id, status="FINISHED", end_time=now)

    def _log_files(self, run_id: str, result: dict) -> None:
        tmp = Path(tempfile.mkdtemp(prefix="farm-run-"))
        try:
            (tmp / "result.json").write_text(json.dumps({k: v for k, v in result.items() if k != "steps"},
                                                        indent=2, sort_keys=True))
            if result.get("recipe"):
                (tmp / "recipe.json").write_text(json.dumps(result["recipe"], indent=2, sort_keys=True))
            art = result.get("artifact_dir")
            if art and (Path(art) / "encodings.json").exists():
                shutil.copy(Path(art) / "encodings.json", tmp / "encodings.json")
            self.client.log_artifacts(run_id, str(tmp), "trial")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def log_devices(self, run_id: str, devices: dict) -> None:
        """Device-stage results (label -> summary, farm.orchestrate.device_tasks) into a trial's run as metrics and
        tags; the run may already be FINISHED, since device stages end after the trial."""
        from .device_metrics import metrics_and_tags

        now = int(time.time() * 1000)
        for summary in devices.values():
            metrics, tags = metrics_and_tags(summary)
            self.client.log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in metrics.items() if _metric_ok(v)],
                                  tags=[RunTag(k, v) for k, v in tags.items()])

    def fail_trial(self, run_id: str, error: str, tb: str = "", kind: str = "exception") -> None:
        self.client.log_batch(run_id, tags=[RunTag("error", error[:4900]), RunTag("error_kind", kind)])
        if tb:
            self.client.log_text(run_id, tb, "trial/error.txt")
        self.client.set_terminated(run_id, status="FAILED")

    def kill(self, run_ids: list[str], note: str = "interrupted (Ctrl-C)") -> None:
        for rid in run_ids:
            try:
                self.client.set_tag(rid, "farm_note", note)
                self.client.set_terminated(rid, status="KILLED")
            except Exception:  # keep marking the others: nothing may stay RUNNING
                pass

    # ------------------------------------------------------------ model registry
    def register_best(self, trials: dict, results: dict, metric_of) -> list[dict]:
        """For each (model, scheme), point alias ``best`` at the trial with the lowest primary metric. A
        baseline the sweep added (``baselines:``, the W8A16 reference of a device stage) is a reference, as in
        the reports: it is never registered, so no registry entry stands for a model nobody asked for."""
        finished = self.finished_trials()
        groups: dict = {}
        for tid, trial in trials.items():  # sweep order, so ties go to the first trial of the file
            res, cfg = results.get(tid), trial.config
            if res is None or cfg["method"] == FLOAT_METHOD or tid not in finished:
                continue
            if trial.origin and trial.origin[0] == "baselines":
                continue
            name, value = metric_of(res)
            if value is None:
                continue
            key = (cfg["model"], cfg["scheme"])
            if key not in groups or value < groups[key][1]:
                groups[key] = (tid, value, name)
        out = []
        for (model, scheme), (tid, value, metric) in sorted(groups.items()):
            reg = re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{self.sweep_name}.{Path(model).name}.{scheme}")
            run_id = finished[tid]
            try:
                current = self.client.get_model_version_by_alias(reg, BEST_ALIAS)
                if current.run_id == run_id:
                    out.append({"name": reg, "version": current.version, "trial": tid, metric: value})
                    continue
            except Exception:  # no such model or alias yet
                try:
                    self.client.create_registered_model(reg, tags={SWEEP: self.sweep_name, "scheme": scheme})
                except Exception:  # it exists without the alias
                    pass
            art = results[tid].get("artifact_dir")
            source = art if art and Path(art).exists() and is_local_store(self.uri) else (
                f"runs:/{run_id}/trial")
            mv = self.client.create_model_version(reg, source=source, run_id=run_id,
                                                  tags={TRIAL_ID: tid, metric: str(value)})
            self.client.set_registered_model_alias(reg, BEST_ALIAS, mv.version)
            out.append({"name": reg, "version": mv.version, "trial": tid, metric: value})
        return out


class NightRuns:
    """The nightly's side of the store: the experiment ``<suite>.nightly`` with one run per night, and the
    registered model whose alias points at the accepted night (farm.orchestrate.nightly decides; this
    writes)."""

    def __init__(self, uri: str, artifact_root: Path | None = None):
        self.uri = uri
        self.client = MlflowClient(uri)
        self.artifact_root = artifact_root

    def open(self, experiment: str, run_name: str, tags: dict) -> str:
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None:
            location = None
            if self.artifact_root is not None and is_local_store(self.uri):
                location = (self.artifact_root / experiment).resolve().as_uri()
            exp_id = self.client.create_experiment(experiment, artifact_location=location,
                                                   tags={ROLE: ROLE_NIGHTLY})
        else:
            exp_id = exp.experiment_id
        return self.client.create_run(exp_id, run_name=run_name,
                                      tags={ROLE: ROLE_NIGHT, "git_commit": git_commit(), **tags}).info.run_id

    def version_of(self, model: str, alias: str):
        """The model version the alias points at, or None when there is no such alias (or model) yet."""
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_model_version_by_alias(model, alias)
        except MlflowException:
            return None

    def read_text(self, run_id: str, artifact: str) -> str:
        """A run's text artifact; LookupError naming the run when the store does not have it."""
        from mlflow.exceptions import MlflowException

        tmp = Path(tempfile.mkdtemp(prefix="farm-nightly-"))
        try:
            return Path(self.client.download_artifacts(run_id, artifact, str(tmp))).read_text()
        except (MlflowException, OSError) as e:
            raise LookupError(f"run {run_id} has no readable {artifact}: {e}") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def set_tags(self, run_id: str, tags: dict) -> None:
        self.client.log_batch(run_id, tags=[RunTag(k, str(v)[:4900]) for k, v in tags.items()])

    def register(self, model: str, run_id: str, artifact: str, alias: str, model_tags: dict, version_tags: dict,
                 description: str) -> str:
        """A new version of ``model`` for the run's artifact, with the alias moved to it; returns the version."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_registered_model(model)
        except MlflowException:
            self.client.create_registered_model(model, tags={k: str(v) for k, v in model_tags.items()},
                                                description=description)
        mv = self.client.create_model_version(model, source=f"runs:/{run_id}/{artifact}", run_id=run_id,
                                              tags={k: str(v) for k, v in version_tags.items()})
        self.client.set_registered_model_alias(model, alias, mv.version)
        return str(mv.version)

    def close(self, run_id: str, metrics: dict, tags: dict, artifact: str, text: str, failed: bool) -> None:
        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, 0) for k, v in metrics.items()]
        for chunk in _chunks(items, 900):
            self.client.log_batch(run_id, metrics=chunk)
        self.set_tags(run_id, tags)
        self.client.log_text(run_id, text, artifact)
        self.client.set_terminated(run_id, status="FAILED" if failed else "FINISHED")

    def kill(self, run_id: str, why: str) -> None:
        """An interrupted night: KILLED, not left RUNNING."""
        self.set_tags(run_id, {"nightly.error": why})
        self.client.set_terminated(run_id, status="KILLED")
