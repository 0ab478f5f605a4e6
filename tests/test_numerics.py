"""The numerics version (``quant.NUMERICS_VERSION``) guards every number the farm caches.

A pinned small result per version: if a change moves it while the version stays, this fails. Then either
the change was not meant to move numbers (fix it), or it was: bump ``quant/numerics.py``, add the new
pins here under the new version (keep the old ones: they are the record), and say why in its history.

The sweep test runs real local Ray and a real sqlite MLflow store; the bump reaches the workers through
Ray's ``worker_process_setup_hook``, as a redeployed cluster would have it."""

from __future__ import annotations

from pathlib import Path

import pytest

import quant
from quant import CalibConfig, evaluate_perplexity, load_model, quantize

# version -> machine class -> perplexity of the first decoder layer of SmolLM2-135M (real embedding and
# head) on the first 2 evaluation windows of 64 tokens, calibrated on 2 windows of 64 news tokens (seed 0).
# A one-layer model is a poor language model, hence the millions; what matters is that the quantized ones
# differ from FP. The machine class matters: torch's vectorized kernels (ATEN_CPU_CAPABILITY) and the BLAS
# sum in other orders on other CPUs, which moves these numbers by 1e-6 to 1e-3 relative (a rounding flip
# at a quantization boundary is a jump, not a drift). On this machine the three classes were recorded by
# forcing ATEN_CPU_CAPABILITY; on a class without pins the check is the loose one below.
PINNED = {
    1: {
        "AuthenticAMD/AVX512": {("fp", "rtn"): 37137603.76149092, ("w8a8", "rtn"): 38525320.76009826,
                                ("w4a8", "smoothquant"): 35340029.67885669},
        "AuthenticAMD/AVX2": {("fp", "rtn"): 37137543.90501364, ("w8a8", "rtn"): 38525109.27650673,
                              ("w4a8", "smoothquant"): 35339987.55838103},
        "AuthenticAMD/DEFAULT": {("fp", "rtn"): 37137548.3187036, ("w8a8", "rtn"): 38525301.308715224,
                                 ("w4a8", "smoothquant"): 35368659.778979436},
    },
    # version 2: the device table (``:device``) runs the norms' outputs and down_proj's input at 16 bits,
    # as the HTP does; the reference schemes pinned here compute exactly what they did under version 1
    2: {
        "AuthenticAMD/AVX512": {("fp", "rtn"): 37137603.76149092, ("w8a8", "rtn"): 38525320.76009826,
                                ("w4a8", "smoothquant"): 35340029.67885669},
        "AuthenticAMD/AVX2": {("fp", "rtn"): 37137543.90501364, ("w8a8", "rtn"): 38525109.27650673,
                              ("w4a8", "smoothquant"): 35339987.55838103},
        "AuthenticAMD/DEFAULT": {("fp", "rtn"): 37137548.3187036, ("w8a8", "rtn"): 38525301.308715224,
                                 ("w4a8", "smoothquant"): 35368659.778979436},
    },
}
REL = 1e-6  # six significant digits: bit-identical on one machine class, any thread count
LOOSE = 5e-3  # another machine class: only changes above its kernels' spread are seen


def machine_class() -> str:
    """CPU vendor and torch's kernel level: what decides the order of float sums here."""
    import torch

    vendor = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("vendor_id"):
                vendor = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{vendor}/{torch.backends.cpu.get_cpu_capability()}"


def _small_result(scheme: str, method: str) -> float:
    lm = load_model("smollm2-135m", num_layers=1)
    res = quantize(lm, scheme, method, CalibConfig(samples=2, seqlen=64), progress=False)
    assert res.recipe["numerics_version"] == quant.NUMERICS_VERSION
    return evaluate_perplexity(lm, seqlen=64, limit=2, progress=False).ppl


def _check(scheme: str, method: str, machine: str) -> None:
    assert quant.NUMERICS_VERSION in PINNED, (
        f"numerics version {quant.NUMERICS_VERSION} has no pinned results: add them to PINNED")
    pins = PINNED[quant.NUMERICS_VERSION]
    exact = machine in pins
    want = (pins[machine] if exact else next(iter(pins.values())))[(scheme, method)]
    got = _small_result(scheme, method)
    assert got == pytest.approx(want, rel=REL if exact else LOOSE), (
        f"{scheme} {method} on {machine}: {got!r} where numerics version {quant.NUMERICS_VERSION} pinned "
        f"{want!r}{'' if exact else ' (another machine class: loose check)'}; a change moved the numbers: bump "
        "quant.NUMERICS_VERSION (quant/numerics.py) or undo it")


@pytest.mark.parametrize("scheme,method", list(PINNED[max(PINNED)]["AuthenticAMD/AVX512"]))
def test_pinned_small_result_moves_only_with_the_version(scheme, method):
    _check(scheme, method, machine_class())


def test_the_pins_of_another_kernel_level(tmp_path):
    """The AVX2 class, forced through ATEN_CPU_CAPABILITY in a fresh interpreter (it is read at import):
    exact where its pins were recorded (AuthenticAMD), the loose check elsewhere."""
    import os
    import subprocess
    import sys

    code = ("import sys; sys.path.insert(0, 'tests'); import test_numerics as t; m = t.machine_class(); "
            "assert m.endswith('/AVX2'), m; t._check('w8a8', 'rtn', m)")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parent.parent, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]


def test_the_version_is_in_trial_ids_and_the_quantize_key(tmp_path, monkeypatch):
    from farm.plan.spec import load_sweep
    from farm.work.stages import plan
    from farm.core.ids import quant_key

    p = tmp_path / "v.yaml"
    p.write_text("name: v\nbase: {model: smollm2-135m, layers: 1, samples: 2, seqlen: 32}\n"
                 "grid: {method: [rtn, smoothquant]}\ninclude: [{scheme: fp}]\n")
    before = {t.config["method"]: t for t in load_sweep(p).trials}
    assert {t.config["numerics"] for t in before.values()} == {quant.NUMERICS_VERSION}
    monkeypatch.setattr(quant.numerics, "NUMERICS_VERSION", quant.NUMERICS_VERSION + 1)
    after = {t.config["method"]: t for t in load_sweep(p).trials}
    for m in ("rtn", "smoothquant", "none"):
        assert after[m].id != before[m].id
        assert quant_key(after[m].config) != quant_key(before[m].config)
        # shared stages are data (tokens) and float statistics (their own STATS_VERSION): still shared
        assert [k for _, k, _ in plan(after[m].config)] == [k for _, k, _ in plan(before[m].config)]


def test_a_worker_with_other_numerics_refuses_the_trial(tmp_path):
    from farm.work.trial import execute_trial

    config = {"model": "smollm2-135m", "layers": 1, "scheme": "fp", "method": "none", "method_config": {},
              "calib": None, "plugin": None, "numerics": quant.NUMERICS_VERSION + 1,
              "eval": {"perplexity": {"corpus": "wiki", "seqlen": 32, "limit": 1, "batch_size": 1}, "suite": []}}
    with pytest.raises(RuntimeError, match=f"numerics version {quant.NUMERICS_VERSION + 1} but the quant "
                                           f"package on .* is version {quant.NUMERICS_VERSION}"):
        execute_trial("t", config, tmp_path)


V = quant.NUMERICS_VERSION  # the code's version, as imported (also in a Ray worker, before the hook)


def bump_numerics_version() -> None:
    """Ray worker setup hook: this worker's quant is one numerics version ahead."""
    import quant.numerics

    quant.numerics.NUMERICS_VERSION = V + 1


@pytest.mark.slow
@pytest.mark.timeout(900)  # a worker that cannot run the hook is restarted forever: fail instead of hanging
def test_a_sweep_rerun_after_a_bump_recomputes_what_changed_and_nothing_else(monkeypatch, capsys):
    """Version V, then the same sweep at version V + 1: every trial and every quantized artifact again
    (their ids carry the version), the calibration tokens and float statistics from the cache; a third
    run at V + 1 does nothing. ``farm status`` and the MLflow params say which version made what."""
    import ray
    from mlflow import MlflowClient

    from farm.core.cache import StageCache
    from farm.cli import main
    from farm.plan.spec import load_sweep
    from farm.orchestrate.sweep import Options, run_sweep, sweep_status
    from tests.farm_env import REPO, contained_env, count_lines, write_sweep

    with contained_env() as root:
        data = root / "data"
        counter = root / "runs.count"
        p = write_sweep(root, "bump", f"""\
name: NAME
base: {{model: smollm2-135m, layers: 1, samples: 2, seqlen: 32}}
grid: {{method: [fake, smoothquant]}}
methods: {{fake: {{label: fake, count_file: "{counter}"}}}}
include: [{{scheme: fp}}]
eval: {{perplexity: {{limit: 2}}}}
plugins: {{methods: {{fake: "HELPER"}}}}
resources: {{cpu: 1}}
""")
        stages = StageCache(data / "stages")

        def entries():
            return {s: {m["key"] for m in stages.computed(s)} for s in ("calib_tokens", "activation_stats",
                                                                       "quantize")}

        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        try:
            first = run_sweep(load_sweep(p), Options(data_dir=data, live=False))
        finally:
            ray.shutdown()
        assert first.ok and len(first.executed) == 3 and count_lines(counter) == ["fake"]
        v1 = entries()
        assert [len(v1[s]) for s in ("calib_tokens", "activation_stats", "quantize")] == [1, 1, 2]

        monkeypatch.setattr(quant.numerics, "NUMERICS_VERSION", V + 1)
        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False,
                 # the hook is imported before Ray puts the driver's folder on the worker's sys.path
                 runtime_env={"env_vars": {"PYTHONPATH": str(REPO)},
                              "worker_process_setup_hook": "tests.test_numerics.bump_numerics_version"})
        try:
            sweep = load_sweep(p)
            second = run_sweep(sweep, Options(data_dir=data, live=False))
            third = run_sweep(load_sweep(p), Options(data_dir=data, live=False))
        finally:
            ray.shutdown()
        assert second.ok and sorted(second.executed) == sorted(t.id for t in sweep.trials)
        assert not set(second.executed) & set(first.executed)
        assert count_lines(counter) == ["fake", "fake"]  # quantized once per version
        v2 = entries()
        assert v2["calib_tokens"] == v1["calib_tokens"] and v2["activation_stats"] == v1["activation_stats"]
        assert len(v2["quantize"] - v1["quantize"]) == 2 and v1["quantize"] <= v2["quantize"]
        for res in second.results.values():
            if res["config"]["method"] != "none":
                assert res["recipe"]["numerics_version"] == V + 1
                assert all(s["hit"] for s in res["stages"]["shared"])  # nothing shared was recomputed
        assert third.ok and third.executed == [] and count_lines(counter) == ["fake", "fake"]

        runs = MlflowClient(f"sqlite:///{data / 'mlflow.db'}").search_runs(
            [MlflowClient(f"sqlite:///{data / 'mlflow.db'}").get_experiment_by_name("bump").experiment_id],
            "tags.farm_role = 'trial'")
        assert sorted(r.data.params["numerics"] for r in runs) == [str(V)] * 3 + [str(V + 1)] * 3

        rows, cols, counts = sweep_status(sweep, Options(data_dir=data))
        assert counts["done"] == 3 and counts["other_numerics"] == {str(V): 3}
        assert all(r["status"] == "done" for r in rows)
        monkeypatch.setattr(quant.numerics, "NUMERICS_VERSION", V + 2)  # the code moves on; results stay on disk
        assert sweep_status(load_sweep(p), Options(data_dir=data))[2]["done"] == 0  # new ids: nothing done
        assert main(["status", str(p), "--data", str(data)]) == 0
        out = capsys.readouterr().out
        assert ("not comparable: 6 trial run(s) in MLflow were made by other arithmetic (3 with version "
                f"{V}, 3 with version {V + 1}); this code is numerics version {V + 2}") in out
        assert main(["status", "bump", "--data", str(data)]) == 0
        out = capsys.readouterr().out
        assert out.count(f"{V} (other)") == 3 and out.count(f"{V + 1} (other)") == 3


def test_bench_rows_of_another_version_are_computed_again(tmp_path, capsys, monkeypatch):
    """The bench scripts' resumable row files (bench/rowfile.py) are a cache too."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "bench"))
    import rowfile

    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"scheme": "w8a8", "ppl": 48.02}\n')  # written before numerics versions
    rowfile.append(str(rows), {"scheme": "w8a8", "ppl": 48.18})
    assert rowfile.read(str(rows), lambda r: True) == [
        {"scheme": "w8a8", "ppl": 48.18, "numerics_version": quant.NUMERICS_VERSION}]
    assert "1 row(s) made by another numerics version are not reused" in capsys.readouterr().err
    monkeypatch.setattr(quant.numerics, "NUMERICS_VERSION", quant.NUMERICS_VERSION + 1)
    assert rowfile.read(str(rows), lambda r: True) == []
