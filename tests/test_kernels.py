"""The fused CPU kernels (``quant.kernels``) against the torch path they replace.

Outputs and input gradients must be bit-identical (the same float32 operations in the same order per
element); the scale and offset gradients are sums, so they may differ in summation order only.
"""

from __future__ import annotations

import pytest
import torch

from quant import kernels
from quant.quantizer import QSpec, fake_quant, qparams_from_minmax
from quant.sim import _LetScale


@pytest.fixture
def calls(monkeypatch):
    """Counts the kernel calls, so a test fails if the fused path is silently not taken."""
    n = {"forward": 0, "backward": 0}
    for name in n:
        real = getattr(kernels, name)

        def spy(*a, _real=real, _name=name, **k):
            n[_name] += 1
            return _real(*a, **k)
        monkeypatch.setattr(kernels, name, spy)
    return n


@pytest.fixture
def torch_path(monkeypatch):
    def run(fn):
        monkeypatch.setattr(kernels, "ENABLED", False)
        try:
            return fn()
        finally:
            monkeypatch.setattr(kernels, "ENABLED", True)
    return run


CASES = [  # (shape, spec, per_channel, transpose)
    ((6, 512), QSpec(8), False, False),
    ((4, 9, 37), QSpec(8), False, True),          # a non-contiguous view, as attention's q/k/v are
    ((48, 100), QSpec(4, symmetric=True), True, False),
    ((3, 2048), QSpec(16), False, False),
    ((48,), QSpec(8), True, False),               # a norm gain, one range per element
    ((7, 3), QSpec(8), False, False),             # fewer elements than a row of the split
]


def _inputs(shape, spec, per_channel, transpose, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 3
    if transpose:
        x = x.transpose(-1, -2)
    n = x.shape[0] if per_channel else 1
    # narrower than the data, so values clip at both ends; a fractional offset, as learned ranges train it
    s = torch.full((n,), 4.0 / (spec.qmax - spec.qmin)) * (1 + 0.1 * torch.rand(n, generator=g))
    o = torch.full((n,), 0.0 if spec.symmetric else (spec.qmax - spec.qmin) / 2 + 0.3)
    return x, s, o, torch.randn(x.shape, generator=g)


@pytest.mark.parametrize("shape,spec,per_channel,transpose", CASES)
def test_training_node_is_bit_identical_to_the_torch_path(shape, spec, per_channel, transpose, torch_path, calls):
    x, s0, o0, up = _inputs(shape, spec, per_channel, transpose)
    assert kernels.usable(x, s0) and x.is_contiguous() != transpose

    def run():
        xi, s, o = (v.clone().requires_grad_(True) for v in (x, s0, o0))  # clone keeps a view's strides
        y = fake_quant(xi, s, o, spec)
        (y * up).sum().backward()
        return y.detach(), xi.grad, s.grad, o.grad

    fused = run()
    assert calls == {"forward": 1, "backward": 1}
    ref = torch_path(run)
    assert calls == {"forward": 1, "backward": 1}
    assert torch.equal(fused[0], ref[0]) and torch.equal(fused[1], ref[1])
    assert 0 < (fused[1] == 0).float().mean() < 0.6  # both clipped and unclipped values are present
    for a, b in ((fused[2], ref[2]), (fused[3], ref[3])):  # sums with cancellation: bound by the largest
        torch.testing.assert_close(a, b, rtol=2e-5, atol=1e-5 * float(b.abs().max()))


@pytest.mark.parametrize("shape,spec,per_channel,transpose", CASES)
def test_inference_path_is_bit_identical_in_place_or_not(shape, spec, per_channel, transpose, torch_path, calls):
    x, s, o, _ = _inputs(shape, spec, per_channel, transpose, seed=1)
    with torch.no_grad():
        ref = torch_path(lambda: fake_quant(x, s, o, spec))
        assert calls["forward"] == 0
        assert torch.equal(fake_quant(x, s, o, spec), ref) and calls["forward"] == 1
        y = x.clone()
        out = fake_quant(y, s, o, spec, inplace=True)
        assert torch.equal(out, ref)
        if not transpose:  # a contiguous temporary is overwritten, as the simulator asks
            assert out.data_ptr() == y.data_ptr()


def test_gradients_of_scale_and_offset_match_float64():
    """Against the LSQ formula evaluated in float64 on the same rounding decisions."""
    spec = QSpec(8)
    x, s, o, up = _inputs((256, 1024), spec, False, False, seed=2)
    xi, si, oi = (v.clone().requires_grad_(True) for v in (x, s, o))
    (fake_quant(xi, si, oi, spec) * up).sum().backward()
    z = x.double() / s.double()
    q = torch.round((x / s).double()) + o.double()  # float32 division, as both paths round
    u = q.clamp(spec.qmin, spec.qmax)
    inside = u == q
    ds = torch.where(inside, u - o.double() - z, u - o.double())
    assert si.grad.item() == pytest.approx((up.double() * ds).sum().item(), rel=1e-5)
    assert oi.grad.item() == pytest.approx(-(up.double() * ~inside).sum().item() * s.item(), rel=1e-5)


def test_other_tensors_take_the_torch_path():
    spec = QSpec(8)
    x = torch.randn(5, 7)
    s, o = qparams_from_minmax(x.min(), x.max(), spec)
    assert not kernels.usable(x.double(), s)
    assert not kernels.usable(x, torch.rand(7) + 0.1)  # per-channel along another axis
    with torch.no_grad():
        y64 = fake_quant(x.double(), s.double(), o.double(), spec)
    assert y64.dtype == torch.float64
    torch.testing.assert_close(y64.float(), fake_quant(x, s, o, spec), rtol=0, atol=1e-6)


def test_nan_propagates_so_divergence_is_caught():
    """A NaN activation must reach the loss (``quant.train`` stops on a non-finite loss), not be clamped
    into the range."""
    spec = QSpec(8)
    x = torch.tensor([[float("nan"), 0.5, float("inf"), -float("inf")] * 64])
    s, o = torch.tensor([0.01]), torch.tensor([128.0])
    with torch.no_grad():
        y = fake_quant(x, s, o, spec)
    assert torch.isnan(y[0, 0]) and y[0, 2].item() == pytest.approx(1.27) and y[0, 3].item() == pytest.approx(-1.28)
    xi = x.clone().requires_grad_(True)
    assert torch.isnan(fake_quant(xi, s.clone().requires_grad_(True), o, spec)[0, 0])


@pytest.mark.parametrize("which", ["both", "col", "row"])
def test_let_reparametrisation_matches_the_torch_operations(which):
    """``(w * col) / row[:, None]``: the forward bit-identical to the two torch operations (a missing side
    is ones, which is exact), the scale gradients equal to torch autograd's up to summation order."""
    g = torch.Generator().manual_seed(3)
    w, up = torch.randn(96, 200, generator=g), torch.randn(96, 200, generator=g)
    col0 = 0.5 + torch.rand(200, generator=g) if which != "row" else torch.ones(200)
    row0 = 0.5 + torch.rand(96, generator=g) if which != "col" else torch.ones(96)
    assert kernels.let_usable(w, col0, row0) and not kernels.let_usable(w.double(), col0, row0)
    assert not kernels.let_usable(w.clone().requires_grad_(True), col0, row0)  # a trained weight: torch ops

    def run(fused):
        col, row = (v.clone().requires_grad_(True) for v in (col0, row0))
        y = _LetScale.apply(w, col, row) if fused else (w * col) / row.unsqueeze(-1)
        (y * up).sum().backward()
        return y.detach(), col.grad, row.grad

    fused, ref = run(True), run(False)
    assert torch.equal(fused[0], ref[0])
    for a, b in zip(fused[1:], ref[1:]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))


def test_fused_row_minmax_equals_torch_min_and_max():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 577, generator=g)
    x[3, 10] = x[3, 200] = x[3].max() + 1  # a tie: the first index, as torch gives it
    x[5] = 0.5  # a constant row
    mn, imn, mx, imx = kernels.row_minmax(x)
    tmn, timn = x.min(1)
    tmx, timx = x.max(1)
    assert torch.equal(mn, tmn) and torch.equal(mx, tmx)
    assert torch.equal(imn, timn) and torch.equal(imx, timx)
    assert imx[3] == 10
