"""SmoothQuant (docs/reference.md#smoothquant-start): migrate activation outliers into the weights with an
exact equivalent transformation, then RTN ranges on the smoothed model.

``pairs="original"`` smooths norm->qkv and norm->gate/up (mit-han-lab); ``"modified"`` (default, the
reference's) adds v->o and up->down. The reference initialises OmniQuant-style and MobileQuant training
from this model, and so do we.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..equiv import PAIR_SETS, apply_scale, layer_pairs, smoothquant_scale
from ..sim import decoder_layers
from ..stats import ActStats, activation_stats, collect
from . import rtn


@dataclass(frozen=True)
class SmoothQuantConfig:
    alpha: float = 0.5       # migration strength: 0 keeps activations, 1 moves everything into weights
    pairs: str = "modified"  # original | omniquant | modified
    batch_size: int = 4

    def __post_init__(self):
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"smoothquant alpha must be in [0, 1], got {self.alpha}")
        if self.pairs not in PAIR_SETS:
            raise ValueError(f"smoothquant pairs must be one of {list(PAIR_SETS)}, got {self.pairs!r}")


def stats_for(model, windows, ctx, batch_size: int) -> ActStats:
    if ctx is not None and ctx.lm is not None and ctx.calib is not None:
        return activation_stats(ctx.lm, ctx.calib, progress=ctx.progress, batch_size=batch_size)
    absmax, minmax = collect(model, windows, batch_size, progress=False)
    return ActStats(absmax, minmax, key="uncached", windows=windows.shape[0], tokens=windows.numel())


@torch.no_grad()
def smooth(model: torch.nn.Module, stats: ActStats, alpha: float, pairs: str = "modified") -> dict:
    """Apply SmoothQuant scales to every decoder layer in place; returns a summary of the scales."""
    plist = layer_pairs(model, pairs)
    worst = {p.name: 0.0 for p in plist}
    for i, layer in enumerate(decoder_layers(model)):
        for p in plist:
            s = smoothquant_scale(stats.layer(i, p.stat), layer, p, alpha)
            apply_scale(layer, p, s)
            worst[p.name] = max(worst[p.name], float(s.max() / s.min()))
    return {"pairs": [p.name for p in plist], "max_scale_spread": {k: round(v, 1) for k, v in worst.items()}}


def apply(model: torch.nn.Module, windows: torch.Tensor, config: SmoothQuantConfig | None = None, ctx=None) -> dict:
    config = config or SmoothQuantConfig()
    progress = ctx.progress if ctx else True
    stats = stats_for(model, windows, ctx, config.batch_size)
    info = smooth(model, stats, config.alpha, config.pairs)
    rtn.calibrate(model, windows, config.batch_size, progress)
    return {**info, "stats_key": stats.key}


Config = SmoothQuantConfig
