"""The sweep controller (farm.orchestrate.sweep.SweepController) and its callbacks: the events a callback
hears for a real sweep on a real local Ray instance and sqlite MLflow store, in order; a callback that
raises loses no finished result, and closes no fewer MLflow runs. Trials use one decoder layer, 2
calibration windows of 32 tokens."""

from __future__ import annotations

import io
import time

import pytest
from mlflow import MlflowClient

from farm.orchestrate.callbacks import Callback
from farm.orchestrate.results import load_result
from farm.orchestrate.sweep import Options, SweepController, default_callbacks, run_sweep
from farm.plan.spec import load_sweep
from tests.farm_env import contained_env, write_sweep

HEAD = """\
name: NAME
base: {model: smollm2-135m, layers: 1, samples: 2, seqlen: 32, method: fake}
eval: {perplexity: {limit: 2}}
plugins: {methods: {fake: "HELPER"}}
resources: {cpu: 1}
"""


@pytest.fixture(scope="module")
def env():
    import ray

    from farm.orchestrate import scheduler

    with contained_env() as root:
        assert scheduler.connect(num_cpus=2)  # one local instance for the module
        try:
            yield root
        finally:
            ray.shutdown()


class Recorder(Callback):
    """Every hook it hears, as (hook, trial id or None, what matters of the payload), and at each result
    whether the result file was on disk already."""

    def __init__(self, data):
        self.data, self.events, self.saved_first = data, [], {}

    def setup(self, run):
        self.events.append(("setup", None, None))

    def on_trial_restore(self, run, tid, result):
        self.events.append(("restore", tid, None))

    def on_sweep_start(self, run):
        self.events.append(("sweep_start", None, run.slots))

    def on_trial_start(self, run, tid, info):
        self.events.append(("start", tid, run.attempts[tid].count))

    def on_trial_step(self, run, tid, step):
        self.events.append(("step", tid, {k: v for k, v in step.items() if k != "attempt"}))

    def on_trial_result(self, run, tid, result):
        self.saved_first[tid] = load_result(self.data, tid) == result
        self.events.append(("result", tid, None))

    def on_trial_error(self, run, tid, error):
        self.events.append(("error", tid, error["error"]))

    def on_device_result(self, run, tid, summary):
        self.events.append(("device", tid, summary["label"]))

    def on_sweep_end(self, run, status):
        self.events.append(("sweep_end", None, status))

    def of(self, tid):
        return [(hook, extra) for hook, t, extra in self.events if t == tid]


class Boom(Callback):
    """Raises on the first result it hears: a broken callback (a full disk, a bug)."""

    def __init__(self):
        self.tid = None

    def on_trial_result(self, run, tid, result):
        self.tid = tid
        raise RuntimeError("callback exploded on purpose")


def _runs(uri, name, role="trial"):
    c = MlflowClient(uri)
    return c.search_runs([c.get_experiment_by_name(name).experiment_id], f"tags.farm_role = '{role}'")


@pytest.mark.slow
def test_a_recording_callback_hears_each_trial_start_steps_and_end_in_order(env):
    data = env / "rec-data"
    p = write_sweep(env, "rec", HEAD + """\
grid:
  method_config.steps: [3]
  method_config.fail: ["", "trial exploded on purpose"]
""")
    sweep = load_sweep(p)
    opts = Options(data_dir=data, live=False, out=io.StringIO())
    rec = Recorder(data)
    out = run_sweep(sweep, opts, [*default_callbacks(sweep, opts), rec])
    ok, bad = sweep.trials
    assert set(out.results) == {ok.id} and out.failed == {bad.id: "RuntimeError: trial exploded on purpose"}

    hooks = [h for h, _, _ in rec.events]
    assert hooks[0] == "setup" and rec.events[-1] == ("sweep_end", None, "finished")
    assert "restore" not in hooks and hooks.count("sweep_start") == 1
    assert rec.events[hooks.index("sweep_start")][2] == 2  # 2 CPUs, 1 per trial
    assert hooks.index("sweep_start") < min(i for i, h in enumerate(hooks) if h == "start")
    steps = out.results[ok.id]["steps"]
    assert [s["loss"] for s in steps] == [1.0, 0.5, 1 / 3]
    for tid, last in ((ok.id, ("result", None)), (bad.id, ("error", "RuntimeError: trial exploded on purpose"))):
        seq = rec.of(tid)
        # one start, then steps of that attempt (those that came before the end: the rest travel in the
        # result), then the end, and nothing after it
        assert seq[0] == ("start", 1) and seq[-1] == last
        live = [extra for hook, extra in seq[1:-1]]
        assert [h for h, _ in seq[1:-1]] == ["step"] * len(live) and len(live) <= 3
        assert [(s["step"], s["loss"]) for s in live] == [(i, 1.0 / (i + 1)) for i in range(len(live))]
    ok_live = [extra for hook, extra in rec.of(ok.id) if hook == "step"]
    assert ok_live == steps[:len(ok_live)]  # the very records the result carries
    assert rec.saved_first == {ok.id: True}  # the file was on disk before any callback heard of the result

    # the tracking callback, called before the recorder, closed both runs; the loss of every step is
    # logged once, whether it came live or in the result
    runs = {r.data.tags["trial_id"]: r for r in _runs(opts.uri, "rec")}
    assert {t: r.info.status for t, r in runs.items()} == {ok.id: "FINISHED", bad.id: "FAILED"}
    hist = MlflowClient(opts.uri).get_metric_history(runs[ok.id].info.run_id, "train/loss")
    assert sorted((m.step, m.value) for m in hist) == [(i, 1.0 / (i + 1)) for i in range(3)]
    shown = opts.out.getvalue()  # the progress callback's lines
    assert f"tracking: MLflow {opts.uri}" in shown
    assert f"done   {ok.short} " in shown and f"FAILED {bad.short} " in shown


def test_a_callback_that_raises_loses_no_finished_result(env):
    data = env / "boom-data"
    p = write_sweep(env, "boom", HEAD + "grid:\n  method_config.label: [a, b]\n")
    sweep = load_sweep(p)
    opts = Options(data_dir=data, live=False, out=io.StringIO())
    boom = Boom()
    with pytest.raises(RuntimeError, match="callback exploded on purpose"):
        run_sweep(sweep, opts, [boom, *default_callbacks(sweep, opts)])
    saved = load_result(data, boom.tid)
    assert saved is not None and saved["metrics"]["ppl/wiki/seq32"] > 1  # saved before the callback ran
    # tracking came after the broken callback, so it never closed that trial's run as FINISHED: the end of
    # the sweep did, as KILLED, and nothing stays RUNNING
    runs = _runs(opts.uri, "boom")
    assert runs and not [r for r in runs if r.info.status == "RUNNING"]
    killed = [r for r in runs if r.data.tags["trial_id"] == boom.tid]
    assert [r.info.status for r in killed] == ["KILLED"]
    assert killed[0].data.tags["farm_note"] == "the sweep stopped on an error"
    assert _runs(opts.uri, "boom", "parent")[0].info.status == "FAILED"
    done_before = {t.id for t in sweep.trials if load_result(data, t.id) is not None}

    # the same command again: the saved trial is not run, it is logged from its file
    opts = Options(data_dir=data, live=False, out=io.StringIO())
    rec = Recorder(data)
    out = run_sweep(load_sweep(p), opts, [*default_callbacks(sweep, opts), rec])
    assert out.ok and boom.tid in out.logged_from_cache
    assert sorted(out.executed) == sorted(t.id for t in sweep.trials if t.id not in done_before)
    assert ("restore", boom.tid, None) in rec.events and rec.of(boom.tid) == [("restore", None)]
    runs = _runs(opts.uri, "boom")
    finished = sorted(r.data.tags["trial_id"] for r in runs if r.info.status == "FINISHED")
    assert finished == sorted(t.id for t in sweep.trials)  # one FINISHED run per trial
    assert not [r for r in runs if r.info.status == "RUNNING"]
    assert _runs(opts.uri, "boom", "parent")[0].info.status == "FINISHED"


def test_events_fed_by_hand_keep_the_contract(tmp_path):
    """No Ray: a result that overtook its "started" event still gives a start first (from the result),
    late events are dropped, steps of an older attempt are dropped, and every callback hears the end even
    when one before it raises there."""
    p = write_sweep(tmp_path, "hand", "name: hand\nbase: {model: smollm2-135m, layers: 1, method: rtn}\n"
                    "grid: {samples: [2, 4]}\n")
    sweep = load_sweep(p)

    class BadEnd(Callback):
        def on_sweep_end(self, run, status):
            raise OSError("disk full")

    rec = Recorder(tmp_path)
    ctl = SweepController(sweep, Options(data_dir=tmp_path), [BadEnd(), rec])
    first, second = sweep.trials
    ctl.handle(first.id, "started", {"attempt": "a1", "time": time.time()})
    ctl.handle(first.id, "step", {"attempt": "a1", "step": 0, "loss": 2.0})
    ctl.handle(first.id, "started", {"attempt": "a2", "time": time.time()})  # Ray re-ran it
    ctl.handle(first.id, "step", {"attempt": "a1", "step": 1, "loss": 1.5})  # the dead attempt's: dropped
    ctl.handle(first.id, "step", {"attempt": "a2", "step": 0, "loss": 1.9})
    result = {"trial_id": second.id, "metrics": {"ppl/wiki/seq32": 3.0}, "steps": [], "attempt": "b1",
              "started_at": 5.0, "node": {"host": "h", "node_ip": "10.0.0.2"}}
    ctl.handle(second.id, "finished", result)
    ctl.handle(second.id, "started", {"attempt": "b1", "time": time.time()})  # late: dropped
    assert rec.of(first.id) == [("start", 1), ("step", {"step": 0, "loss": 2.0}), ("start", 2),
                                ("step", {"step": 0, "loss": 1.9})]
    assert ctl.attempts[first.id].key == "a2" and ctl.attempts[first.id].steps == 1
    assert rec.of(second.id) == [("start", 1), ("result", None)] and rec.saved_first == {second.id: True}
    assert ctl.in_flight() == [first.id]
    with pytest.raises(OSError, match="disk full"):
        ctl._end("interrupted")
    assert rec.events[-1] == ("sweep_end", None, "interrupted")  # heard although BadEnd raised first
