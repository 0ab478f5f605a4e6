"""Shared stages: work that many trials of a grid need with the same inputs, run once per key before
those trials start, and cached on disk (``farm.core.cache``) so a re-run or a later sweep reuses it.

A stage is ``Stage(name, inputs(config) -> dict | None, run(inputs, workdir) -> dict)``: ``inputs`` says
whether a trial needs the stage and with what key (None: not needed); ``run`` does the work inside a
cache entry's work folder and returns the summary stored in ``meta.json``. New shared stages (a device
compile, a teacher's logits) are one more entry in ``STAGES``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..core.layout import DataLayout
from ..core.ids import FLOAT_METHOD, config_hash

@dataclass(frozen=True)
class Stage:
    name: str
    inputs: Callable[[dict], dict | None]
    run: Callable[[dict, Path], dict]

    def key(self, inputs: dict) -> str:
        return config_hash({"stage": self.name, **inputs})


def _calib_inputs(config: dict) -> dict | None:
    if config["method"] == FLOAT_METHOD or not config.get("calib"):
        return None
    return {"model": config["model"], **config["calib"]}


def _run_calib(inputs: dict, workdir: Path) -> dict:
    """The calibration windows (also warms quant's token cache for the corpus and tokenizer)."""
    import torch
    from transformers import AutoTokenizer

    from quant import data, zoo

    src, add_bos = zoo.resolve(inputs["model"])
    tok = AutoTokenizer.from_pretrained(src)
    windows = data.calibration_windows(tok, inputs["samples"], inputs["seqlen"], inputs["seed"],
                                       inputs["corpus"], add_bos=add_bos)
    torch.save(windows, workdir / "windows.pt")
    digest = hashlib.sha256(windows.numpy().tobytes()).hexdigest()[:16]
    return {"windows": int(windows.shape[0]), "tokens": int(windows.numel()), "sha256": digest,
            "corpus_id": data.corpus_id(inputs["corpus"])}


def _stats_inputs(config: dict) -> dict | None:
    """Methods whose start is SmoothQuant read activation statistics of the float model: computed once per
    model and calibration for all of them (quant.methods says which methods do)."""
    from quant import methods, stats

    if config["method"] == FLOAT_METHOD or not config.get("calib") \
            or not methods.uses_activation_stats(config["method"]):
        return None
    out = {"model": config["model"], "layers": config["layers"], **config["calib"], "version": stats.STATS_VERSION}
    if config.get("rotate"):  # the statistics of the rotated model, the one the trial smooths
        out["rotate"] = config["rotate"]
    return out


def _run_stats(inputs: dict, workdir: Path) -> dict:
    """Activation statistics of the float model; quant.stats caches them, trials then read that cache."""
    from quant import CalibConfig, load_model, rotation
    from quant.stats import activation_stats

    lm = load_model(inputs["model"], num_layers=inputs["layers"])
    if inputs.get("rotate"):  # quant.stats keys on the weights, so this is the entry the trial then reads
        rotation.rotate(lm.model, rotation.config_of(inputs["rotate"]))
    calib = CalibConfig(inputs["samples"], inputs["seqlen"], inputs["seed"], inputs["corpus"])
    st = activation_stats(lm, calib, progress=False)
    return {"quant_stats_key": st.key, "windows": st.windows, "tokens": st.tokens}


STAGES: dict[str, Stage] = {
    "calib_tokens": Stage("calib_tokens", _calib_inputs, _run_calib),
    "activation_stats": Stage("activation_stats", _stats_inputs, _run_stats),
}


def plan(config: dict) -> list[tuple[str, str, dict]]:
    """The shared stages a trial needs: (stage name, key, inputs), in order."""
    out = []
    for stage in STAGES.values():
        inputs = stage.inputs(config)
        if inputs is not None:
            out.append((stage.name, stage.key(inputs), inputs))
    return out


def run_stage(name: str, key: str, inputs: dict, data_dir: str | Path) -> dict:
    """Compute a shared stage unless its cache entry exists (the lock makes racing callers wait)."""
    cache = DataLayout(data_dir).stage_cache()
    with cache.entry(name, key) as e:
        if e.hit:
            return {**e.meta(), "hit": True}
        import time

        t0 = time.time()
        summary = STAGES[name].run(inputs, e.workdir())
        return {**e.commit(inputs, summary=summary, seconds=round(time.time() - t0, 3)), "hit": False}
