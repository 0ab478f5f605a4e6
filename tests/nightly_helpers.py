"""A test-only method and exporter for the nightly tests (tests/test_nightly.py): a candidate that is really
less accurate, or really slower, through its model.

``nightly_method`` is RTN (quant.sim's weight and static activation ranges) after an optional change to the
model: ``noise`` adds seeded Gaussian noise of that relative size to every decoder-layer weight matrix (a
less accurate model: its perplexity rises); ``wide`` marks the artifact so that ``nightly_exporter`` writes
the wide tiny export (hidden 512, vocabulary 4096: several times more work per token) instead of the
narrow one. Both are hyper-parameters, so they change the trial id but not the suite's slot
(model/layers/scheme/method), exactly as a code change would.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace


@dataclass(frozen=True)
class NightlyConfig:
    noise: float = 0.0  # relative std of the noise added to each decoder weight matrix
    wide: bool = False  # export the wide tiny graph (see nightly_exporter)
    batch_size: int = 4


def apply(model, windows, config: NightlyConfig | None = None, ctx=None, progress: bool = False) -> dict:
    import torch

    from quant.sim import calibrate_activations, calibrate_weights

    config = config or NightlyConfig()
    if config.noise:
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".layers." in f".{name}" and p.ndim == 2:
                    p.add_(torch.randn(p.shape, generator=gen) * (config.noise * float(p.std())))
    calibrate_weights(model)
    calibrate_activations(model, windows.split(config.batch_size), progress=False)
    return {"noise": config.noise, "wide": config.wide}


nightly_method = SimpleNamespace(Config=NightlyConfig, apply=apply, USES_ACTIVATION_STATS=False)


def nightly_exporter(source, out_dir: Path, prefill: int, ctx: int) -> Path:
    """The device stage's export step (``farm.orchestrate.sweep.Options.exporter``): the tiny QDQ export, wide
    when the artifact's recipe says ``wide``; ``source`` is an artifact folder, or the float model (a dict,
    farm.work.device_job.float_source), which is narrow. Weights are seeded, so two narrow exports are the
    same graph."""
    from tests.devicelab_fixtures import make_tiny_export

    wide = False
    if not isinstance(source, dict):
        recipe = json.loads((Path(source) / "recipe.json").read_text())
        wide = bool((recipe.get("method_config") or {}).get("wide"))
    return make_tiny_export(Path(out_dir), slow=wide)
