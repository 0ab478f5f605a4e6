"""The measurement protocol on real onnxruntime: the host backend timing the tiny QDQ export, the QNN HTP
emulator (onnxruntime-qnn) running the same graphs with the NPU's arithmetic, and the statistics.

The qnn-sim agreement bound was measured on the tiny export (both sizes, 8 input seeds each, prefill and
decode with random uint8 caches): logits differ from onnxruntime's CPU QDQ result by at most 4.0 steps of
the logits' quantization grid (most elements by 0, some by 1-3: the HTP rounds its int32 accumulators
at other points than the CPU kernels), and the uint8 K/V outputs by at most 1 LSB on up to 19% of elements.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from devicelab import stats
from devicelab.backends.host import HostDevice, cpu_model
from devicelab.exported import read_export
from devicelab.protocol import Measurement, Workload
from devicelab.timing import allowed_cores, pinned, time_runs
from tests.devicelab_fixtures import make_tiny_export


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("exports")
    return make_tiny_export(root / "fast"), make_tiny_export(root / "slow", slow=True)


def test_host_prefill_record_is_consistent_and_round_trips(exports):
    fast, _ = exports
    dev = HostDevice()
    rec = dev.run(dev.prepare(fast), Workload(graph="prefill", warmup=2, repeats=15))
    s = np.array(rec.samples_ms)
    assert rec.status == "ok" and len(s) == 15 and (s > 0).all()
    assert rec.median_ms == pytest.approx(float(np.median(s)), rel=0, abs=0)
    assert s.min() <= rec.median_ms <= s.max()
    assert rec.p90_ms == float(np.percentile(s, 90)) and rec.median_ms <= rec.p90_ms <= s.max()
    assert rec.ci_low_ms <= rec.median_ms <= rec.ci_high_ms and rec.ci_level == 0.95
    assert s.min() <= rec.ci_low_ms and rec.ci_high_ms <= s.max()  # a bootstrap median is always a sample value
    # the export's fixed prompt length replaces the workload's default, and the record says so
    assert rec.workload.prompt_len == 16 and rec.extra["prompt_len"] == 16
    assert rec.extra["prefill_tok_s"] == pytest.approx(16 / (rec.median_ms / 1000))
    assert rec.model_id == read_export(fast).content_hash and len(rec.model_id) == 16
    assert rec.latency_meaningful is True and rec.energy_mj_per_token is None
    # identity
    d = rec.device
    assert (d.name, d.kind, d.runtime, d.runtime_version) == ("host", "host", "onnxruntime", ort.__version__)
    assert d.model == cpu_model() and d.model and d.soc and d.os_build
    # plain data: through JSON and back, equal field for field
    again = Measurement.from_dict(json.loads(json.dumps(rec.to_dict())))
    assert again == rec


def test_host_decode_gives_tokens_per_second_from_the_median_step(exports):
    fast, _ = exports
    dev = HostDevice()
    rec = dev.run(dev.prepare(fast), Workload(graph="decode", tokens=8, warmup=1, repeats=9))
    assert len(rec.samples_ms) == 9
    assert rec.tokens_per_s == pytest.approx(1000.0 / rec.median_ms)
    assert rec.extra["ctx"] == 64 and rec.workload.tokens == 8
    # a decode step of this graph costs about what a 16-token prefill does (both are weight-bound at this size)
    assert 0 < rec.median_ms < 50


def test_the_slow_variant_is_measurably_slower_interleaved(exports):
    """A/B/A/B on one device: the wide model's prefill is several times the tiny one's (measured 12x)."""
    fast, slow = exports
    dev = HostDevice()
    a, b = dev.prepare(fast), dev.prepare(slow)
    feeds = {name: p.export.graph("prefill").synthetic_inputs(p.export.vocab_size) for name, p in
             (("fast", a), ("slow", b))}
    sess = {"fast": a.sessions["prefill"], "slow": b.sessions["prefill"]}

    def one(name):
        return lambda: time_runs(lambda: sess[name].run(None, feeds[name]), 0, 1)[0]

    out = stats.interleaved({"fast": one("fast"), "slow": one("slow")}, rounds=15, warmup=2)
    assert len(out["fast"]) == len(out["slow"]) == 15
    assert stats.median(out["slow"]) > 3 * stats.median(out["fast"])


def test_interleaved_runs_variants_in_turn_and_drops_warmup():
    calls = []
    def variant(name):
        return lambda: calls.append(name) or len(calls)

    out = stats.interleaved({"A": variant("A"), "B": variant("B")}, rounds=3, warmup=1)
    assert "".join(calls) == "ABABABAB"
    assert out == {"A": [3.0, 5.0, 7.0], "B": [4.0, 6.0, 8.0]}  # the warm-up round's values are dropped


def test_bootstrap_ci_is_seeded_contains_the_median_and_narrows_with_more_samples():
    rng = np.random.default_rng(7)
    for _ in range(20):
        x = rng.lognormal(0.0, 0.5, size=int(rng.integers(3, 60)))
        lo, hi = stats.bootstrap_median_ci(x)
        assert lo <= np.median(x) <= hi
        assert (lo, hi) == stats.bootstrap_median_ci(x)  # same samples, same interval
    small = stats.bootstrap_median_ci(rng.normal(10, 1, 10))
    big = stats.bootstrap_median_ci(rng.normal(10, 1, 1000))
    assert big[1] - big[0] < (small[1] - small[0]) / 3  # width ~ 1/sqrt(n): 10x the samples, ~1/3.2 the width
    assert stats.bootstrap_median_ci([4.2]) == (4.2, 4.2)
    with pytest.raises(ValueError, match="no samples"):
        stats.bootstrap_median_ci([])


def test_time_runs_times_only_the_repeats():
    calls = []

    def work():
        calls.append(1)
        time.sleep(0.002)

    ms = time_runs(work, warmup=3, repeats=5)
    assert len(calls) == 8 and len(ms) == 5
    assert all(2.0 <= t < 200.0 for t in ms)
    with pytest.raises(ValueError, match="repeats"):
        time_runs(work, 0, 0)


def test_pinning_restores_the_previous_affinity():
    before = allowed_cores()
    if not before:
        pytest.skip("this platform has no CPU affinity API (os.sched_getaffinity)")
    with pinned(1) as cores:
        inside = sorted(os.sched_getaffinity(0))
    assert sorted(os.sched_getaffinity(0)) == before
    if cores:  # pinning may be refused by a container policy: then nothing changed
        assert inside == cores == before[:1]
    else:
        assert inside == before


def _logits_scale(path: Path) -> float:
    m = onnx.load(path)
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    q = next(n for n in m.graph.node if n.op_type == "QuantizeLinear" and n.output[0].startswith("logits"))
    return float(inits[q.input[1]])


def test_qnn_sim_matches_cpu_within_the_measured_bound_and_says_latency_is_not_meaningful(exports):
    from devicelab.backends.qnn_sim import QnnSimDevice

    fast, _ = exports
    ex = read_export(fast)
    host, sim = HostDevice(), QnnSimDevice()
    hp, sp = host.prepare(fast), sim.prepare(fast)
    for graph in ("prefill", "decode"):
        step = _logits_scale(ex.graph(graph).path)
        for seed in range(3):
            feeds = ex.graph(graph).synthetic_inputs(ex.vocab_size, seed=seed)
            if graph == "decode":  # a filled cache, not zeros
                rng = np.random.default_rng(seed)
                for k in ("k_cache", "v_cache"):
                    feeds[k] = rng.integers(0, 256, feeds[k].shape).astype(np.uint8)
            a = host.outputs(hp, graph, {k: v.copy() for k, v in feeds.items()})
            b = sim.outputs(sp, graph, {k: v.copy() for k, v in feeds.items()})
            assert set(a) == set(b) == {"logits", "k_out", "v_out"}
            d = np.abs(a["logits"].astype(np.float64) - b["logits"]) / step
            assert d.max() <= 4.5, f"{graph} seed {seed}: logits differ by {d.max():.2f} steps"
            assert np.median(d) <= 1.0
            for k in ("k_out", "v_out"):
                assert b[k].dtype == np.uint8
                lsb = np.abs(a[k].astype(int) - b[k].astype(int))
                assert lsb.max() <= 1 and (lsb > 0).mean() <= 0.25
    rec = sim.run(sp, Workload(graph="prefill", warmup=1, repeats=3))
    assert rec.latency_meaningful is False and rec.status == "ok" and len(rec.samples_ms) == 3
    assert rec.device.kind == "qnn-sim" and rec.device.soc.startswith("SM8650")
    assert rec.device.runtime == "onnxruntime-qnn" and rec.device.runtime_version
    assert Measurement.from_dict(rec.to_dict()) == rec
