"""Device numbers a user can trust, through a real sweep (local Ray on 2 CPUs, sqlite MLflow, the real
exporter on one-layer SmolLM2 artifacts, the real host backend):

* a training trial shares the node with two quantized trials of one architecture and scheme; their
  host measurement waits until no trial trains, takes the whole node, and times both together with the
  FP32 and W8A16 baselines the sweep adds;
* the two same-graph trials' prefill medians agree within their intervals, the records say which trials
  share a graph, and the session's window overlaps no trial's training;
* every ratio is the median of per-round ratios, inside its own interval, over as many pairs as rounds.

And ``farm sweep sweeps/scaling.yaml --dry-run`` lists the trials and the device stages it would run on a
machine without a phone (the phone kind skipped, with the reason).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from farm.orchestrate.sweep import Options, run_sweep
from farm.plan.spec import load_sweep
from tests.farm_env import contained_env, write_sweep

ROOT = Path(__file__).resolve().parents[1]

SWEEP = """\
name: honest
base: {model: smollm2-135m, layers: 1, samples: 4, seqlen: 32, method: rtn}
grid:
  # the MobileQuant trial trains while the two RTN trials finish beside it
  method: [mobilequant, rtn]
  seed: [0, 1]
exclude: [{method: mobilequant, seed: 1}]
methods:
  mobilequant: {epochs: 12}
eval: {perplexity: {limit: 2}}
devices:
  - {device: host, repeats: 15, warmup: 2, tokens: 4, prefill: 16, ctx: 32}
resources: {cpu: 1}
register_best: false
"""


@pytest.fixture(scope="module")
def session():
    import ray

    from farm.orchestrate import scheduler

    with contained_env() as root:
        assert scheduler.connect(num_cpus=2)
        try:
            p = write_sweep(root, "honest", SWEEP)
            sweep = load_sweep(p)
            out = run_sweep(sweep, Options(data_dir=root / "data", live=False))
            yield sweep, out
        finally:
            ray.shutdown()


@pytest.mark.slow
def test_same_graph_trials_measured_together_after_training_agree_within_their_intervals(session):
    sweep, out = session
    assert out.ok, (out.failed, out.device_failed)
    assert len(sweep.trials) == 5 and sorted(sweep.baselines.values()) == ["fp", "w8a16"]
    rtn = [t for t in sweep.trials if t.config["method"] == "rtn" and t.config["scheme"] == "w8a8"]
    train = next(t for t in sweep.trials if t.config["method"] == "mobilequant")
    assert len(rtn) == 2
    host = {t.id: out.results[t.id]["devices"]["host"] for t in sweep.trials}
    a, b = (host[t.id] for t in rtn)
    # one session for all five models
    assert len({h["session"]["key"] for h in host.values()}) == 1 and a["session"]["models"] == 5
    # the same graph: named as such, and their medians agree within their intervals
    assert rtn[1].id in a["same_graph"] and rtn[0].id in b["same_graph"]
    pa, pb = a["records"][0], b["records"][0]
    assert pa["workload"]["graph"] == "prefill" and len(pa["samples_ms"]) == 15
    assert pa["ci_low_ms"] <= pb["ci_high_ms"] and pb["ci_low_ms"] <= pa["ci_high_ms"], (pa, pb)
    # measured with no training beside it: after every trial ended, and the whole node held
    start, end = a["session"]["started_at"], a["session"]["ended_at"]
    for t in sweep.trials:
        assert out.results[t.id]["ended_at"] <= start, t.short
    assert a["session"]["exclusive_node"] is True
    # the training trial did overlap the RTN trials: without the session they would have been timed beside it
    tr = out.results[train.id]
    assert any(out.results[t.id]["ended_at"] < tr["ended_at"] for t in rtn)
    cond = a["conditions"]
    assert cond["cpus"] >= 1 and cond["seconds"] > 0 and cond["others_cpu"] is not None
    assert end > start
    # ratios: per-round pairs, the estimate inside its interval, to FP and to W8A16
    for t in rtn + [train]:
        r = host[t.id]["ratios"]
        assert set(r) == {"fp", "w8a16"} and set(r["fp"]) == {"prefill", "decode"}
        for base in r.values():
            for g in ("prefill", "decode"):
                assert base[g]["pairs"] == 15 and base[g]["ci_low"] <= base[g]["ratio"] <= base[g]["ci_high"]
                assert base[g]["separable"] == (not base[g]["ci_low"] <= 1.0 <= base[g]["ci_high"])
    fp_id = next(tid for tid, role in sweep.baselines.items() if role == "fp")
    assert host[fp_id]["ratios"] == {}  # the reference of the references
    # the ratio is of the same rounds: recomputed from the two records' samples
    from farm.work.measure import paired_ratio

    fp_pre = host[fp_id]["records"][0]["samples_ms"]
    again = paired_ratio(fp_pre, pa["samples_ms"])
    assert again["ratio"] == pytest.approx(a["ratios"]["fp"]["prefill"]["ratio"])


def test_dry_run_lists_the_trials_and_device_stages_of_the_scaling_study(tmp_path):
    """No phone here: the adb entry is skipped with the reason; the host stage times every model."""
    env = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "HOME": str(tmp_path),
           "PATH": "/usr/bin:/bin", "MQFARM_DEVICES": str(tmp_path / "none.yaml"),
           "MQFARM_FARM_DIR": str(tmp_path / "farm"), "ANDROID_ADB_SERVER_PORT": "9"}
    (tmp_path / "none.yaml").write_text("host: {threads: 1}\n")
    res = subprocess.run([sys.executable, "-m", "farm.cli", "sweep", str(ROOT / "sweeps" / "scaling.yaml"),
                          "--dry-run"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=240)
    assert res.returncode == 0, res.stderr
    text = res.stdout
    sweep = load_sweep(ROOT / "sweeps" / "scaling.yaml", max_trials=None, devices_file=str(tmp_path / "none.yaml"))
    quantized = [t for t in sweep.trials if t.config["method"] != "none"]
    # 2 schemes x 2 methods x 3 sample counts x 3 epoch counts, FP, and the W8A16 baseline
    assert len(sweep.trials) == 38 and len(quantized) == 37
    assert f"{len(sweep.trials)} trials" in text
    m = re.search(r"device stage host: (\d+) models? \((\d+) quantized, baselines: (.+?)\)", text)
    assert m and int(m[1]) == 38 and int(m[2]) == 36 and m[3] == "fp, w8a16", text
    assert re.search(r"device stage adb: skipped \(no adb device is configured", text), text
