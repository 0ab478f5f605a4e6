"""RTN: round-to-nearest with min/max ranges (weights from the weights, activations from calibration)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..sim import calibrate_activations, calibrate_weights


@dataclass(frozen=True)
class RTNConfig:
    batch_size: int = 4  # calibration forward batch


def calibrate(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 4, progress: bool = True) -> None:
    calibrate_weights(model)
    calibrate_activations(model, windows.split(batch_size), progress=progress)


def apply(model: torch.nn.Module, windows: torch.Tensor, config: RTNConfig | None = None, ctx=None) -> dict:
    config = config or RTNConfig()
    calibrate(model, windows, config.batch_size, progress=ctx.progress if ctx else True)
    return {}


Config = RTNConfig
