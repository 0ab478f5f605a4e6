"""OmniQuant-style block-wise baseline (docs/reference.md#block-wise-baselines) and its "LRL block-wise" ablation.

``omniquant``: LET + LWC per decoder layer, activation ranges fixed at their min/max calibration values.
``lrl-block``: the same routine that also learns every activation range (MobileQuant's three components
trained block-wise; the paper's block-wise vs end-to-end ablation). Both start from SmoothQuant.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import torch

from ..train import TrainConfig, train_blockwise
from . import smoothquant


@dataclass(frozen=True)
class OmniQuantConfig(TrainConfig):
    """Reference OmniQuant W8A8 settings are 128 samples x 20 epochs at seqlen 2048; the default here is
    CPU-sized (2 epochs). LET lr is constant 1e-3 and LWC 1e-2 in the reference's TinyLlama W8A8 script."""

    let_min_lr: float = 1e-3
    lwc_min_lr: float = 1e-2
    # a layer whose loss diverges starts over at half the learning rates, up to this many times, before
    # the run stops (0: stop at once, as the reference does)
    layer_retries: int = 0

    ID_NEUTRAL: ClassVar[dict] = {**TrainConfig.ID_NEUTRAL, "layer_retries": 0}

    def check(self) -> None:
        super().check()
        if not (isinstance(self.layer_retries, int) and self.layer_retries >= 0):
            raise ValueError(f"layer_retries must be an integer >= 0, got {self.layer_retries!r}")


def default_config(name: str) -> OmniQuantConfig:
    if name == "lrl-block":  # the reference's lrl_*.sh (TinyLlama W8A8)
        return OmniQuantConfig(lrl=True, lrl_relative=True, lrl_lr=1e-3, lrl_min_lr=1e-4)
    return OmniQuantConfig()


def initialise(model: torch.nn.Module, windows: torch.Tensor, cfg: TrainConfig, ctx) -> dict:
    """The shared start of every learned method: SmoothQuant smoothing plus RTN ranges."""
    sq = smoothquant.SmoothQuantConfig(alpha=cfg.alpha, pairs=cfg.pairs, batch_size=cfg.calib_batch_size)
    return smoothquant.apply(model, windows, sq, ctx)


def apply(model: torch.nn.Module, windows: torch.Tensor, config: OmniQuantConfig | None = None, ctx=None) -> dict:
    config = config or default_config(ctx.name if ctx else "omniquant")
    if ctx is not None and ctx.name == "lrl-block" and not config.lrl:
        config = replace(config, lrl=True)
    init = initialise(model, windows, config, ctx)
    info = train_blockwise(model, windows, config, ctx)
    return {"smoothquant": init, **info}


Config = OmniQuantConfig
