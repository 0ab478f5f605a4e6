"""Simulated-forward time / plain-forward time on the same tokens (target: at most 1.5).

    python bench/sim_overhead.py [--model smollm2-135m] [--scheme w8a8] [--seqlen 512] [--repeats 5] [--json]

Both models use the same eager attention math; the plain model is also timed with SDPA for reference.
Each timing is the median of ``--repeats`` forwards after one warm-up, batch 1, no autograd; the three
models run in turn within each repeat, so a noisy machine slows them alike.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from quant import CalibConfig, data, load_model, quantize


def _forward_s(model, ids):
    t0 = time.perf_counter()
    model(input_ids=ids, use_cache=False)
    return time.perf_counter() - t0


def _interleaved(models, ids, repeats):
    """Median forward time of each model, alternating them so machine noise hits all of them alike."""
    times = [[] for _ in models]
    with torch.no_grad():
        for m in models:
            m(input_ids=ids, use_cache=False)  # warm-up (and the simulated model's weight cache)
        for _ in range(repeats):
            for i, m in enumerate(models):
                times[i].append(_forward_s(m, ids))
    return [statistics.median(t) for t in times]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--scheme", default="w8a8")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    plain_lm = load_model(args.model, num_layers=args.layers)
    sdpa_lm = load_model(args.model, num_layers=args.layers)
    sdpa_lm.model.config._attn_implementation = "sdpa"
    sim_lm = load_model(args.model, num_layers=args.layers)
    ids = data.eval_windows(plain_lm.tokenizer, args.seqlen, limit=1, add_bos=plain_lm.add_bos)
    quantize(sim_lm, args.scheme, "rtn", CalibConfig(4, args.seqlen), progress=False)
    plain, plain_sdpa, sim = _interleaved([plain_lm.model, sdpa_lm.model, sim_lm.model], ids, args.repeats)
    row = {"model": args.model, "scheme": args.scheme, "seqlen": args.seqlen, "threads": torch.get_num_threads(),
           "plain_eager_s": round(plain, 4), "plain_sdpa_s": round(plain_sdpa, 4), "simulated_s": round(sim, 4),
           "ratio_vs_eager": round(sim / plain, 3), "ratio_vs_sdpa": round(sim / plain_sdpa, 3)}
    if args.json:
        print(json.dumps(row))
    else:
        print(f"{args.model} {args.scheme} seqlen {args.seqlen}, {row['threads']} threads: plain {plain:.3f}s "
              f"(sdpa {plain_sdpa:.3f}s), simulated {sim:.3f}s -> ratio {row['ratio_vs_eager']:.2f} "
              f"(vs sdpa {row['ratio_vs_sdpa']:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
