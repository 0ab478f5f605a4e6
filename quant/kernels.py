"""Fused CPU kernels for fake quantization and the LET reparametrisation, compiled with numba: one pass
where torch needs several.

Fake quantization is element-wise and memory-bound, and the simulator runs it about 20 times per decoder
layer. As torch operations each step is its own pass over the tensor (divide, round, add, clamp, compare,
subtract, multiply, and in training a mask and a residual kept for backward), and the fused autograd node
in ``quant.quantizer`` still spent 40% of a CPU training step there. These loops do the forward in one
read and one write, and the backward in one pass that recomputes what it needs from the saved input
(reading ``x`` and ``g``, writing ``grad_x``, accumulating the scale and offset gradients), so nothing
but the input is kept between the two.

The arithmetic is the torch path's, operation for operation in float32 (``x / scale`` in training, ``x *
(1 / scale)`` without gradients, round half to even), so outputs and input gradients are bit-identical
to it; the scale and offset gradients differ only in summation order.

A tensor is seen as rows: ``scale[r // rows_per_scale]`` applies to row ``r``. Per-tensor: any row
split and ``rows_per_scale`` = rows; per-channel along axis 0: one row per channel.

The LET loops compute a frozen weight's effective value ``(w * col) / row[:, None]`` (bit-identical to
those two torch operations) and, backward, both scale gradients in one pass over ``w`` and ``g``.

``MQFARM_KERNELS=torch`` (or ``kernels.ENABLED = False``) uses the torch path instead.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np
import torch

ENABLED = os.environ.get("MQFARM_KERNELS", "numba").strip().lower() != "torch"
_K = None


def _compile():
    """Compiled on first use (numba caches the machine code beside this file)."""
    from numba import njit

    jit = njit(cache=True, nogil=True, boundscheck=False)
    # reassociation only lets the row sums vectorise; every per-element float32 result keeps its order
    jit_sum = njit(cache=True, nogil=True, boundscheck=False, fastmath={"reassoc", "nsz"})

    @jit
    def forward_div(x, s, o, per, qmin, qmax, y):
        rows, cols = x.shape
        for r in range(rows):
            sr, orr = s[r // per], o[r // per]
            for c in range(cols):
                u = min(max(np.rint(x[r, c] / sr) + orr, qmin), qmax)
                y[r, c] = (u - orr) * sr

    @jit
    def forward_mul(x, inv, s, o, per, qmin, qmax, y):
        rows, cols = x.shape
        for r in range(rows):
            ir, sr, orr = inv[r // per], s[r // per], o[r // per]
            for c in range(cols):
                u = min(max(np.rint(x[r, c] * ir) + orr, qmin), qmax)
                y[r, c] = (u - orr) * sr

    @jit_sum
    def backward(x, g, s, o, per, qmin, qmax, gx, gs_rows, gout_rows):
        # inside the range: d/dx = 1, d/ds = u - x/s; outside: d/dx = 0, d/ds = u, d/do = -s (summed per row;
        # the caller multiplies the offset's sum by -s)
        # float32 sums within a row (rows are at most a few thousand elements, see as_rows), float64 across
        # rows: 2.3x faster than float64 sums throughout, which do not vectorise as well
        rows, cols = x.shape
        one, zero = np.float32(1.0), np.float32(0.0)
        for r in range(rows):
            sr, orr = s[r // per], o[r // per]
            acc_s = zero
            acc_o = zero
            for c in range(cols):
                z = x[r, c] / sr
                q = np.rint(z) + orr
                u = min(max(q, qmin), qmax)
                gg = g[r, c]
                gm = gg * (one if u == q else zero)
                gx[r, c] = gm
                acc_s += gg * (u - orr) - gm * z
                acc_o += gg - gm
            gs_rows[r] = acc_s
            gout_rows[r] = acc_o

    @jit
    def let_forward(w, col, row, y):
        rows, cols = w.shape
        for r in range(rows):
            rr = row[r]
            for c in range(cols):
                y[r, c] = (w[r, c] * col[c]) / rr

    @jit_sum
    def let_backward(w, g, col, row, gcol, grow):
        # y = (w * col) / row: dy/dcol = w / row, dy/drow = -(w * col) / row^2, summed over rows and columns
        rows, cols = w.shape
        zero = np.float32(0.0)
        for r in range(rows):
            rr = row[r]
            acc = zero
            for c in range(cols):
                gg = g[r, c]
                acc += gg * (w[r, c] * col[c])
                gcol[c] += (gg / rr) * w[r, c]
            grow[r] = -acc / (rr * rr)

    @jit
    def row_minmax(x, mn, imn, mx, imx):
        rows, cols = x.shape
        for r in range(rows):
            lo, hi, ilo, ihi = x[r, 0], x[r, 0], 0, 0
            for c in range(1, cols):
                v = x[r, c]
                if v < lo:
                    lo, ilo = v, c
                if v > hi:
                    hi, ihi = v, c
            mn[r], imn[r], mx[r], imx[r] = lo, ilo, hi, ihi

    return SimpleNamespace(forward_div=forward_div, forward_mul=forward_mul, backward=backward,
                           let_forward=let_forward, let_backward=let_backward, row_minmax=row_minmax)


def _kernels():
    global _K
    if _K is None:
        _K = _compile()
    return _K


def usable(x: torch.Tensor, scale: torch.Tensor) -> bool:
    """Float32 tensors on the CPU (the loops read their memory directly), one scale or one per index of
    axis 0."""
    n = scale.numel()
    return (ENABLED and x.device.type == "cpu" and x.dtype == torch.float32 and scale.dtype == torch.float32
            and (n == 1 or (x.dim() > 0 and x.shape[0] == n == scale.shape[0])))


def as_rows(x: torch.Tensor, n_scales: int) -> tuple[torch.Tensor, int]:
    """A contiguous 2-D view of ``x`` and how many rows share one scale."""
    x = x.contiguous()
    if n_scales > 1:  # per-channel along axis 0
        return x.reshape(n_scales, -1), 1
    n = x.numel()
    # any split works for one scale: rows long enough for the loops to run at speed, short enough for
    # float32 row sums to stay accurate
    width = next((w for w in (2048, 1024, 512, 256) if n % w == 0), x.shape[-1] if x.dim() else 1)
    rows = x.reshape(-1, width)
    return rows, rows.shape[0]


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy()


def _vec(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().reshape(-1).numpy(), dtype=np.float32)


def forward(x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, qmin: int, qmax: int,
            reciprocal: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize-dequantize ``x`` (shape kept); ``reciprocal``: multiply by ``1 / scale`` as the no-grad
    torch path does; ``out`` may be ``x`` itself when ``x`` is contiguous."""
    rows, per = as_rows(x, scale.numel())
    y = torch.empty_like(rows) if out is None else out.view(rows.shape)
    k = _kernels()
    s, o = _vec(scale), _vec(offset)
    lo, hi = np.float32(qmin), np.float32(qmax)
    if reciprocal:
        k.forward_mul(_np(rows), _vec(1.0 / scale), s, o, per, lo, hi, _np(y))
    else:
        k.forward_div(_np(rows), s, o, per, lo, hi, _np(y))
    return y.view(x.shape)


def backward(x: torch.Tensor, g: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, qmin: int, qmax: int):
    """``(grad_x, grad_scale, grad_offset)``; the last two as flat float32 vectors of ``scale.numel()``."""
    n = scale.numel()
    rows, per = as_rows(x, n)
    grows = g.contiguous().view(rows.shape)
    gx = torch.empty_like(rows)
    gs_rows = np.empty(rows.shape[0], np.float64)
    gout_rows = np.empty(rows.shape[0], np.float64)
    s, o = _vec(scale), _vec(offset)
    _kernels().backward(_np(rows), _np(grows), s, o, per, np.float32(qmin), np.float32(qmax), _np(gx), gs_rows, gout_rows)
    gs = gs_rows.reshape(n, -1).sum(1)
    go = -gout_rows.reshape(n, -1).sum(1) * s.astype(np.float64)
    return gx.view(x.shape), torch.from_numpy(gs.astype(np.float32)), torch.from_numpy(go.astype(np.float32))


MINMAX = True  # the fused row min/max (bench/step_overhead.py --ablate minmax times it against torch's)


def minmax_usable(x: torch.Tensor) -> bool:
    return (ENABLED and MINMAX and x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 2
            and x.shape[1] > 0)


def row_minmax(x: torch.Tensor):
    """Per-row ``(min, argmin, max, argmax)`` of a 2-D float32 tensor in one pass (torch needs one pass
    each for min and max). Ties resolve to the first index, like torch; a row holding NaN is not
    propagated as torch would, but weights and their LET products are finite (training stops on a NaN
    loss before a NaN could reach them)."""
    xc = x.detach().contiguous()
    r = xc.shape[0]
    mn, mx = torch.empty(r, dtype=torch.float32), torch.empty(r, dtype=torch.float32)
    imn, imx = torch.empty(r, dtype=torch.int64), torch.empty(r, dtype=torch.int64)
    _kernels().row_minmax(_np(xc), _np(mn), _np(imn), _np(mx), _np(imx))
    return mn, imn, mx, imx


def let_usable(w: torch.Tensor, col: torch.Tensor | None, row: torch.Tensor | None) -> bool:
    """A frozen 2-D float32 CPU weight scaled per column and per row by float32 vectors."""
    return (ENABLED and w.device.type == "cpu" and w.dtype == torch.float32 and w.dim() == 2
            and not w.requires_grad
            and all(v is None or (v.dtype == torch.float32 and v.device.type == "cpu" and v.dim() == 1)
                    for v in (col, row)))


def let_forward(w: torch.Tensor, col: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
    """``(w * col) / row[:, None]`` in one pass, bit-identical to those two torch operations."""
    wc = w.contiguous()
    y = torch.empty_like(wc)
    _kernels().let_forward(_np(wc), _vec(col), _vec(row), _np(y))
    return y


def let_backward(w: torch.Tensor, g: torch.Tensor, col: torch.Tensor, row: torch.Tensor):
    """``(grad_col, grad_row)`` of ``let_forward`` in one pass over ``w`` and ``g``."""
    gcol = np.zeros(w.shape[1], np.float32)
    grow = np.empty(w.shape[0], np.float32)
    _kernels().let_backward(_np(w.contiguous()), _np(g.contiguous()), _vec(col), _vec(row), gcol, grow)
    return torch.from_numpy(gcol), torch.from_numpy(grow)
