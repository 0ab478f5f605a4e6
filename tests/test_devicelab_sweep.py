"""Device stages in sweeps: `devices: [host]` in a sweep file puts latency metrics into each trial's MLflow
run (real local Ray, real sqlite MLflow, the real host and qnn-sim backends), FP32 and W8A16 baselines
included and measured in the same session, cached by content so a re-run measures nothing twice, and added
to trials that finished before the section existed (placement on a cluster:
tests/test_devicelab_placement.py; sessions under load: tests/test_device_sessions.py).

The export step is the tiny QDQ export (tests.devicelab_fixtures.tiny_exporter) in place of
quant.export.export_artifact, so a trial takes seconds; the trials themselves are real (one decoder
layer of SmolLM2, RTN).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient

from farm.plan.spec import load_sweep
from farm.orchestrate.sweep import Options, run_sweep, summary_rows
from tests.devicelab_fixtures import tiny_exporter
from tests.farm_env import contained_env, write_sweep

HEAD = """\
name: NAME
base: {model: smollm2-135m, layers: 1, samples: 2, seqlen: 32, method: rtn}
eval: {perplexity: {limit: 2}}
resources: {cpu: 1}
register_best: false
"""


@pytest.fixture(scope="module")
def env():
    import ray

    from farm.orchestrate import scheduler

    with contained_env() as root:
        assert scheduler.connect(num_cpus=2)
        try:
            yield root, root / "data"
        finally:
            ray.shutdown()


def _runs(data: Path, name: str) -> dict:
    c = MlflowClient(f"sqlite:///{data / 'mlflow.db'}")
    exp = c.get_experiment_by_name(name)
    return {r.data.tags["trial_id"]: r for r in c.search_runs([exp.experiment_id], "tags.farm_role = 'trial'")}


def _entries(data: Path, stage: str) -> list:
    d = data / "stages" / stage
    return sorted(p.name for p in d.iterdir() if (p / "meta.json").exists()) if d.exists() else []


@pytest.mark.slow
def test_a_sweep_with_devices_puts_device_metrics_into_each_trial_run(env):
    root, data = env
    p = write_sweep(root, "devsweep", HEAD + """\
grid: {scheme: [w8a8]}
include: [{scheme: fp}]
devices:
  - {device: host, repeats: 5, warmup: 1, tokens: 4}
  - {device: qnn-sim, graphs: [prefill], repeats: 2, warmup: 1}
""")
    sweep = load_sweep(p)
    out = run_sweep(sweep, Options(data_dir=data, live=False, exporter=tiny_exporter))
    # the grid's W8A8 and FP, and the W8A16 baseline that devices: adds
    assert out.ok and len(out.results) == 3, out.device_failed
    assert sorted(sweep.baselines.values()) == ["fp", "w8a16"]
    runs = _runs(data, "devsweep")
    quantized = [t for t in sweep.trials if t.config["method"] != "none"]
    for t in sweep.trials:
        res = json.loads((data / "trials" / t.id / "result.json").read_text())
        host = res["devices"]["host"]
        assert host["ok"] and [r["workload"]["graph"] for r in host["records"]] == ["prefill", "decode"]
        pre, dec = host["records"]
        m, tags = runs[t.id].data.metrics, runs[t.id].data.tags
        assert runs[t.id].info.status == "FINISHED"
        # exactly the record's numbers, under the names reports read
        assert m["device/host/prefill_ms"] == pre["median_ms"] and len(pre["samples_ms"]) == 5
        assert m["device/host/prefill_ms_ci_low"] <= m["device/host/prefill_ms"] <= m["device/host/prefill_ms_ci_high"]
        assert m["device/host/prefill_ms_p90"] == pre["p90_ms"]
        assert m["device/host/decode_tok_s"] == pytest.approx(1000.0 / dec["median_ms"])
        assert m["device/host/decode_tok_s_ci_low"] <= m["device/host/decode_tok_s"] \
            <= m["device/host/decode_tok_s_ci_high"]
        assert "device/host/energy_mj_per_tok" not in m  # the host measures no power: no number rather than 0
        assert tags["device/host/runtime"] == "onnxruntime" and tags["device/host/latency_meaningful"] == "true"
        assert tags["device/host/model"] and tags["device/host/soc"] and tags["device/host/os_build"]
        assert tags["device/host/prompt_len"] == "16"
        assert tags["device/qnn-sim/latency_meaningful"] == "false" and tags["device/qnn-sim/soc"].startswith("SM8650")
        assert "device/qnn-sim/decode_tok_s" not in m and m["ppl/wiki/seq32"] > 1  # accuracy next to latency
        # one session per device: every model timed in the same interleaved rounds
        assert tags["device/host/session"] == host["session"]["key"] and host["session"]["models"] == 3
        if sweep.baselines.get(t.id) != "fp":  # ratios to FP (and to W8A16 for the quantized trial)
            r = host["ratios"]["fp"]["prefill"]
            assert r["pairs"] == 5 and r["ci_low"] <= r["ratio"] <= r["ci_high"]
            assert m["device/host/prefill_ratio_fp"] == r["ratio"]
            assert m["device/host/decode_ratio_fp_ci_high"] == host["ratios"]["fp"]["decode"]["ci_high"]
    sessions = {json.loads((data / "trials" / t.id / "result.json").read_text())["devices"]["host"]["session"]["key"]
                for t in sweep.trials}
    assert len(sessions) == 1
    # the tiny exporter writes one graph for all: every export shares its graph, and the tags say so
    assert sorted(runs[quantized[0].id].data.tags["device/host/same_graph"].split(",")) == \
        sorted(t.short for t in sweep.trials if t.id != quantized[0].id)
    # an export per model (FP's from the float model), a session per device
    assert len(_entries(data, "export")) == 3 and len(_entries(data, "measure")) == 2
    before = {tid: dict(r.data.metrics) for tid, r in runs.items()}
    # the end-of-sweep table: latency columns for the host, none for the emulator
    rows, cols = summary_rows(sweep, out.results)
    assert cols[-7:] == ["host prefill ms", "host tok/s", "prefill vs fp", "decode vs fp", "prefill vs w8a16",
                         "decode vs w8a16", "time"] and not any("qnn-sim" in c for c in cols)
    t = next(t for t in quantized if t.config["scheme"] == "w8a8")
    row = next(r for r in rows if r["trial"] == t.short)
    assert row["host prefill ms"] == f"{runs[t.id].data.metrics['device/host/prefill_ms']:.4g}"
    r = json.loads((data / "trials" / t.id / "result.json").read_text())["devices"]["host"]["ratios"]["w8a16"]["prefill"]
    assert row["prefill vs w8a16"].startswith(f"{r['ratio']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]")

    # run again: nothing is trained, exported or measured, and MLflow keeps the same numbers
    again = run_sweep(load_sweep(p), Options(data_dir=data, live=False, exporter=tiny_exporter))
    assert again.ok and again.executed == []
    assert len(_entries(data, "measure")) == 2
    assert {tid: dict(r.data.metrics) for tid, r in _runs(data, "devsweep").items()} == before


def test_devices_added_later_measure_finished_trials_without_rerunning_them(env):
    """With the real export step (quant.export.export_artifact) on the trial's own one-layer artifact."""
    root, data = env
    plain = HEAD + "grid: {scheme: [w8a8], seed: [5]}\nbaselines: []\n"
    p = write_sweep(root, "latedev", plain)
    first = run_sweep(load_sweep(p), Options(data_dir=data, live=False))
    assert first.ok and len(first.executed) == 1
    tid = first.executed[0]
    rid = _runs(data, "latedev")[tid].info.run_id
    p = write_sweep(root, "latedev", plain + "devices: [{device: host, repeats: 3, warmup: 1, tokens: 4, "
                                             "prefill: 16, ctx: 32}]\n")
    out = run_sweep(load_sweep(p), Options(data_dir=data, live=False))
    assert out.ok and out.executed == [], out.device_failed  # the trial itself is not run again
    runs = _runs(data, "latedev")
    assert list(runs) == [tid] and runs[tid].info.run_id == rid  # the same FINISHED run got the metrics
    res = json.loads((data / "trials" / tid / "result.json").read_text())
    pre, dec = res["devices"]["host"]["records"]
    m = runs[tid].data.metrics
    assert m["device/host/prefill_ms"] == pre["median_ms"] and m["device/host/decode_tok_s"] == dec["tokens_per_s"]
    assert runs[tid].data.tags["device/host/prompt_len"] == "16"
    # the export is the trial's: its index names the artifact the trial saved
    export_dir = data / "stages" / "export" / res["devices"]["host"]["stages"]["export"]["key"] / "export"
    index = json.loads((export_dir / "export.json").read_text())
    recipe = json.loads((Path(res["artifact_dir"]) / "recipe.json").read_text())
    assert index["graphs"]["prefill"]["prompt_len"] == 16 and index["num_layers"] == 1
    assert pre["model_id"] == index["content_hash"] and index["artifact_hash"] == recipe["content_hash"]


def test_phone_stage_compiles_once_beside_the_export_and_benches_the_compiled_folder(tmp_path):
    """The compile step of a phone's device stage, without a phone: farm.work.device_job with a compile target
    (the real devicelab.compile.compile_export through onnxruntime-qnn, SM8650) and the host as the measuring
    device. The compiled folder sits in an export folder (links to the export's files plus compiled-sm8650/),
    the layout the adb backend reads; export, compile and the measurement session are cache entries of
    their own."""
    from farm.plan.devices import DeviceJob
    from farm.work.device_job import measure_session, prepare_device_model
    from farm.work.measure import Entry

    job = DeviceJob(target="host", label="host", workloads=({"graph": "prefill", "warmup": 0, "repeats": 2},),
                    prefill=16, ctx=64, resources={}, compile_target="sm8650", devices_file="")
    prep = prepare_device_model("t1", str(tmp_path / "artifact"), "artifact-key", job, str(tmp_path), tiny_exporter)
    assert prep["stages"]["compile"]["hit"] is False and prep["stages"]["export"]["hit"] is False
    folder = Path(prep["folder"])
    assert folder == tmp_path / "stages" / "compile" / prep["stages"]["compile"]["key"] / "export"
    compiled = json.loads((folder / "compiled-sm8650" / "compile.json").read_text())
    assert compiled["target"]["soc_model"] == "57" and (folder / "export.json").is_symlink()
    assert sorted(p.name for p in (folder / "compiled-sm8650").glob("*.bin")) == ["decode_qnn.bin", "prefill_qnn.bin"]
    entries = [Entry("t1", "quantized", "m/1", prep["folder"], prep["signature"])]
    out = measure_session(job, entries, {"t1": prep["export_key"]}, str(tmp_path))
    rec = out["entries"]["t1"]["records"][0]
    assert out["stage"]["hit"] is False and len(out["entries"]) == 1 and len(rec["samples_ms"]) == 2
    assert rec["model_id"] == json.loads((folder / "export.json").read_text())["content_hash"]
    again = prepare_device_model("t1", str(tmp_path / "artifact"), "artifact-key", job, str(tmp_path), tiny_exporter)
    assert {k: v["hit"] for k, v in again["stages"].items()} == {"export": True, "compile": True}
    cached = measure_session(job, entries, {"t1": again["export_key"]}, str(tmp_path))
    assert cached["stage"]["hit"] is True and cached["entries"] == out["entries"]  # the cached measurement
