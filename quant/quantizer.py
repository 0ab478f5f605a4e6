"""The fake-quantization primitive every simulated tensor goes through.

Conventions (MobileQuant reference, `docs/reference.md#quantizer`), for ``b`` bits:

* asymmetric: ``q in [0, 2^b - 1]``, ``scale = (max - min) / (2^b - 1)``, ``offset = round(-min / scale)``;
* symmetric:  ``q in [-2^(b-1), 2^(b-1) - 1]``, ``scale = max(|min|, |max|) / (2^(b-1) - 1)``, ``offset = 0``;
* quantize-dequantize: ``x_hat = (clamp(round(x / scale) + offset, qmin, qmax) - offset) * scale``,
  round-half-to-even, straight-through gradient inside the range, zero outside.

Worked example, 8-bit asymmetric over [-1, 3]: scale = 4/255 = 0.015686, offset = round(63.75) = 64,
so x = 1.0 -> q = round(63.75) + 64 = 128 -> x_hat = 64 * 0.015686 = 1.00392.

One deliberate difference from the reference: every range is widened to contain 0 before the scale is
computed. Integer-only kernels need an exactly representable zero (padding, ReLU-free masking, the
zero point must lie in the integer range for QNN/AIMET encodings), and it keeps ``offset`` inside
``[qmin, qmax]``; ranges that straddle 0, which is nearly all of them, are unaffected.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from . import kernels

ALLOWED_BITS = (4, 8, 16)
_EPS = 1e-10


@dataclass(frozen=True)
class QSpec:
    """How one tensor is quantized: bit width, symmetry and granularity.

    ``per_channel`` means one range per output channel, i.e. per row of a ``(out, in)`` weight (axis 0).
    """

    bits: int
    symmetric: bool = False
    per_channel: bool = False

    def __post_init__(self):
        if self.bits not in ALLOWED_BITS:
            raise ValueError(f"bits must be one of {ALLOWED_BITS}, got {self.bits!r}")

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "QSpec":
        return cls(**d)


def qparams_from_minmax(mn: torch.Tensor, mx: torch.Tensor, spec: QSpec,
                        ste: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and (integer-valued, float-typed) offset for a range; shapes follow ``mn``/``mx``.

    ``ste``: round the offset with a straight-through gradient, so a learned range (LWC) gets gradients
    through both ends.
    """
    mn = torch.clamp(mn, max=0.0)
    mx = torch.clamp(mx, min=0.0)
    if spec.symmetric:
        scale = torch.maximum(-mn, mx) / spec.qmax
        scale = torch.clamp(scale, min=_EPS)
        offset = torch.zeros_like(scale)
    else:
        scale = torch.clamp((mx - mn) / (spec.qmax - spec.qmin), min=_EPS)
        offset = torch.clamp((round_ste if ste else torch.round)(-mn / scale), spec.qmin, spec.qmax)
    return scale, offset


def minmax_from_qparams(scale: torch.Tensor, offset: torch.Tensor, spec: QSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """The representable range ``[(qmin - offset) * scale, (qmax - offset) * scale]``."""
    return (spec.qmin - offset) * scale, (spec.qmax - offset) * scale


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round half to even, with the identity as its gradient."""
    return (torch.round(x) - x).detach() + x


class _FakeQuantLSQ(torch.autograd.Function):
    """Quantize-dequantize with the reference's gradients, in one node instead of eight.

    For ``u = clamp(round(x/s) + o) - o`` and ``y = u * s``: inside the range dy/dx = 1 (straight-through),
    dy/ds = u - x/s, dy/do = 0; outside it dy/dx = 0, dy/ds = u, dy/do = -s. Saving two float
    tensors (the mask and ``d``) instead of the composite graph's intermediates roughly halves a training
    step's fake-quant cost, which dominates the step (about 20 sites per decoder layer). On the CPU the
    node runs the fused loops of ``quant.kernels`` instead (one pass each way, only ``x`` saved); this
    torch path serves other devices and dtypes.
    """

    @staticmethod
    def forward(ctx, x, scale, offset, qmin, qmax):
        ctx.shapes = (scale.shape, offset.shape)
        ctx.need = tuple(ctx.needs_input_grad[:3])
        if kernels.usable(x, scale):
            # one pass; backward recomputes the mask and residual from x (quant.kernels)
            ctx.save_for_backward(x, scale, offset)
            ctx.fused = (qmin, qmax)
            return kernels.forward(x, scale, offset, qmin, qmax)
        ctx.fused = None
        z = x / scale
        q = torch.round(z).add_(offset)
        u = q.clamp(qmin, qmax)
        # The mask is kept as 0./1. floats, not bools: on CPU a bool comparison, a multiply by a bool and
        # torch.where each cost 2-5x a float pass, and this node runs ~20 times per layer per step.
        inside = torch.eq(u, q, out=torch.empty_like(u))
        u.sub_(offset)
        y = u * scale
        d = torch.addcmul(u, z, inside, value=-1) if ctx.need[1] else None  # u - z inside, u outside
        ctx.save_for_backward(inside, d, scale)
        return y

    @staticmethod
    def backward(ctx, g):
        need_x, need_s, need_o = ctx.need
        if ctx.fused is not None:
            x, scale, offset = ctx.saved_tensors
            gx, gs, go = kernels.backward(x, g, scale, offset, *ctx.fused)
            return ((gx if need_x else None), (gs.reshape(ctx.shapes[0]) if need_s else None),
                    (go.reshape(ctx.shapes[1]) if need_o else None), None, None)
        inside, d, scale = ctx.saved_tensors
        gx = g * inside if (need_x or need_o) else None
        gs = go = None
        if need_s:
            # per-tensor: a dot product reads g and d once instead of writing g * d and summing it
            gs = (torch.dot(g.reshape(-1), d.reshape(-1)).reshape(ctx.shapes[0]) if ctx.shapes[0].numel() == 1
                  else _sum_to(g * d, ctx.shapes[0]))
        if need_o:
            go = (_sum_to(gx, ctx.shapes[1]) - _sum_to(g, ctx.shapes[1])) * scale
        return (gx if need_x else None), gs, go, None, None


def _sum_to(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Reduce a broadcast result back to a parameter's shape (same rank, or a single element)."""
    if t.shape == shape:
        return t
    if shape.numel() == 1:
        return t.sum().reshape(shape)
    return t.sum(dim=[i for i, n in enumerate(shape) if n == 1], keepdim=True)


class _RowMinMax(torch.autograd.Function):
    """Per-row min and max whose gradient goes to one arg-min and one arg-max element per row.

    ``amin``/``amax`` share the gradient among tied elements, which costs a comparison, a copy and a
    multiply over the whole weight in every LWC step (8% of a CPU training step); here backward is one
    zero fill and two scatters. Ties, which are rare in trained float weights, get the whole gradient
    at one of them: another subgradient of the same function.
    """

    @staticmethod
    def forward(ctx, x):
        if kernels.minmax_usable(x):  # one pass over the weight instead of two
            mn, imn, mx, imx = (t.unsqueeze(1) for t in kernels.row_minmax(x))
        else:
            mn, imn = x.min(dim=1, keepdim=True)
            mx, imx = x.max(dim=1, keepdim=True)
        ctx.save_for_backward(imn, imx)
        ctx.shape = x.shape
        return mn.squeeze(1), mx.squeeze(1)

    @staticmethod
    def backward(ctx, gmn, gmx):
        imn, imx = ctx.saved_tensors
        g = torch.zeros(ctx.shape, dtype=gmn.dtype, device=gmn.device)
        g.scatter_add_(1, imn, gmn.unsqueeze(1))
        g.scatter_add_(1, imx, gmx.unsqueeze(1))
        return g


def row_minmax(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x.amin(1), x.amax(1))`` of a 2-D tensor, with a cheap backward (:class:`_RowMinMax`)."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _RowMinMax.apply(x)
    return x.amin(1), x.amax(1)


def fake_quant(x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, spec: QSpec, axis: int = 0,
               inplace: bool = False) -> torch.Tensor:
    """Quantize-dequantize ``x``; per-channel ``scale``/``offset`` run along ``axis``.

    With autograd: straight-through for ``x`` inside the range, LSQ-style gradients for ``scale`` and
    ``offset`` (the reference's), fused in :class:`_FakeQuantLSQ`. Without: one temporary and in-place
    ops, about 3x faster than ATen's fused fake-quant kernel on CPU, which matters because the simulator
    calls this ~20 times per layer. ``inplace`` (no-autograd path only) overwrites ``x``: for fresh
    temporaries such as matmul outputs.
    """
    if scale.numel() > 1:
        shape = [1] * x.dim()
        shape[axis] = -1
        scale, offset = scale.reshape(shape), offset.reshape(shape)
    if torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad or offset.requires_grad):
        return _FakeQuantLSQ.apply(x, scale, offset, spec.qmin, spec.qmax)
    if kernels.usable(x, scale):
        return kernels.forward(x, scale, offset, spec.qmin, spec.qmax,
                               out=x if inplace and x.is_contiguous() else None)
    y = x.div_(scale) if inplace else torch.div(x, scale)
    y.round_().add_(offset).clamp_(spec.qmin, spec.qmax).sub_(offset).mul_(scale)
    return y


def fake_quant_reference(x, scale, offset, spec: QSpec, axis: int = 0) -> torch.Tensor:
    """The reference's composite formula (``round_ste`` then clamp); the fused path is tested against it."""
    if scale.numel() > 1:
        shape = [1] * x.dim()
        shape[axis] = -1
        scale, offset = scale.reshape(shape), offset.reshape(shape)
    q = torch.clamp(round_ste(x / scale) + offset, spec.qmin, spec.qmax)
    return (q - offset) * scale


def quantize_int(x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, spec: QSpec) -> torch.Tensor:
    """The integer codes ``clamp(round(x / scale) + offset)`` (for export and for checking by hand)."""
    shape = (-1,) + (1,) * (x.dim() - 1) if scale.numel() > 1 else ()
    s, o = scale.reshape(shape), offset.reshape(shape)
    return torch.clamp(torch.round(x / s) + o, spec.qmin, spec.qmax)


class Quantizer(nn.Module):
    """One quantization site of the simulated graph.

    States: *off* (``spec is None`` or ``enabled`` False: identity), *observing* (identity that records
    the running min/max, to calibrate static ranges), *quantizing* (fake-quantize with the stored
    ``scale``/``offset``). Buffers are non-persistent so the host model's ``state_dict`` stays the plain
    float checkpoint; encodings travel separately (``quant.artifact``).
    """

    def __init__(self, spec: QSpec | None, name: str = "", role: str | None = None):
        super().__init__()
        self.spec = spec
        self.name = name
        self.role = role  # the scheme role this site plays (quant.scheme.ROLES); None for ad-hoc quantizers
        self.enabled = spec is not None
        self.observing = False
        self.generation = 0  # bumped whenever scale/offset are replaced: caches of quantized weights key on it
        self.lwc_up = self.lwc_low = None  # learnable weight clipping factors (training only)
        self.register_buffer("scale", None, persistent=False)
        self.register_buffer("offset", None, persistent=False)
        self.register_buffer("obs_min", None, persistent=False)
        self.register_buffer("obs_max", None, persistent=False)

    @property
    def active(self) -> bool:
        return self.spec is not None and self.enabled and not self.observing

    @property
    def calibrated(self) -> bool:
        return self.scale is not None or self.lwc_up is not None

    @property
    def learning(self) -> bool:
        """True while LWC or learnable ranges are attached: outputs then depend on trainable tensors."""
        return self.lwc_up is not None or isinstance(self.scale, nn.Parameter)

    # -- learnable weight clipping (OmniQuant LWC, docs/reference.md#block-wise-baselines) --
    def enable_lwc(self, channels: int, init: float = 4.0, device=None) -> list[nn.Parameter]:
        """Clip the weight range to ``[sigmoid(low) * min, sigmoid(up) * max]``, recomputed from the current
        weight on every call; one factor pair per output channel when per-channel, else one scalar pair."""
        n = channels if self.spec.per_channel else 1
        self.lwc_up = nn.Parameter(torch.full((n,), float(init), device=device))
        self.lwc_low = nn.Parameter(torch.full((n,), float(init), device=device))
        return [self.lwc_up, self.lwc_low]

    def lwc_bounds(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The clipped (min, max) of ``w`` under the current LWC factors (differentiable)."""
        flat = w.reshape(w.shape[0], -1) if self.spec.per_channel else w.reshape(1, -1)
        mn, mx = row_minmax(flat)
        return torch.sigmoid(self.lwc_low) * mn, torch.sigmoid(self.lwc_up) * mx

    def disable_lwc(self) -> None:
        self.lwc_up = self.lwc_low = None

    # -- learnable activation ranges (MobileQuant LRL, docs/reference.md#mobilequant-end-to-end) --
    def make_ranges_learnable(self) -> list[nn.Parameter]:
        """Turn the static ``scale``/``offset`` into parameters (the offset trains as a continuous value)."""
        if self.scale is None:
            raise RuntimeError(f"quantizer {self.name!r} has no range to learn: calibrate first")
        s, o = self.scale.detach().clone(), self.offset.detach().clone()
        del self.scale, self.offset
        self.scale, self.offset = nn.Parameter(s), nn.Parameter(o)
        return [self.scale, self.offset]

    def freeze_ranges(self) -> None:
        """Back to static buffers; the offset is rounded to the integer zero point a device uses."""
        s, o = self.scale.detach().clone(), self.offset.detach().clone()
        del self.scale, self.offset
        self.register_buffer("scale", None, persistent=False)
        self.register_buffer("offset", None, persistent=False)
        self.set_qparams(torch.clamp(s, min=_EPS), torch.clamp(torch.round(o), self.spec.qmin, self.spec.qmax))

    def extra_repr(self) -> str:
        return f"{self.name}: {self.spec}" if self.spec else f"{self.name}: off"

    def _reduce(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.spec.per_channel:
            flat = x.detach().reshape(x.shape[0], -1)
            return flat.amin(dim=1), flat.amax(dim=1)
        x = x.detach()
        return x.amin().reshape(1), x.amax().reshape(1)

    def observe(self, x: torch.Tensor) -> None:
        mn, mx = self._reduce(x)
        if self.obs_min is None:
            self.obs_min, self.obs_max = mn.clone(), mx.clone()
        else:
            self.obs_min = torch.minimum(self.obs_min, mn)
            self.obs_max = torch.maximum(self.obs_max, mx)

    def set_range(self, mn: torch.Tensor, mx: torch.Tensor) -> None:
        scale, offset = qparams_from_minmax(mn.float(), mx.float(), self.spec)
        self.set_qparams(scale, offset)

    def set_qparams(self, scale: torch.Tensor, offset: torch.Tensor) -> None:
        if not torch.isfinite(scale).all() or not torch.isfinite(offset).all():
            raise ValueError(f"quantizer {self.name!r}: non-finite scale or offset")
        self.scale = scale.detach().float().clone()
        self.offset = offset.detach().float().clone()
        self.generation += 1

    def finish_observing(self) -> None:
        """Turn the observed running min/max into static ``scale``/``offset``."""
        if self.spec is None:
            return
        if self.obs_min is None:
            raise RuntimeError(f"quantizer {self.name!r} saw no data during calibration")
        self.set_range(self.obs_min, self.obs_max)
        self.obs_min = self.obs_max = None
        self.observing = False

    def forward(self, x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        """``inplace``: ``x`` is a temporary the caller no longer needs (saves an allocation without autograd)."""
        if self.spec is None or not self.enabled:
            return x
        if self.observing:
            self.observe(x)
            return x
        if self.lwc_up is not None:
            mn, mx = self.lwc_bounds(x)
            scale, offset = qparams_from_minmax(mn, mx, self.spec, ste=True)
            return fake_quant(x, scale, offset, self.spec)
        if self.scale is None:
            raise RuntimeError(f"quantizer {self.name!r} is enabled but has no range: calibrate the model first")
        return fake_quant(x, self.scale, self.offset, self.spec, inplace=inplace)
