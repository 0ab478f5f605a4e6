"""``ScaledAdamW`` is AdamW with a per-parameter learning-rate multiplier: it must take the same steps as
``torch.optim.AdamW`` given one group per parameter at ``lr * scale``, and resume from its state dict."""

from __future__ import annotations

import io

import pytest
import torch

from quant.optim import ScaledAdamW


def _params(seed: int):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=g)) for shape in [(7,), (3, 5), (), (11,)]]


def _grads(params, step: int):
    g = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * (1 + step)


def test_same_steps_as_adamw_with_one_group_per_parameter():
    scales = [1.0, 1e-2, 255.0, 3e-4]
    ours, ref = _params(0), _params(0)
    opt = ScaledAdamW([{"params": ours, "scales": scales, "lr": 1e-3}])
    torch_opt = torch.optim.AdamW([{"params": [p], "lr": 1e-3 * s} for p, s in zip(ref, scales)],
                                  weight_decay=0.0, foreach=False)
    for step in range(12):
        _grads(ours, step), _grads(ref, step)
        if step == 6:  # a schedule changes the group's rate: the multipliers follow it
            opt.param_groups[0]["lr"] = 4e-4
            for g, s in zip(torch_opt.param_groups, scales):
                g["lr"] = 4e-4 * s
        opt.step(), torch_opt.step()
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    # the parameters did move, each by its own scale
    start = _params(0)
    moved = [float((a - s).abs().max()) for a, s in zip(ours, start)]
    assert moved[2] > 100 * moved[0] > 100 * moved[1] > 0


def test_state_dict_round_trip_resumes_identically():
    a = _params(1)
    opt = ScaledAdamW([{"params": a[:2], "lr": 1e-2, "kind": "let"},
                       {"params": a[2:], "scales": [2.0, 0.5], "lr": 1e-3, "kind": "lrl"}])
    for step in range(3):
        _grads(a, step)
        opt.step()
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    opt_b = ScaledAdamW([{"params": b[:2], "lr": 0.0, "kind": "let"},
                         {"params": b[2:], "scales": [2.0, 0.5], "lr": 0.0, "kind": "lrl"}])
    buf = io.BytesIO()  # through bytes, as a checkpoint goes (a loaded dict would otherwise share buffers)
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    opt_b.load_state_dict(torch.load(buf, weights_only=False))
    assert [g["lr"] for g in opt_b.param_groups] == [1e-2, 1e-3]
    for step in range(3, 6):
        _grads(a, step), _grads(b, step)
        opt.step(), opt_b.step()
    for p, q in zip(a, b):
        assert torch.equal(p, q)


def test_mismatched_scales_are_refused():
    with pytest.raises(ValueError, match="2 parameters but 1 scales"):
        ScaledAdamW([{"params": _params(0)[:2], "scales": [1.0], "lr": 1e-3}])
