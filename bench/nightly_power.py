"""How many interleaved A/B pairs does `farm nightly` need on this machine to tell a 10% slowdown from noise?

    python bench/nightly_power.py [--export DIR] [--rounds 800] [--slowdown 0.10] [--threshold 0.05]

Measured, not assumed: on the host backend's timing path (onnxruntime CPU, one pinned intra-op thread,
devicelab.timing), it runs one long interleaved stream of rounds; each round times

    A (the baseline session), N (a second session of the same graph: no change),
    A again, S (the second session, then a busy wait of ``slowdown`` x the time that run of it took, inside
               the timed region: a model ``slowdown`` slower, with its own noise)

so every (A, N) is a pair of a night with no change and every (A, S) a pair of a night whose candidate is
really ``slowdown`` slower. For each n in 4..128, windows of n consecutive pairs are drawn from the stream
(random starts, seeded) and decided exactly as the nightly decides (farm.orchestrate.regression.latency_decision: a
regression when the median pair ratio is above 1 + threshold and the bootstrap CI of that median lies
above 1). The detection rate is the share of slowed windows flagged, the false alarm rate the share of
unchanged windows flagged. ``independent`` is how many windows would fit without overlap: rates from
overlapping windows are unbiased but vary more than their count suggests.

The model is the nightly suite's: a SmolLM2 export of the suite's shape (two decoder layers, W8A8 RTN,
prefill 64 tokens), made once into --work unless --export names one. Prints one table (Markdown) and
writes it as JSON next to --work.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

NS = (4, 8, 16, 24, 32, 48, 64, 96, 128)


def make_export(work: Path) -> Path:
    """The nightly suite's quantized trial, exported: farm quantize + farm export (cached in --work)."""
    art, exp = work / "artifact", work / "export"
    if (exp / "export.json").exists():
        return exp
    farm = [sys.executable, "-m", "farm.cli"]
    subprocess.run(farm + ["quantize", "--model", "smollm2-135m", "--layers", "2", "--scheme", "w8a8", "--method",
                           "rtn", "--calib-samples", "8", "--seqlen", "128", "--out", str(art), "--overwrite"],
                   cwd=REPO, check=True)
    subprocess.run(farm + ["export", str(art), "--out", str(exp), "--prefill", "64", "--ctx", "128", "--overwrite"],
                   cwd=REPO, check=True)
    return exp


def spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def stream(export: Path, graph: str, rounds: int, slowdown: float) -> dict:
    """The interleaved stream: per round one sample of A, N, A, S (ms); the slowdown's size in ms."""
    from devicelab.backends.host import HostDevice
    from devicelab.timing import pinned, time_runs

    dev = HostDevice("host", threads=1)
    a, b = dev.prepare(export), dev.prepare(export)  # two sessions: the candidate is a different object
    spec = a.export.graph(graph)
    feeds = spec.synthetic_inputs(a.export.vocab_size)
    sa, sb = a.session("host", graph), b.session("host", graph)

    def run_a():
        sa.run(None, feeds)

    def run_b():
        sb.run(None, feeds)

    with pinned(1):
        time_runs(run_a, warmup=5, repeats=1)
        time_runs(run_b, warmup=5, repeats=1)
        delays = []

        def run_s():  # a model `slowdown` slower: this run's own work, then that share of it again
            t0 = time.perf_counter()
            sb.run(None, feeds)
            work = time.perf_counter() - t0
            spin(slowdown * work)
            delays.append(slowdown * work * 1000.0)

        out = {"A1": [], "N": [], "A2": [], "S": []}
        t0 = time.time()
        for r in range(rounds):
            for name, fn in (("A1", run_a), ("N", run_b), ("A2", run_a), ("S", run_s)):
                out[name].append(time_runs(fn, 0, 1)[0])
            if (r + 1) % 50 == 0:
                print(f"  round {r + 1}/{rounds} ({time.time() - t0:.0f}s)", file=sys.stderr, flush=True)
    delays.sort()
    return {"samples": out, "delay_ms": delays[len(delays) // 2]}


def power(samples: dict, threshold: float, windows: int, seed: int = 0) -> list[dict]:
    from farm.orchestrate.regression import latency_decision

    rng = random.Random(seed)
    total = len(samples["A1"])
    rows = []
    for n in NS:
        if n > total:
            continue
        starts = [rng.randrange(0, total - n + 1) for _ in range(windows)]
        hits = alarms = 0
        widths = []
        for s in starts:
            null = latency_decision(samples["A1"][s:s + n], samples["N"][s:s + n], threshold)
            slow = latency_decision(samples["A2"][s:s + n], samples["S"][s:s + n], threshold)
            alarms += null["regression"]
            hits += slow["regression"]
            widths.append(slow["ci_high"] - slow["ci_low"])
        widths.sort()
        rows.append({"pairs": n, "windows": windows, "independent": total // n, "detection": hits / windows,
                     "false_alarm": alarms / windows, "ci_width": widths[len(widths) // 2]})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--export", default=None, help="export folder to time (default: the suite's, made in --work)")
    ap.add_argument("--work", default="runs/bench/nightly_power", help="where the export and the results go")
    ap.add_argument("--graph", default="prefill", choices=["prefill", "decode"],
                    help="graph to time (decode: one step per sample)")
    ap.add_argument("--rounds", type=int, default=800, help="rounds of A, N, A, S in the stream")
    ap.add_argument("--slowdown", type=float, default=0.10, help="the synthetic slowdown (fraction)")
    ap.add_argument("--threshold", type=float, default=0.05, help="the nightly's latency threshold (fraction)")
    ap.add_argument("--windows", type=int, default=300, help="windows drawn per n")
    args = ap.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    export = Path(args.export) if args.export else make_export(work)
    t0 = time.time()
    got = stream(export, args.graph, args.rounds, args.slowdown)
    took = time.time() - t0
    rows = power(got["samples"], args.threshold, args.windows)
    import numpy as np

    a = np.array(got["samples"]["A1"])
    n = np.array(got["samples"]["N"])
    ratio = n / a
    print(f"\n{args.graph} of {export}: A median {np.median(a):.2f} ms (p90 {np.percentile(a, 90):.2f}); "
          f"unchanged pair ratio median {np.median(ratio):.3f}, IQR [{np.percentile(ratio, 25):.3f}, "
          f"{np.percentile(ratio, 75):.3f}]; slowdown {args.slowdown:.0%} (median added {got['delay_ms']:.2f} ms); "
          f"threshold {args.threshold:.0%}; {args.rounds} rounds in {took:.0f}s\n")
    print(f"| A/B pairs | detection of a {args.slowdown:.0%} slowdown | false alarms (no change) | median CI width "
          "| windows (independent) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['pairs']} | {r['detection']:.0%} | {r['false_alarm']:.1%} | {r['ci_width']:.3f} | "
              f"{r['windows']} ({r['independent']}) |")
    out = work / f"power-{args.graph}.json"
    out.write_text(json.dumps({"args": vars(args), "export": str(export), "seconds": took, "rows": rows,
                               "delay_ms": got["delay_ms"], "samples": got["samples"]}, indent=1))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
