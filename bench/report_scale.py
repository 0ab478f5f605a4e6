"""How long `farm report` takes on a large sweep: 500 trials in a scratch sqlite MLflow store.

The store is written the fast way (MlflowClient.log_batch, no Ray, no models), in the layout farm's Tracker
writes: one experiment, a parent run, one run per trial tagged ``farm_role=trial`` with the flattened
config as params, the commit and package versions as tags, perplexity and lm-eval metrics, timings,
device metrics on two devices plus the QNN emulator (``reports.device_metrics``), and for the trained
methods a 100-step loss history. The grid: 2 schemes x 5 methods x 5 calibration sizes x 10 seeds = 500
quantized trials (5 of them FAILED) plus the FP trial. Then the full report (Markdown, HTML with embedded
plots) is generated and timed.

    python bench/report_scale.py [--trials 500] [--steps 100] [--keep DIR]

Prints the seconds to build the store, and the seconds of the report: cold, as `farm report` runs it
(imports of mlflow and matplotlib included; the number to keep under 10 s), then warm, and the part of it
spent loading the runs.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

SCHEMES = ("w8a8", "w4a8")
METHODS = ("rtn", "smoothquant", "omniquant", "mobilequant", "lrl-block")
TRAINED = ("omniquant", "mobilequant", "lrl-block")
SAMPLES = (4, 8, 16, 32, 64)
DEVICES = {"host": {"model": "x86_64 host", "soc": "x86_64", "os_build": "Linux", "runtime": "onnxruntime 1.32",
                    "latency_meaningful": "true"},
           "galaxy-s24": {"model": "Samsung Galaxy S24", "soc": "SM8650", "os_build": "UP1A.231005.007",
                          "runtime": "qnn-net-run 2.27", "latency_meaningful": "true"},
           "qnn-sim": {"model": "QNN HTP emulator", "soc": "SM8650", "os_build": "Linux",
                       "runtime": "onnxruntime-qnn 2.7.0", "latency_meaningful": "false"}}


def grid(n: int) -> list[dict]:
    seeds = max(1, -(-n // (len(SCHEMES) * len(METHODS) * len(SAMPLES))))
    configs = [{"scheme": sc, "method": m, "samples": s, "seed": seed} for seed in range(seeds) for sc in SCHEMES
               for m in METHODS for s in SAMPLES]
    return configs[:n] + [{"scheme": "fp", "method": "none", "samples": None, "seed": None}]


def build(uri: str, n: int, steps: int) -> int:
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param, RunTag

    from reports.device_metrics import metric_key

    client = MlflowClient(uri)
    exp = client.create_experiment("scale", tags={"farm_role": "sweep"})
    common = {"sweep": "scale", "git_commit": "0123456789abcdef0123456789abcdef01234567", "version.torch": "2.13.0",
              "version.mlflow": "3.17", "version.quant": "0.1.0"}
    parent = client.create_run(exp, run_name="scale", tags={"farm_role": "parent", **common}).info.run_id
    rng = random.Random(0)
    now = int(time.time() * 1000)
    configs = grid(n)
    for i, c in enumerate(configs):
        tags = {"farm_role": "trial", "trial_id": f"{i:064x}", "mlflow.parentRunId": parent, **common,
                "scheme": c["scheme"], "method": c["method"], "model": "smollm2-135m"}
        run = client.create_run(exp, run_name=f"{c['scheme']}-{c['method']}-{i}", tags=tags, start_time=now + i)
        rid = run.info.run_id
        params = {"model": "smollm2-135m", "layers": "None", "scheme": c["scheme"], "method": c["method"],
                  "seed": "0", "eval.perplexity.limit": "40", "resources.cpu": "1"}
        if c["method"] != "none":
            params.update({"calib.samples": str(c["samples"]), "calib.seqlen": "512", "calib.seed": str(c["seed"]),
                           "calib.corpus": "news"})
        if c["method"] in TRAINED:
            params["method_config.epochs"] = "1"
        base = {"fp": 23.6, "w8a8": 30.0, "w4a8": 60.0}[c["scheme"]]
        gain = {"none": 1.0, "rtn": 1.6, "smoothquant": 1.1, "omniquant": 1.0, "mobilequant": 0.95,
                "lrl-block": 0.97}[c["method"]]
        ppl = base * gain * (1 + 1.0 / (c["samples"] or 1e9)) * rng.uniform(0.99, 1.01)
        metrics = {"ppl/wiki/seq512": ppl, "time/quantize_s": rng.uniform(0.1, 600), "time/total_s": 700.0,
                   "lmeval/lambada/acc": rng.uniform(0.2, 0.4)}
        for d, ms in (("host", 50.0), ("galaxy-s24", 20.0), ("qnn-sim", 30000.0)):
            ms *= rng.uniform(0.9, 1.1) * (0.8 if c["scheme"] == "w4a8" else 4.0 if c["scheme"] == "fp" else 1.0)
            metrics.update({metric_key(d, "prefill_ms"): ms, metric_key(d, "prefill_ms_ci_low"): ms * 0.97,
                            metric_key(d, "prefill_ms_ci_high"): ms * 1.03,
                            metric_key(d, "decode_tok_s"): 1000.0 / ms})
            if d == "galaxy-s24":
                metrics[metric_key(d, "energy_mj_per_tok")] = ms * 0.5
        mlist = [Metric(k, v, now, 0) for k, v in metrics.items()]
        if c["method"] in TRAINED:
            mlist += [Metric("train/loss", 1.0 / (s + 1) + rng.uniform(0, 0.01), now + s, s) for s in range(steps)]
        dtags = [RunTag(metric_key(d, k), v) for d, ident in DEVICES.items() for k, v in ident.items()]
        failed = c["method"] != "none" and i % 100 == 7
        if failed:
            dtags += [RunTag("error", "RuntimeError: worker ran out of memory"), RunTag("error_kind", "exception")]
            mlist = [m for m in mlist if m.key == "train/loss"]
        client.log_batch(rid, metrics=mlist, params=[Param(k, v) for k, v in params.items()], tags=dtags)
        client.set_terminated(rid, status="FAILED" if failed else "FINISHED", end_time=now + i + 1)
        if (i + 1) % 100 == 0:
            print(f"  {i + 1}/{len(configs)} runs written", file=sys.stderr)
    client.set_terminated(parent, status="FINISHED")
    return len(configs)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=500, help="quantized trials (plus one FP trial)")
    ap.add_argument("--steps", type=int, default=100, help="loss steps logged per trained trial")
    ap.add_argument("--keep", default=None, help="write the store and report here and keep them")
    args = ap.parse_args()
    # a scratch store on tmpfs when there is one: sqlite's fsync per transaction, not MLflow, would
    # otherwise dominate building it (81 s against about 20 s on this machine)
    shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="report-scale-", dir=shm))
    root.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    try:
        t0 = time.perf_counter()
        runs = build(uri, args.trials, args.steps)
        built = time.perf_counter() - t0
        print(f"store: {runs} runs in {built:.1f} s ({uri})")

        print("generating the report...", file=sys.stderr)
        from reports import load_trials, sweep_report

        # first as `farm report` runs it, in a fresh interpreter's state (mlflow and matplotlib imported on
        # the way); then again, warm, and the loading of the runs alone
        t0, c0 = time.perf_counter(), time.process_time()
        path = sweep_report("scale", uri, root / "report")
        cold, cpu = time.perf_counter() - t0, time.process_time() - c0
        t0 = time.perf_counter()
        sweep_report("scale", uri, root / "report")
        warm = time.perf_counter() - t0
        t0 = time.perf_counter()
        trials = load_trials("scale", uri)
        loaded = time.perf_counter() - t0
        html = (root / "report" / "report.html").stat().st_size
        print(f"report of {len(trials)} trials ({path}, HTML {html / 1024:.0f} KiB): {cold:.2f} s "
              f"wall, {cpu:.2f} s CPU (imports included; warm {warm:.2f} s, of which loading the runs {loaded:.2f} s)")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
