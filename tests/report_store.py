"""A synthetic sweep with device measurements, written into a real sqlite MLflow store through farm's own
Tracker (the code path a sweep uses), for the report tests and the documentation's screenshot.

Every number is set here (``TRUTH``), so a test can check each cell of the report against it. The device
metrics and tags follow ``reports.device_metrics`` (the names the device stage logs): a host stand-in and a
phone with meaningful times, and the QNN HTP emulator (``latency_meaningful=false``) whose times must never
reach a latency column or a plot. One trial fails with an error holding a ``|`` (a Markdown table's cell
separator), the RTN trials quantize in 0.0002 s and the MobileQuant ones in 284.3 s (read ``0 s`` and
``4m44s``).

The host's numbers come from one measurement session (every model timed together): each trial carries its
time ratios to FP with a +-3 % interval (``RATIO_CI``), the session's key and conditions, and the trials
of its scheme as ``same_graph``. With these numbers W8A8 MobileQuant and W4A8 MobileQuant are separable
frontier points of the host's Pareto view, and W4A8 SmoothQuant and W4A8 RTN are frontier points that are
"not separable" (``NOT_SEPARABLE``).
"""

from __future__ import annotations

import textwrap
from pathlib import Path

SWEEP = """\
name: devrep
description: synthetic W8A8 / W4A8 sweep with device measurements (report tests)
base: {model: smollm2-135m, layers: 1, seqlen: 32, samples: 4}
grid:
  scheme: [w8a8, w4a8]
  method: [mobilequant, smoothquant, rtn]
methods:
  mobilequant: {epochs: 2}
  omniquant: {epochs: 1}
include:
  - {scheme: fp}
  - {scheme: w8a8, method: omniquant}
eval: {perplexity: {limit: 2}}
"""

PPL_METRIC = "ppl/wiki/seq32"
FAILED = ("w8a8", "omniquant")
ERROR = "FloatingPointError: loss is nan | step 3"
CORPUS_ID = "news:0f1e2d3c4b5a6978"

# (scheme, method) -> perplexity, lambada acc, hellaswag acc_norm,
#   host (prefill ms, decode tok/s), phone (prefill ms, decode tok/s, mJ/token)
TRUTH = {
    ("fp", "none"): (20.0, 0.42, 0.351, (180.0, 9.5), (410.0, 4.1, 95.0)),
    ("w8a8", "rtn"): (40.0, 0.30, 0.288, (52.3, 30.1), (21.4, 61.0, 11.2)),
    ("w8a8", "smoothquant"): (26.0, 0.39, 0.334, (55.1, 29.4), (22.0, 59.8, 10.5)),
    ("w8a8", "mobilequant"): (25.4, 0.40, 0.341, (50.2, 30.8), (20.9, 62.3, 10.8)),
    ("w4a8", "rtn"): (85.0, 0.12, 0.262, (41.7, 38.2), (15.2, 74.5, 8.1)),
    ("w4a8", "smoothquant"): (58.0, 0.25, 0.297, (43.9, 37.5), (15.8, 73.9, 8.3)),
    ("w4a8", "mobilequant"): (40.0, 0.33, 0.318, (44.6, 36.9), (16.1, 72.8, 8.6)),
}
EMULATOR_MS = 31234.5  # the emulator's "prefill time": must appear nowhere as latency
DEVICES = {
    "host": {"model": "Intel Xeon (test host)", "soc": "x86_64", "os_build": "Linux 6.1.0-test",
             "runtime": "onnxruntime 1.32.0", "latency_meaningful": "true"},
    "galaxy-s24": {"name": "galaxy-s24", "kind": "adb", "model": "Samsung Galaxy S24", "soc": "SM8650",
                   "os_build": "UP1A.231005.007", "runtime": "qnn-net-run", "runtime_version": "2.27",
                   "latency_meaningful": "true"},
    "qnn-sim": {"model": "QNN HTP emulator", "soc": "SM8650 (emulated)", "os_build": "Linux 6.1.0-test",
                "runtime": "onnxruntime-qnn 2.7.0", "latency_meaningful": "false"},
}
CI = 0.05  # the confidence interval of the median prefill time: +-5 %
RATIO_CI = 0.03  # the host's time ratios to FP: +-3 %
SESSION_KEY = "5e55107a0e1d2c3b"
CONDITIONS = ("host; 1 thread(s); prefill 15 interleaved rounds, decode 15 interleaved rounds; 7 models in one "
              "session, the whole node; 2 CPUs, governor not exposed, load 1.02->1.05, other processes 0.04 cores")
NOT_SEPARABLE = {("w4a8", "smoothquant"), ("w4a8", "rtn")}
# a target the device stage could not measure for one trial (as farm/orchestrate/device_metrics.py tags it)
LOST = ("pixel-lab", ("w8a8", "rtn"), "every device of the target was lost")


SIBLINGS: list = []  # the sweep's trials, for same_graph


def key_of(trial) -> tuple[str, str]:
    return trial.config["scheme"], trial.config["method"]


def quantize_s(method: str) -> float:
    return {"rtn": 0.0002, "smoothquant": 3.04, "mobilequant": 284.3}.get(method, 0.0)


def outcome(trial) -> tuple[dict, dict]:
    """The metrics and extra tags the fixture logs for ``trial`` (TRUTH, in the names the report reads)."""
    from reports.device_metrics import (DECODE_TOK_S, ENERGY_MJ_PER_TOK, PREFILL_CI_HIGH, PREFILL_CI_LOW,
                                        PREFILL_MS, metric_key)

    ppl, lambada, hellaswag, host, phone = TRUTH[key_of(trial)]
    metrics = {PPL_METRIC: ppl, "lmeval/lambada/acc": lambada, "lmeval/lambada/acc_stderr": 0.02,
               "lmeval/hellaswag/acc_norm": hellaswag, "lmeval/lambada/n": 100.0,
               "time/quantize_s": quantize_s(trial.config["method"]), "time/total_s": quantize_s(
                   trial.config["method"]) + 12.5}
    for dev, values in (("host", host), ("galaxy-s24", phone), ("qnn-sim", (EMULATOR_MS, 0.05, 1234.0))):
        ms, tok_s = values[0], values[1]
        metrics.update({metric_key(dev, PREFILL_MS): ms, metric_key(dev, PREFILL_CI_LOW): ms * (1 - CI),
                        metric_key(dev, PREFILL_CI_HIGH): ms * (1 + CI), metric_key(dev, DECODE_TOK_S): tok_s})
        if len(values) > 2:
            metrics[metric_key(dev, ENERGY_MJ_PER_TOK)] = values[2]
    fp_host = TRUTH[("fp", "none")][3]
    if key_of(trial) != ("fp", "none"):  # FP is the session's reference: it has no ratio to itself
        for graph, value, ref in (("prefill", host[0], fp_host[0]), ("decode", 1000.0 / host[1], 1000.0 / fp_host[1])):
            r = value / ref
            metrics.update({metric_key("host", f"{graph}_ratio_fp"): r,
                            metric_key("host", f"{graph}_ratio_fp_ci_low"): r * (1 - RATIO_CI),
                            metric_key("host", f"{graph}_ratio_fp_ci_high"): r * (1 + RATIO_CI)})
    tags = {metric_key(dev, k): v for dev, ident in DEVICES.items() for k, v in ident.items()}
    same = [t.id[:8] for t in SIBLINGS if t.config["scheme"] == trial.config["scheme"] and t.id != trial.id]
    tags.update({metric_key("host", "session"): SESSION_KEY, metric_key("host", "conditions"): CONDITIONS,
                 metric_key("host", "loaded"): "false", metric_key("host", "same_graph"): ",".join(same)})
    if key_of(trial) == LOST[1]:
        tags.update({metric_key(LOST[0], "kind"): "adb", metric_key(LOST[0], "error"): LOST[2]})
    return metrics, tags


def build_store(root: Path) -> tuple[str, object]:
    """Write the sweep into ``root/mlflow.db``; returns (tracking URI, the farm Sweep)."""
    from farm.plan.spec import load_sweep
    from farm.orchestrate.tracking import Tracker

    root.mkdir(parents=True, exist_ok=True)
    (root / "devrep.yaml").write_text(textwrap.dedent(SWEEP))
    sweep = load_sweep(root / "devrep.yaml")
    SIBLINGS[:] = sweep.trials
    uri = f"sqlite:///{root / 'mlflow.db'}"
    tr = Tracker(uri, sweep.name, artifact_root=root / "artifacts")
    tr.start_parent(sweep)
    for t in sweep.trials:
        rid = tr.start_trial(t, {"cpu": 1})
        if key_of(t) == FAILED:
            tr.fail_trial(rid, ERROR, tb="Traceback (most recent call last):\n  ...\n" + ERROR)
            continue
        if t.config["method"] == "mobilequant":  # end to end, loss 10 / step over 20 steps
            tr.log_steps(rid, [{"step": s, "loss": 10.0 / s} for s in range(1, 21)])
        metrics, tags = outcome(t)
        recipe = {"calibration": {**(t.config.get("calib") or {}), "corpus_id": CORPUS_ID}, "content_hash": t.id}
        tr.finish_trial(rid, {"metrics": metrics, "recipe": recipe if t.config["method"] != "none" else {}},
                        extra_tags=tags)
    return uri, sweep
