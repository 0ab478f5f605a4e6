"""Simulated-forward time / plain-forward time on the same tokens (target: at most 1.5).

    python bench/sim_overhead.py [--model smollm2-135m] [--scheme w8a8] [--seqlen 512] [--repeats 5] [--json]

Both models use the same eager attention math; the plain model is also timed with SDPA for reference.
Each timing is the median of ``--repeats`` forwards after one warm-up, batch 1, no autograd.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from quant import CalibConfig, data, load_model, quantize


def _median_forward(model, ids, repeats):
    times = []
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(input_ids=ids, use_cache=False)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--scheme", default="w8a8")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    lm = load_model(args.model, num_layers=args.layers)
    ids = data.eval_windows(lm.tokenizer, args.seqlen, limit=1, add_bos=lm.add_bos)
    plain = _median_forward(lm.model, ids, args.repeats)
    lm.model.config._attn_implementation = "sdpa"
    plain_sdpa = _median_forward(lm.model, ids, args.repeats)
    lm.model.config._attn_implementation = "eager"
    quantize(lm, args.scheme, "rtn", CalibConfig(4, args.seqlen), progress=False)
    sim = _median_forward(lm.model, ids, args.repeats)
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
