"""`farm sweep` on a real local Ray instance with a real sqlite MLflow store (and one real `mlflow
server` on 127.0.0.1): runs per trial, params and metrics, failures, a killed worker, an interrupted and
resumed sweep, shared stages. Trials use one real decoder layer, 2 calibration windows of 32 tokens."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from farm.core.cache import StageCache
from farm.core.ids import flatten
from farm.plan.spec import load_sweep
from farm.orchestrate.sweep import Options, run_sweep
from tests.farm_env import REPO, contained_env, count_lines, farm_cmd, free_port, wait_http, write_sweep

HEAD = """\
name: NAME
base: {model: smollm2-135m, layers: 1, samples: 2, seqlen: 32, method: rtn}
eval: {perplexity: {limit: 2}}
plugins: {methods: {fake: "HELPER"}}
resources: {cpu: 1}
"""


@pytest.fixture(scope="module")
def env():
    import ray

    from farm.orchestrate import scheduler

    with contained_env() as root:
        owned = scheduler.connect(num_cpus=2)  # the default local path, one instance for the module
        assert owned
        data = root / "data"
        try:
            yield root, data
        finally:
            ray.shutdown()


def client(data: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{data / 'mlflow.db'}")


def runs_of(data: Path, name: str, role: str = "trial") -> list:
    c = client(data)
    exp = c.get_experiment_by_name(name)
    return c.search_runs([exp.experiment_id], f"tags.farm_role = '{role}'", max_results=1000)


def test_grid_gives_one_finished_run_per_trial_with_params_and_metrics(env):
    root, data = env
    counter = root / "grid.count"
    p = write_sweep(root, "grid", HEAD + f"""\
grid:
  scheme: [fp, w8a8, w4a8]
include:
  - {{scheme: w8a8, method: fake, method_config.label: t, method_config.steps: 4,
     method_config.count_file: "{counter}"}}
""")
    sweep = load_sweep(p)
    assert len(sweep.trials) == 4
    out = run_sweep(sweep, Options(data_dir=data, live=False))
    assert out.ok and sorted(out.executed) == sorted(t.id for t in sweep.trials)

    runs = runs_of(data, "grid")
    assert sorted(r.data.tags["trial_id"] for r in runs) == sorted(t.id for t in sweep.trials)  # one run each
    c = client(data)
    for r in runs:
        assert r.info.status == "FINISHED"
        tid = r.data.tags["trial_id"]
        trial = next(t for t in sweep.trials if t.id == tid)
        result = json.loads((data / "trials" / tid / "result.json").read_text())
        expected = {k: json.dumps(v) if isinstance(v, (list, dict)) else str(v)
                    for k, v in flatten(trial.config).items()}
        assert {k: v for k, v in r.data.params.items() if not k.startswith("resources.")} == expected
        assert r.data.params["resources.cpu"] == "1.0"
        step_keys = {f"train/{k}" for s in result["steps"] for k in s if k not in ("step", "time")}
        # exactly the values the trial returned (MLflow also shows the last value of each step metric)
        assert {k: v for k, v in r.data.metrics.items() if k not in step_keys} == result["metrics"]
        assert r.data.metrics["ppl/wiki/seq32"] > 1 and r.data.metrics["time/total_s"] > 0
        assert r.data.tags["sweep"] == "grid" and r.data.tags["git_commit"]
        assert {"version.quant", "version.torch", "version.ray", "version.mlflow"} <= set(r.data.tags)
        assert r.data.tags["mlflow.parentRunId"] == out.parent_run_id
        files = {a.path for a in c.list_artifacts(r.info.run_id, "trial")}
        assert {"trial/result.json", "trial/recipe.json"} <= files
        if trial.config["method"] != "none":
            assert "trial/encodings.json" in files and Path(r.data.tags["artifact_dir"], "encodings.json").exists()
        if trial.config["method"] == "fake":
            hist = c.get_metric_history(r.info.run_id, "train/loss")
            assert sorted((m.step, m.value) for m in hist) == [(i, 1.0 / (i + 1)) for i in range(4)]
    parent = runs_of(data, "grid", "parent")
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    assert parent[0].data.metrics["trials_finished"] == 4
    # the best W8A8 model is registered under an alias
    w8a8 = {r.info.run_id: r.data.metrics["ppl/wiki/seq32"] for r in runs if r.data.tags["scheme"] == "w8a8"}
    mv = c.get_model_version_by_alias("grid.smollm2-135m.w8a8", "best")
    assert mv.run_id in w8a8 and w8a8[mv.run_id] == min(w8a8.values())

    # a finished sweep run again does no work and logs nothing new
    again = run_sweep(load_sweep(p), Options(data_dir=data, live=False))
    assert again.ok and again.executed == [] and len(again.results) == 4
    assert len(runs_of(data, "grid")) == 4 and count_lines(counter) == ["t"]


def test_a_raising_trial_is_a_failed_run_and_the_sweep_goes_on(env):
    root, data = env
    p = write_sweep(root, "fails", HEAD + """\
grid:
  method: [fake]
  method_config.fail: ["", "trial exploded on purpose"]
""")
    out = run_sweep(load_sweep(p), Options(data_dir=data, live=False))
    assert len(out.results) == 1 and len(out.failed) == 1
    assert list(out.failed.values()) == ["RuntimeError: trial exploded on purpose"]
    runs = runs_of(data, "fails")
    assert sorted(r.info.status for r in runs) == ["FAILED", "FINISHED"]
    failed = next(r for r in runs if r.info.status == "FAILED")
    assert failed.data.tags["error"] == "RuntimeError: trial exploded on purpose"
    assert failed.data.tags["trial_id"] in out.failed
    tb = client(data).download_artifacts(failed.info.run_id, "trial/error.txt", str(root))
    assert "trial exploded on purpose" in Path(tb).read_text()


def test_a_killed_worker_is_retried_and_the_sweep_completes(env):
    root, data = env
    counter, marker = root / "kill.count", root / "kill.marker"
    p = write_sweep(root, "kill", HEAD + f"""\
grid:
  method: [fake]
  method_config.label: [victim]
  method_config.count_file: ["{counter}"]
  method_config.die_once: ["{marker}"]
""")
    out = run_sweep(load_sweep(p), Options(data_dir=data, live=False))
    assert out.ok and len(out.results) == 1 and marker.exists()
    assert count_lines(counter) == ["victim", "victim"]  # killed once, run again once
    runs = runs_of(data, "kill")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.tags["attempts"] == "2"


def test_shared_stages_run_once_per_key(env):
    root, data = env
    p = write_sweep(root, "shared", HEAD + """\
grid:
  scheme: [w8a8, w4a8]
  method: [smoothquant]
  method_config.alpha: [0.5, 0.7]
""")
    sweep = load_sweep(p)
    out = run_sweep(sweep, Options(data_dir=data, live=False))
    assert out.ok and len(out.results) == 4
    cache = StageCache(data / "stages")
    for stage in ("activation_stats", "calib_tokens"):
        metas = [m for m in cache.computed(stage) if m["inputs"]["samples"] == 2 and m["inputs"]["seqlen"] == 32]
        assert len(metas) == 1, stage  # one computation for four trials
        keys = {s["key"] for r in out.results.values() for s in r["stages"]["shared"] if s["stage"] == stage}
        assert keys == {metas[0]["key"]}
    assert len(cache.computed("quantize")) >= 4


@pytest.mark.slow
def test_interrupted_sweep_resumes_running_each_missing_trial_once(env):
    root, data = env
    counter = root / "resume.count"
    # 8 trials of 4 s: after the first two finish, several seconds of work remain, so the SIGINT lands
    # mid-sweep even on a loaded machine
    labels = [f"r{i}" for i in range(8)]
    p = write_sweep(root, "resume", HEAD + f"""\
grid:
  method: [fake]
  method_config.label: [{", ".join(labels)}]
  method_config.sleep: [4]
  method_config.count_file: ["{counter}"]
""")
    sweep = load_sweep(p)
    # SIGINT back to its default in the child: a suite started in the background (`cmd &`) inherits it
    # ignored, and Python then installs no KeyboardInterrupt handler, so Ctrl-C would never arrive
    proc = subprocess.Popen(farm_cmd("sweep", str(p), "--data", str(data)), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        t0 = time.time()
        while time.time() - t0 < 600:  # a loaded 2-core machine starts Ray slowly; only "some done" matters
            done = [t for t in sweep.trials if (data / "trials" / t.id / "result.json").exists()]
            if len(done) >= 2:
                break
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, output
    assert "interrupted" in output
    runs = runs_of(data, "resume")
    assert not [r for r in runs if r.info.status == "RUNNING"]
    assert runs_of(data, "resume", "parent")[0].info.status == "KILLED"
    done_first = {t.id for t in sweep.trials if (data / "trials" / t.id / "result.json").exists()}
    assert 1 <= len(done_first) < len(sweep.trials)
    assert {r.data.tags["trial_id"] for r in runs if r.info.status == "FINISHED"} <= done_first
    before = len(count_lines(counter))

    out = run_sweep(load_sweep(p), Options(data_dir=data, live=False))
    assert out.ok
    missing = {t.id for t in sweep.trials} - done_first
    assert set(out.executed) == missing and len(out.executed) == len(missing)
    again = count_lines(counter)[before:]
    label_of = {t.id: t.config["method_config"]["label"] for t in sweep.trials}
    assert sorted(again) == sorted(label_of[t] for t in missing)  # each remaining trial exactly once
    runs = runs_of(data, "resume")
    finished = [r.data.tags["trial_id"] for r in runs if r.info.status == "FINISHED"]
    assert sorted(finished) == sorted(t.id for t in sweep.trials)  # one FINISHED run per trial
    assert not [r for r in runs if r.info.status == "RUNNING"]
    assert runs_of(data, "resume", "parent")[0].info.status == "FINISHED"


def test_logging_through_a_real_mlflow_server(env):
    root, _ = env
    data = root / "server-data"
    port = free_port()
    server = subprocess.Popen(farm_cmd("ui", "--data", str(data), "--port", str(port)), cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", timeout=90, proc=server)
        uri = f"http://127.0.0.1:{port}"
        p = write_sweep(root, "served", HEAD + "grid:\n  scheme: [fp, w8a8]\n")
        sweep = load_sweep(p)
        out = run_sweep(sweep, Options(data_dir=root / "served-local", tracking_uri=uri, live=False))
        assert out.ok
        c = MlflowClient(uri)
        exp = c.get_experiment_by_name("served")
        runs = c.search_runs([exp.experiment_id], "tags.farm_role = 'trial'")
        assert sorted(r.data.tags["trial_id"] for r in runs) == sorted(t.id for t in sweep.trials)
        for r in runs:
            assert r.info.status == "FINISHED"
            assert r.data.metrics == out.results[r.data.tags["trial_id"]]["metrics"]
            assert {a.path for a in c.list_artifacts(r.info.run_id, "trial")} >= {"trial/result.json"}
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()


def test_lm_eval_suite_metrics_reach_mlflow(env):
    root, data = env
    p = write_sweep(root, "suite", """\
name: NAME
base: {model: smollm2-135m, layers: 1, seqlen: 32}
grid: {scheme: [fp]}
eval: {perplexity: {limit: 2}, suite: [mq_lambada], suite_limit: 3}
""")
    out = run_sweep(load_sweep(p), Options(data_dir=data, live=False))
    assert out.ok
    (result,) = out.results.values()
    assert result["metrics"]["lmeval/mq_lambada/n"] == 3 and "lmeval/mq_lambada/acc" in result["metrics"]
    (run,) = runs_of(data, "suite")
    assert run.info.status == "FINISHED" and run.data.metrics == result["metrics"]


def test_a_late_started_event_opens_no_second_run(tmp_path):
    """Seen once on a starved 2-core machine: a trial's "started" event arrived after its result, and the
    sweep opened a second MLflow run that stayed RUNNING. Events are fed to the handler in that order."""
    import io

    from farm.orchestrate.progress import Progress
    from farm.orchestrate.sweep import Outcome, SweepRun
    from farm.orchestrate.tracking import Tracker

    p = write_sweep(tmp_path, "late", "name: late\nbase: {model: smollm2-135m, layers: 1, method: rtn}\n"
                    "grid: {samples: [2, 4]}\n")
    sweep = load_sweep(p)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, "late", tmp_path / "art")
    outcome = Outcome(sweep, {}, {}, [], [], parent_run_id=tracker.start_parent(sweep))
    done, failed = sweep.trials
    runs = {}
    state = SweepRun(sweep, tracker, outcome, runs, tmp_path, {"cpu": 1})
    state.progress = Progress(2, 0, 1, io.StringIO(), live=False)
    state.handle(done.id, "finished", {"trial_id": done.id, "metrics": {"ppl/wiki/seq32": 3.0}, "steps": [],
                                       "timing": {"total_s": 1.0}, "attempt": "a1", "attempt_count": 1})
    state.handle(failed.id, "failed", {"error": "RuntimeError: boom"})
    for tid in (done.id, failed.id):  # late events of both
        state.handle(tid, "started", {"attempt": "a1", "time": time.time()})
        state.handle(tid, "step", {"attempt": "a1", "step": 1, "loss": 1.0})
    statuses = sorted(r.info.status for r in MlflowClient(uri).search_runs(
        [MlflowClient(uri).get_experiment_by_name("late").experiment_id], "tags.farm_role = 'trial'"))
    assert statuses == ["FAILED", "FINISHED"] and runs == {}
