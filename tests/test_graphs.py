"""CUDA-graph replay of the training losses (``quant.graphs``) gives the eager result.

The CUDA tests need a CUDA device and are reported as skipped without one (CI has none). They have not
run yet: the session that wrote them had no GPU, which is why graphs are opt-in. The setting and the CPU
fallback are checked everywhere.
"""

from __future__ import annotations

import pytest
import torch

from quant import CalibConfig, evaluate_perplexity, load_model, quantize
from quant.graphs import ENV, MIN_STEPS, GraphedLoss, graphs_enabled
from quant.sim import quantizers

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device (none here; run on the GPU machine)")


def test_setting_is_read_from_the_environment(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    assert not graphs_enabled(torch.device("cuda"))  # opt-in until it has run on a GPU (quant/graphs.py)
    monkeypatch.setenv(ENV, "1")
    assert graphs_enabled(torch.device("cuda")) and not graphs_enabled(torch.device("cpu"))
    monkeypatch.setenv(ENV, "off")
    assert not graphs_enabled(torch.device("cuda"))
    monkeypatch.setenv(ENV, "maybe")
    with pytest.raises(ValueError, match=f"{ENV} must be 0 or 1.*'maybe'"):
        graphs_enabled(torch.device("cuda"))


def test_cpu_and_short_runs_stay_eager():
    w = torch.nn.Parameter(torch.tensor([2.0, -1.0]))
    calls = []

    def fn(x):
        calls.append(1)
        return (w * x).square().sum()

    for device, steps in (("cpu", 100), ("cuda", MIN_STEPS - 1)):
        g = GraphedLoss(fn, [w], torch.device(device), steps)
        assert not g.enabled
        x = torch.tensor([1.0, 3.0])
        loss = g(x)
        loss.backward()
        assert loss.item() == 13.0 and w.grad.tolist() == [4.0, -18.0] and g.captured == 0
        w.grad = None
    assert len(calls) == 2


CALIB = CalibConfig(samples=4, seqlen=64, seed=0)


def _run(method: str, graphs: bool, monkeypatch, **hp):
    monkeypatch.setenv(ENV, "1" if graphs else "0")
    lm = load_model("smollm2-135m", device="cuda")
    res = quantize(lm, "w8a8", method, CALIB, method_config=hp, progress=False)
    ppl = evaluate_perplexity(lm, seqlen=64, limit=4, progress=False).ppl
    return lm, res.recipe["method_info"], ppl


@needs_cuda
@pytest.mark.parametrize("method,hp,graphs", [
    # 4 windows x 5 epochs = 20 steps: one graph for the whole stack
    ("mobilequant", {"epochs": 5, "lrl": True}, 1),
    # 4 windows x 4 epochs = 16 steps per layer: one graph per decoder layer
    ("omniquant", {"epochs": 4}, 30),
])
def test_graphed_training_matches_eager(method, hp, graphs, monkeypatch):
    eager_lm, eager, p_eager = _run(method, False, monkeypatch, **hp)
    graph_lm, graphed, p_graph = _run(method, True, monkeypatch, **hp)
    print(f"{method}: eager {p_eager:.6f} graphed {p_graph:.6f}; info {graphed.get('cuda_graphs')}")
    assert eager["cuda_graphs"] == 0 and graphed["cuda_graphs"] == graphs
    assert graphed["steps"] == eager["steps"] >= 16
    key = "epoch_losses" if method == "mobilequant" else "layer_mse"
    # the replay runs the eager kernels in the eager order, so the numbers agree to float32 rounding
    assert graphed[key] == pytest.approx(eager[key], rel=1e-5)
    assert p_graph == pytest.approx(p_eager, rel=1e-4)
    eq, gq = quantizers(eager_lm.model), quantizers(graph_lm.model)
    for name, q in gq.items():
        torch.testing.assert_close(q.scale, eq[name].scale, rtol=1e-5, atol=1e-9, msg=name)
