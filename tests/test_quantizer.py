"""The quantizer primitive against hand-computed values."""

import pytest
import torch

from quant.quantizer import QSpec, Quantizer, fake_quant, minmax_from_qparams, qparams_from_minmax, quantize_int


def t(*v):
    return torch.tensor(v, dtype=torch.float32)


def test_qspec_ranges():
    assert (QSpec(8).qmin, QSpec(8).qmax) == (0, 255)
    assert (QSpec(8, symmetric=True).qmin, QSpec(8, symmetric=True).qmax) == (-128, 127)
    assert (QSpec(4).qmin, QSpec(4).qmax) == (0, 15)
    assert (QSpec(4, symmetric=True).qmin, QSpec(4, symmetric=True).qmax) == (-8, 7)
    assert QSpec(16).qmax == 65535


@pytest.mark.parametrize("bits", [0, 2, 3, 6, 32])
def test_bits_outside_allowed_set_raise(bits):
    with pytest.raises(ValueError, match=r"bits must be one of \(4, 8, 16\)"):
        QSpec(bits)


def test_asymmetric_scale_offset_by_hand():
    # [-1, 3] at 8 bits: scale 4/255, offset round(1 / (4/255)) = round(63.75) = 64
    scale, offset = qparams_from_minmax(t(-1.0), t(3.0), QSpec(8))
    assert scale.item() == pytest.approx(4 / 255, rel=1e-7)
    assert offset.item() == 64
    x = t(1.0, -1.0, 3.0, 10.0, -10.0, 0.0)
    q = quantize_int(x, scale, offset, QSpec(8))
    assert q.tolist() == [128, 0, 255, 255, 0, 64]  # 1.0 -> round(63.75)+64; out-of-range values clamp
    y = fake_quant(x, scale, offset, QSpec(8))
    expected = (q - 64) * (4 / 255)
    assert torch.allclose(y, expected, atol=1e-6)
    assert y[5].item() == 0.0  # zero is exactly representable


def test_symmetric_scale_by_hand():
    scale, offset = qparams_from_minmax(t(-0.5), t(2.54), QSpec(8, symmetric=True))
    assert scale.item() == pytest.approx(2.54 / 127, rel=1e-6)  # max(|min|, |max|) / 127
    assert offset.item() == 0
    x = t(2.54, -2.54, -3.0, 0.03)
    q = quantize_int(x, scale, offset, QSpec(8, symmetric=True))
    assert q.tolist() == [127, -127, -128, 2]  # -3.0 clamps at -128; 0.03/0.02 = 1.5 -> 2 (half to even)
    assert torch.allclose(fake_quant(x, scale, offset, QSpec(8, symmetric=True)), q * scale, atol=1e-7)


def test_four_bit_asymmetric_grid():
    scale, offset = qparams_from_minmax(t(0.0), t(1.5), QSpec(4))
    assert scale.item() == pytest.approx(0.1) and offset.item() == 0
    x = torch.linspace(0, 1.5, 31)
    y = fake_quant(x, scale, offset, QSpec(4))
    assert torch.unique(y).numel() == 16
    assert (y - x).abs().max().item() <= 0.05 + 1e-6  # at most half a step


def test_range_is_widened_to_contain_zero():
    scale, offset = qparams_from_minmax(t(2.0), t(4.0), QSpec(8))
    assert offset.item() == 0 and scale.item() == pytest.approx(4 / 255)
    mn, mx = minmax_from_qparams(scale, offset, QSpec(8))
    assert mn.item() == 0.0 and mx.item() == pytest.approx(4.0)


def test_per_channel_weights_by_hand():
    w = torch.tensor([[-1.0, 0.0, 3.0], [0.0, 2.0, 4.0]])
    qz = Quantizer(QSpec(8, per_channel=True), "w")
    mn, mx = qz._reduce(w)
    assert mn.tolist() == [-1.0, 0.0] and mx.tolist() == [3.0, 4.0]
    qz.set_range(mn, mx)
    assert torch.allclose(qz.scale, t(4 / 255, 4 / 255))
    assert qz.offset.tolist() == [64.0, 0.0]  # round(63.75), 0
    y = qz(w)
    row0 = (quantize_int(w[0], qz.scale[0], qz.offset[0], QSpec(8)) - 64) * (4 / 255)
    assert torch.allclose(y[0], row0, atol=1e-7)
    assert torch.allclose(y[1], w[1], atol=(4 / 255) / 2 + 1e-7)


def test_straight_through_gradient():
    scale, offset = qparams_from_minmax(t(-1.0), t(1.0), QSpec(8))
    x = torch.tensor([-2.0, -0.3, 0.2, 0.9, 2.0], requires_grad=True)
    fake_quant(x, scale, offset, QSpec(8)).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]  # identity inside the range, zero where clamped


def test_gradient_reaches_learnable_scale_and_offset():
    scale = torch.tensor([0.01], requires_grad=True)
    offset = torch.tensor([128.0], requires_grad=True)
    x = torch.linspace(-3, 3, 101)
    fake_quant(x, scale, offset, QSpec(8)).pow(2).sum().backward()
    assert scale.grad.abs().item() > 0 and offset.grad.abs().item() > 0


def test_fast_and_autograd_paths_agree():
    torch.manual_seed(0)
    x = torch.randn(64, 33) * 5
    for spec in (QSpec(8), QSpec(4, True), QSpec(16)):
        scale, offset = qparams_from_minmax(x.min(), x.max(), spec)
        with torch.no_grad():
            fast = fake_quant(x, scale, offset, spec)
        slow = fake_quant(x.clone().requires_grad_(), scale, offset, spec).detach()
        assert torch.allclose(fast, slow, atol=scale.item() * 1e-3)


def test_quantizer_states():
    qz = Quantizer(QSpec(8), "site")
    x = torch.tensor([-1.0, 3.0])
    with pytest.raises(RuntimeError, match="site.*no range"):
        qz(x)
    qz.observing = True
    assert torch.equal(qz(x), x) and torch.equal(qz(torch.tensor([5.0])), torch.tensor([5.0]))
    qz.finish_observing()
    assert qz.scale.item() == pytest.approx(6 / 255)  # running range [-1, 5]
    qz.enabled = False
    assert torch.equal(qz(torch.tensor([0.123])), torch.tensor([0.123]))
    assert torch.equal(Quantizer(None)(x), x)
    with pytest.raises(ValueError, match="non-finite"):
        qz.set_qparams(t(float("nan")), t(0.0))


@pytest.mark.parametrize("spec, per_channel", [(QSpec(8), False), (QSpec(4, symmetric=True), True),
                                               (QSpec(16), False)])
def test_fused_training_node_matches_the_composite_formula(spec, per_channel):
    """The one-node fake quantization used in training gives the reference formula's values and gradients
    (straight-through for x inside the range, LSQ-style for scale and a continuous offset)."""
    from quant.quantizer import fake_quant_reference

    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 40, generator=g) * 3
    n = 6 if per_channel else 1
    # a range narrower than the data, so some values clip at each end; a fractional offset, as LRL trains it
    s0 = torch.full((n,), 4.0 / (spec.qmax - spec.qmin)) * (1 + 0.1 * torch.rand(n, generator=g))
    o0 = torch.full((n,), 0.0 if spec.symmetric else (spec.qmax - spec.qmin) / 2 + 0.3)
    upstream = torch.randn(6, 40, generator=g)
    grads = []
    for fn in (fake_quant, fake_quant_reference):
        xi, s, o = (v.clone().requires_grad_(True) for v in (x, s0, o0))
        y = fn(xi, s, o, spec)
        (y * upstream).sum().backward()
        grads.append((y.detach(), xi.grad, s.grad, o.grad))
    fused, ref = grads
    assert torch.equal(fused[0], ref[0])
    assert torch.equal(fused[1] == 0, ref[1] == 0)  # the same values clip
    torch.testing.assert_close(fused[1], ref[1], rtol=1e-6, atol=0)  # the reference goes through x/s*s
    assert 0 < (fused[1] == 0).float().mean() < 0.5  # both clipped and unclipped values are present
    torch.testing.assert_close(fused[2], ref[2], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused[3], ref[3], rtol=1e-5, atol=1e-6)


def test_row_minmax_matches_amin_amax_and_their_gradient():
    from quant.quantizer import row_minmax

    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 300, generator=g)
    up_mn, up_mx = torch.randn(5, generator=g), torch.randn(5, generator=g)
    grads = []
    for fn in (row_minmax, lambda t: (t.amin(1), t.amax(1))):
        xi = x.clone().requires_grad_(True)
        mn, mx = fn(xi)
        (mn * up_mn + mx * up_mx).sum().backward()
        grads.append((mn.detach(), mx.detach(), xi.grad))
    assert all(torch.equal(a, b) for a, b in zip(*grads))  # no ties: the same subgradient
    # a tie: the whole gradient lands on one of the tied elements (amax splits it), the row total is kept
    xt = torch.tensor([[1.0, 3.0, 3.0, -2.0]], requires_grad=True)
    mn, mx = row_minmax(xt)
    (2 * mx + mn).sum().backward()
    assert mx.item() == 3.0 and mn.item() == -2.0
    assert xt.grad[0, 1:3].tolist() in ([2.0, 0.0], [0.0, 2.0]) and xt.grad[0, 3].item() == 1.0
    with torch.no_grad():
        assert [t.tolist() for t in row_minmax(x)] == [x.amin(1).tolist(), x.amax(1).tolist()]
