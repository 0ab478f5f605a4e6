"""A test-only quantization method for farm's fault tests, registered by a sweep file's
``plugins: {methods: {fake: tests.farm_helpers:fake_method}}``.

It does real RTN calibration (quant.sim), plus what a test asks for in its hyper-parameters: count each
execution in a file, sleep, emit training steps, raise, or kill its own worker process once.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from types import SimpleNamespace


@dataclass(frozen=True)
class FakeConfig:
    label: str = ""
    count_file: str = ""  # one line "label pid" per execution
    sleep: float = 0.0
    steps: int = 0  # fake training steps reported through on_step
    fail: str = ""  # raise RuntimeError(fail)
    die_once: str = ""  # a marker path: the first execution creates it and SIGKILLs its own worker
    batch_size: int = 4


def apply(model, windows, config: FakeConfig | None = None, ctx=None, progress: bool = False) -> dict:
    from quant.sim import calibrate_activations, calibrate_weights

    config = config or FakeConfig()
    if config.count_file:
        with open(config.count_file, "a") as fh:
            fh.write(f"{config.label} {os.getpid()}\n")
    if config.die_once and not os.path.exists(config.die_once):
        open(config.die_once, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)
    on_step = getattr(ctx, "on_step", None)
    for i in range(config.steps):
        if on_step:
            on_step({"step": i, "epoch": 0, "loss": 1.0 / (i + 1)})
    if config.sleep:
        time.sleep(config.sleep)
    if config.fail:
        raise RuntimeError(config.fail)
    calibrate_weights(model)
    calibrate_activations(model, windows.split(config.batch_size), progress=False)
    return {"fake": True}


fake_method = SimpleNamespace(Config=FakeConfig, apply=apply, USES_ACTIVATION_STATS=False)
