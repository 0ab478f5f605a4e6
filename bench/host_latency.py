"""Host latency of the exported model: FP32, W8A16 and W8A8 on onnxruntime's CPU provider, measured together.

    python bench/host_latency.py [--layers N] [--prefill 128] [--ctx 1024] [--rounds 7] [--json] [--profile]
                                 [--variants fp,w8a16,w8a8,w8a8:device]

Makes the three exports of the embedded SmolLM2 (RTN, 8 calibration windows: latency does not depend on
the ranges) under ``runs/bench/host_latency/`` (reused when present), then times them through the host
device's own path (``devicelab.backends.host``: one pinned core, one intra-op thread, warm-up, then timed
runs; ``devicelab.timing``), interleaved FP32 / W8A16 / W8A8 round by round so that the machine's drift
lands on all three alike. Prints per variant the median prefill latency at ``--prefill`` tokens with its
bootstrap CI, decode tokens/s with a cache of ``--ctx`` positions, and the ratios W8A8/FP32 and
W8A8/W8A16 of medians from this one run.

``--profile`` also writes onnxruntime's per-op profile of one prefill run per variant and prints where the
time goes by op type, to show which ops onnxruntime did not turn into integer kernels.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = ("fp", "w8a16", "w8a8")


def make_exports(args) -> dict[str, Path]:
    from quant import CalibConfig, load_model, quantize
    from quant.export import export_model

    out = {}
    for scheme in args.variants:
        path = Path(args.workdir) / f"smollm2-L{args.layers or 'all'}-{scheme.replace(':', '_')}-p{args.prefill}-c{args.ctx}"
        if not (path / "export.json").exists():
            print(f"exporting {scheme} -> {path}", file=sys.stderr, flush=True)
            lm = load_model("smollm2-135m", num_layers=args.layers)
            res = quantize(lm, scheme=scheme, method="rtn", calib=CalibConfig(8, 128, 0), progress=False)
            export_model(lm.model, lm.tokenizer, path, res.recipe, prefill=args.prefill, ctx=args.ctx, overwrite=True)
        out[scheme] = path
    return out


def profile(path: Path, workdir: Path) -> dict[str, float]:
    """Milliseconds per op type in one profiled prefill run (onnxruntime's own profiler)."""
    import onnxruntime as ort

    from devicelab.exported import read_export
    from devicelab.timing import cpu_session_options

    exp = read_export(path)
    spec = exp.graph("prefill")
    so = cpu_session_options(1)
    so.enable_profiling = True
    so.profile_file_prefix = str(workdir / f"profile-{path.name}")
    sess = ort.InferenceSession(str(spec.path), so, providers=["CPUExecutionProvider"])
    feeds = spec.synthetic_inputs(exp.vocab_size)
    for _ in range(3):
        sess.run(None, feeds)
    trace = json.loads(Path(sess.end_profiling()).read_text())
    per_op: dict[str, float] = defaultdict(float)
    runs = 0
    for ev in trace:
        if ev.get("cat") == "Node" and ev["name"].endswith("_kernel_time"):
            per_op[ev["args"]["op_name"]] += ev["dur"] / 1000.0
        if ev.get("name") == "model_run":
            runs += 1
    return {op: ms / max(runs, 1) for op, ms in sorted(per_op.items(), key=lambda kv: -kv[1])}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=None, help="first N decoder layers only (default: all 30)")
    p.add_argument("--prefill", type=int, default=128)
    p.add_argument("--ctx", type=int, default=1024)
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds (each: every variant once)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per variant per round")
    p.add_argument("--tokens", type=int, default=16, help="decode steps per decode sample")
    p.add_argument("--workdir", default=str(ROOT / "runs" / "bench" / "host_latency"))
    p.add_argument("--json", action="store_true")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help="schemes to export and time (fp, w8a16 and w8a8 are needed for the ratios)")
    args = p.parse_args(argv)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    missing = [v for v in VARIANTS if v not in args.variants]
    if missing:
        p.error(f"--variants must include {', '.join(VARIANTS)} (the ratios need them); missing {', '.join(missing)}")

    from devicelab import stats
    from devicelab.backends.host import HostDevice
    from devicelab.protocol import Workload

    exports = make_exports(args)
    host = HostDevice(threads=1, pin=True)
    prepared = {v: host.prepare(path) for v, path in exports.items()}
    variants = args.variants
    samples = {g: {v: [] for v in variants} for g in ("prefill", "decode")}
    for graph in ("prefill", "decode"):
        warm = Workload(graph=graph, warmup=2, repeats=1, tokens=args.tokens)
        for v in variants:  # warm every session once before the rounds
            host.run(prepared[v], warm)
        for r in range(args.rounds):
            for v in variants:  # interleaved: FP32, W8A16, W8A8, FP32, ...
                rec = host.run(prepared[v], Workload(graph=graph, warmup=0, repeats=args.repeats, tokens=args.tokens))
                samples[graph][v] += rec.samples_ms
            print(f"round {r + 1}/{args.rounds} {graph}: " + ", ".join(
                f"{v} {stats.median(samples[graph][v]):.1f} ms" for v in variants), file=sys.stderr, flush=True)
    result = {"device": host.info().to_dict(), "prefill_tokens": args.prefill, "ctx": args.ctx,
              "layers": args.layers or 30, "rounds": args.rounds, "repeats": args.repeats, "variants": {}}
    for v in variants:
        pre, dec = stats.summarize(samples["prefill"][v]), stats.summarize(samples["decode"][v])
        result["variants"][v] = {"prefill_ms": pre["median_ms"], "prefill_ci_ms": [pre["ci_low_ms"], pre["ci_high_ms"]],
                                 "decode_ms_per_token": dec["median_ms"], "decode_tok_s": 1000.0 / dec["median_ms"],
                                 "decode_ci_ms": [dec["ci_low_ms"], dec["ci_high_ms"]]}
    r = result["variants"]
    result["ratios"] = {
        "prefill w8a8/fp32": r["w8a8"]["prefill_ms"] / r["fp"]["prefill_ms"],
        "prefill w8a8/w8a16": r["w8a8"]["prefill_ms"] / r["w8a16"]["prefill_ms"],
        "decode w8a8/fp32": r["w8a8"]["decode_ms_per_token"] / r["fp"]["decode_ms_per_token"],
        "decode w8a8/w8a16": r["w8a8"]["decode_ms_per_token"] / r["w8a16"]["decode_ms_per_token"],
    }
    for v in variants:
        if v not in VARIANTS:
            result["ratios"][f"prefill {v}/fp32"] = r[v]["prefill_ms"] / r["fp"]["prefill_ms"]
            result["ratios"][f"decode {v}/fp32"] = r[v]["decode_ms_per_token"] / r["fp"]["decode_ms_per_token"]
    if args.profile:
        result["profile_ms_per_op"] = {v: profile(exports[v], Path(args.workdir)) for v in variants}
    if args.json:
        print(json.dumps(result, sort_keys=True))
        return 0
    print(f"{result['device']['model']}, onnxruntime {result['device']['runtime_version']}, one pinned thread; "
          f"{result['layers']} layers, prefill {args.prefill} tokens, decode with a {args.ctx}-position cache")
    print(f"{'variant':8s} {'prefill ms':>12s} {'95% CI':>18s} {'decode tok/s':>13s}")
    for v in variants:
        x = r[v]
        print(f"{v:8s} {x['prefill_ms']:12.1f} {x['prefill_ci_ms'][0]:8.1f}-{x['prefill_ci_ms'][1]:<9.1f} {x['decode_tok_s']:13.1f}")
    for k, val in result["ratios"].items():
        print(f"{k}: {val:.3f}")
    if args.profile:
        for v in variants:
            top = list(result["profile_ms_per_op"][v].items())[:8]
            print(f"{v} prefill, ms per op type: " + ", ".join(f"{op} {ms:.1f}" for op, ms in top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
