"""One trial, as it runs on a worker: load the model, quantize (a stage cached by content), evaluate, and
return everything the driver logs to MLflow. Nothing here talks to MLflow or schedules anything, so a
trial also runs in-process (tests, debugging): ``execute_trial(id, config, data_dir)``.

Events (``started`` and one ``step`` per optimizer step of training methods) go to ``emit(kind, payload)``,
which the scheduler wires to the driver so losses reach MLflow while the trial still trains.
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
from pathlib import Path
from typing import Callable

from ..core.layout import DataLayout
from ..core.ids import FLOAT_METHOD, quant_key
from ..core.methods import build_method_config, harness_module, register_plugins
from ..core.node import node_info


def check_numerics(config: dict) -> None:
    """Refuse a trial whose id was made for other arithmetic than this worker's quant (a cluster node that
    runs another version of the code): its numbers would be recorded under the wrong identity."""
    from quant import numerics

    want = config.get("numerics")
    if want != numerics.NUMERICS_VERSION:
        raise RuntimeError(f"this trial was expanded for numerics version {want} but the quant package on "
                           f"{socket.gethostname()} is version {numerics.NUMERICS_VERSION}: run the same code "
                           "on the driver and every node")


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=str))


def _step_record(d: dict) -> dict | None:
    rec = {}
    for k, v in d.items():
        if isinstance(v, bool):
            continue
        if isinstance(v, (int, float)) and math.isfinite(v):
            rec[k] = v
        elif hasattr(v, "item"):
            try:
                rec[k] = float(v.item())
            except (TypeError, ValueError, RuntimeError):
                pass
    return rec if "step" in rec else None


def _quantize(config: dict, device: str, on_step: Callable | None):
    from quant import CalibConfig, load_model, quantize

    lm = load_model(config["model"], num_layers=config["layers"], device=device)
    t_load = time.time()
    if config["method"] == FLOAT_METHOD:
        res = quantize(lm, scheme=config["scheme"], progress=False)
        return lm, res.recipe, t_load
    c = config["calib"]
    calib = CalibConfig(c["samples"], c["seqlen"], c["seed"], c["corpus"])
    mcfg = build_method_config(config["method"], config["method_config"])
    # a rotated trial's config carries {"kind", "seed"}; unrotated ones have no key (None: no rotation)
    res = quantize(lm, scheme=config["scheme"], method=config["method"], calib=calib, method_config=mcfg,
                   progress=False, on_step=on_step, rotate=config.get("rotate"))
    return lm, res.recipe, t_load


def _evaluate(lm, config: dict) -> tuple[dict, dict]:
    from quant import evaluate_perplexity

    metrics, details = {}, {}
    ev = config["eval"]
    if ev.get("perplexity"):
        p = ev["perplexity"]
        r = evaluate_perplexity(lm, p["seqlen"], p["corpus"], p["limit"], p["batch_size"], progress=False,
                                split=p.get("split", "test"))  # absent: the default, kept out of the id
        metrics[r.metric_name] = r.ppl
        metrics["eval/nll"] = r.nll
        metrics["eval/tokens_per_s"] = r.tokens_per_s
        details["perplexity"] = r.to_dict()
    if ev.get("suite"):
        harness = harness_module()
        out = harness.run_suite(lm, list(ev["suite"]), limit=ev.get("suite_limit"), progress=False)
        metrics.update({k: float(v) for k, v in out.items() if math.isfinite(v)})  # lmeval/<task>/<metric>
        details["suite"] = _jsonable(out)
    return metrics, details


def execute_trial(trial_id: str, config: dict, data_dir: str | Path, save_artifact: bool = True,
                  emit: Callable[[str, dict], None] | None = None, device: str = "cpu",
                  threads: int | None = None, stages: list | None = None) -> dict:
    """Run one trial; returns a JSON-able result (metrics, step history, timing, artifact folder, recipe)."""
    emit = emit or (lambda kind, payload: None)
    t0 = time.time()
    info = node_info()
    attempt = f"{info['pid']}-{t0:.6f}"  # tells the driver a retried attempt from the one before
    # counted on disk as well: a worker killed right after starting may never deliver its "started" event
    log = DataLayout(data_dir).attempts_log(trial_id)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        f.write(attempt + "\n")
    attempt_count = len(log.read_text().splitlines())
    emit("started", {**info, "time": t0, "attempt": attempt})
    check_numerics(config)
    if config.get("plugin"):
        register_plugins({config["method"]: config["plugin"]})
    import torch

    if threads:
        torch.set_num_threads(max(1, int(threads)))
    from quant import artifact

    steps: list[dict] = []

    def on_step(d: dict) -> None:
        rec = _step_record(d)
        if rec is not None:
            rec["time"] = time.time()
            steps.append(rec)
            emit("step", {**rec, "attempt": attempt})

    timing: dict = {}
    quant_stage = None
    artifact_dir = None
    if config["method"] == FLOAT_METHOD or not save_artifact:
        lm, recipe, t_load = _quantize(config, device, on_step)
        timing["load_s"] = t_load - t0
        timing["quantize_s"] = time.time() - t_load
    else:
        cache = DataLayout(data_dir).stage_cache()
        key = quant_key(config)
        with cache.entry("quantize", key) as e:
            artifact_dir = e.path / "artifact"
            if e.hit:
                lm = artifact.load(artifact_dir)
                if device != "cpu":
                    lm.model.to(device)
                recipe = lm.recipe
                meta = e.meta()
                steps = list(meta.get("steps", []))
                quant_stage = {"key": key, "hit": True}
                timing["load_s"] = time.time() - t0
                timing["quantize_s"] = 0.0
            else:
                lm, recipe, t_load = _quantize(config, device, on_step)
                timing["load_s"] = t_load - t0
                timing["quantize_s"] = time.time() - t_load
                t_save = time.time()
                artifact.save(lm.model, lm.tokenizer, e.workdir() / "artifact", recipe)
                timing["save_s"] = time.time() - t_save
                e.commit({"trial_config": {k: v for k, v in config.items() if k != "eval"}},
                         steps=steps, timing=timing)
                quant_stage = {"key": key, "hit": False}
    t_eval = time.time()
    metrics, details = _evaluate(lm, config)
    timing["eval_s"] = time.time() - t_eval
    timing["total_s"] = time.time() - t0
    if steps:
        metrics["train/final_loss"] = float(steps[-1].get("loss", float("nan")))
        metrics = {k: v for k, v in metrics.items() if math.isfinite(v)}
    for k, v in timing.items():
        metrics[f"time/{k}"] = round(v, 4)
    return _jsonable({
        "trial_id": trial_id, "config": config, "metrics": metrics, "steps": steps, "timing": timing,
        "eval": details, "recipe": recipe, "artifact_dir": str(artifact_dir) if artifact_dir else None,
        "node": info, "attempt": attempt, "attempt_count": attempt_count,
        "stages": {"shared": stages or [], "quantize": quant_stage},
        "started_at": t0, "ended_at": time.time(),
    })
