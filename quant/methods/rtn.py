"""RTN: round-to-nearest with min/max ranges (weights from the weights, activations from calibration)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..sim import calibrate_activations, calibrate_weights


@dataclass(frozen=True)
class RTNConfig:
    batch_size: int = 4  # calibration forward batch


def apply(model: torch.nn.Module, calib: torch.Tensor, config: RTNConfig | None = None,
          progress: bool = True) -> dict:
    config = config or RTNConfig()
    calibrate_weights(model)
    calibrate_activations(model, calib.split(config.batch_size), progress=progress)
    return {}


Config = RTNConfig
