"""MobileQuant end to end (docs/reference.md#mobilequant-end-to-end): LET + LWC + learnable activation
ranges trained jointly across the whole decoder stack from the SmoothQuant model, on the MSE of the last decoder hidden state.

Fixes relative to the reference: training checkpoints are resumable (optimizer and schedule included)
and refuse a changed configuration; a NaN or exploding loss stops with a message instead of writing a
broken model; ``epochs=0`` works (it is the SmoothQuant+RTN model); learned offsets are rounded to
integer zero points at the end, so the evaluated model is the one a device runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..train import E2ETrainer, TrainConfig
from . import omniquant


@dataclass(frozen=True)
class MobileQuantConfig(TrainConfig):
    lrl: bool = True
    lrl_relative: bool = True       # --lrl-relative false --lrl-lr 1e-6 --lrl-min-lr 1e-7: the reference
    lrl_lr: float = 1e-3
    lrl_min_lr: float = 1e-4
    # hidden | normed | logits | hidden+logits. normed: MSE after the model's final (float) norm, i.e. on what
    # the LM head reads; logits: KL to the float model's logits
    loss: str = "hidden"
    kd_weight: float = 1.0          # weight of the logits term in hidden+logits
    kd_temperature: float = 1.0
    checkpoint_dir: str | None = None  # resumable training state, one file per epoch (atomic)
    ram_budget_gb: float = 4.0      # float targets above this go to a memory-mapped file in checkpoint_dir
                                    # (on a GPU it budgets GPU memory; mapped targets move a batch at a time)

    def check(self) -> None:
        super().check()
        if self.loss not in ("hidden", "normed", "logits", "hidden+logits"):
            raise ValueError(f"mobilequant loss must be hidden, normed, logits or hidden+logits, got {self.loss!r}")


def apply(model: torch.nn.Module, windows: torch.Tensor, config: MobileQuantConfig | None = None, ctx=None) -> dict:
    config = config or MobileQuantConfig()
    config.check()
    init = omniquant.initialise(model, windows, config, ctx)
    identity = {"calibration": vars(ctx.calib) if ctx is not None and ctx.calib is not None else None}
    info = E2ETrainer(model, windows, config, ctx, identity).run()
    return {"smoothquant": init, **info}


Config = MobileQuantConfig
