"""How much of a sweep's wall time is scheduling and tracking rather than trials.

Runs a grid of short trials through the whole `farm sweep` path (local Ray, sqlite MLflow, result files,
stage cache): each trial loads one real decoder layer of SmolLM2, calibrates RTN ranges on 2 windows,
sleeps a fixed time (a stand-in for training that leaves the CPU to the driver) and evaluates 2 windows.
A warm-up sweep first starts Ray's workers and creates the MLflow store, so the timed sweep measures
steady-state scheduling.

    scheduling efficiency = ideal makespan / measured makespan
        ideal makespan      = max(sum of in-worker trial times / workers, longest trial)
        measured makespan   = wall time of run_sweep() for the timed grid (setup, trials, logging)
    per-trial overhead     = (measured makespan * workers - sum of trial times) / trials

    python bench/farm_overhead.py [--trials 16] [--seconds 2] [--workers 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class SleepConfig:
    seconds: float = 1.0
    label: str = ""


def _apply(model, windows, config: SleepConfig | None = None, ctx=None) -> dict:
    from quant.sim import calibrate_activations, calibrate_weights

    config = config or SleepConfig()
    calibrate_weights(model)
    calibrate_activations(model, windows.split(4), progress=False)
    time.sleep(config.seconds)
    return {}


sleep_method = SimpleNamespace(Config=SleepConfig, apply=_apply, USES_ACTIVATION_STATS=False)

SWEEP = """\
name: {name}
base: {{model: smollm2-135m, layers: 1, samples: 2, seqlen: 32, method: sleep}}
grid:
  method_config.label: [{labels}]
  method_config.seconds: [{seconds}]
eval: {{perplexity: {{limit: 2}}}}
plugins: {{methods: {{sleep: "bench.farm_overhead:sleep_method"}}}}
resources: {{cpu: 1}}
save_artifacts: false
register_best: false
"""


def _sweep_file(folder: Path, name: str, n: int, seconds: float) -> Path:
    p = folder / f"{name}.yaml"
    labels = ", ".join(f"{name}-{i}" for i in range(n))
    p.write_text(SWEEP.format(name=name, labels=labels, seconds=seconds))
    return p


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=2.0, help="sleep inside each trial")
    ap.add_argument("--workers", type=int, default=2, help="CPUs of the local Ray instance (1 CPU per trial)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    os.chdir(REPO)  # workers import the plugin as bench.farm_overhead from the driver's folder
    sys.path.insert(0, str(REPO))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from farm.orchestrate import scheduler
    from farm.plan.spec import load_sweep
    from farm.orchestrate.sweep import Options, run_sweep

    with tempfile.TemporaryDirectory(prefix="farm-bench-") as tmp:
        tmp = Path(tmp)
        t0 = time.time()
        owned = scheduler.connect(num_cpus=args.workers)
        ray_start = time.time() - t0
        try:
            quiet = open(os.devnull, "w")
            t0 = time.time()
            run_sweep(load_sweep(_sweep_file(tmp, "warmup", args.workers, 0.1)),
                      Options(data_dir=tmp / "data", out=quiet, live=False))
            warmup = time.time() - t0
            sweep = load_sweep(_sweep_file(tmp, "timed", args.trials, args.seconds), max_trials=None)
            t0 = time.time()
            out = run_sweep(sweep, Options(data_dir=tmp / "data", out=quiet, live=False))
            makespan = time.time() - t0
        finally:
            scheduler.shutdown(owned)
    if not out.ok:
        print(f"bench sweep failed: {out.failed}", file=sys.stderr)
        return 1
    durations = [r["timing"]["total_s"] for r in out.results.values()]
    ideal = max(sum(durations) / args.workers, max(durations))
    report = {
        "trials": args.trials, "workers": args.workers, "sleep_s": args.seconds,
        "mean_trial_s": round(sum(durations) / len(durations), 3),
        "ideal_makespan_s": round(ideal, 3), "makespan_s": round(makespan, 3),
        "efficiency": round(ideal / makespan, 4),
        "overhead_ms_per_trial": round((makespan * args.workers - sum(durations)) / args.trials * 1000, 1),
        "ray_start_s": round(ray_start, 2), "warmup_s": round(warmup, 2),
    }
    if args.json:
        print(json.dumps(report, sort_keys=True))
    else:
        print(f"{args.trials} trials of ~{report['mean_trial_s']:.2f}s on {args.workers} workers "
              f"(local Ray, sqlite MLflow)")
        print(f"ideal makespan {ideal:.2f}s, measured {makespan:.2f}s -> scheduling efficiency "
              f"{report['efficiency']:.3f}")
        print(f"per-trial overhead {report['overhead_ms_per_trial']:.0f} ms "
              f"(Ray start {ray_start:.1f}s and warm-up {warmup:.1f}s not counted)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
