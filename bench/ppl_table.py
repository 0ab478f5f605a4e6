"""The README's perplexity table: one model, several schemes, RTN, the full evaluation corpus.

    python bench/ppl_table.py --model smollm2-135m --schemes fp w8a16 w8a8 w4a8 --seqlen 512
    python bench/ppl_table.py --limit 40 --json        # quick look
    python bench/ppl_table.py --rows runs/ppl.jsonl    # append each finished row; a rerun skips done rows

Prints one row per scheme with perplexity, ratio to FP, windows, quantize and evaluation wall time.
"""

from __future__ import annotations

import argparse
import json
import sys

from quant import CalibConfig, evaluate_perplexity, load_model, quantize

import rowfile  # bench/rowfile.py, beside this script


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--schemes", nargs="+", default=["fp", "w8a16", "w8a8", "w4a8"])
    p.add_argument("--method", default="rtn")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=None, help="first N evaluation windows only")
    p.add_argument("--json", action="store_true", help="print rows as JSON lines")
    p.add_argument("--rows", default=None, help="JSON-lines file: finished rows are appended and skipped on rerun")
    args = p.parse_args(argv)

    def same_run(r):
        return ((r["model"], r["method"] in ("none", args.method), r["seqlen"], r.get("limit"),
                 r.get("calib_samples"), r.get("seed"))
                == (args.model, True, args.seqlen, args.limit, args.calib_samples, args.seed))

    calib = CalibConfig(args.calib_samples, args.seqlen, args.seed)
    print(f"# model={args.model} method={args.method} calib={calib} limit={args.limit}", file=sys.stderr)
    rows = []
    for scheme in args.schemes:
        # read again before every row: several processes can share one row file, each taking other schemes
        done = {r["scheme"]: r for r in rowfile.read(args.rows, same_run)}
        fp_ppl = done["fp"]["ppl"] if "fp" in done else next((r["ppl"] for r in rows if r["scheme"] == "fp"), None)
        if scheme in done:
            print(f"{scheme}: already in {args.rows}, skipped", file=sys.stderr)
            continue
        lm = load_model(args.model)
        res = quantize(lm, scheme, args.method, calib)
        ppl = evaluate_perplexity(lm, args.seqlen, limit=args.limit)
        if scheme == "fp":
            fp_ppl = ppl.ppl
        elif fp_ppl is None:  # another process may have finished the FP row meanwhile
            fp_ppl = next((r["ppl"] for r in rowfile.read(args.rows, same_run) if r["scheme"] == "fp"), None)
        row = {"model": args.model, "scheme": scheme, "method": res.recipe["method"], "ppl": round(ppl.ppl, 3),
               "ratio_to_fp": round(ppl.ppl / fp_ppl, 3) if fp_ppl else None, "windows": ppl.windows,
               "seqlen": args.seqlen, "quantize_s": res.recipe["timing"]["quantize_s"],
               "eval_s": round(ppl.seconds, 1), "tokens_per_s": round(ppl.tokens_per_s), "limit": args.limit,
               "calib_samples": args.calib_samples, "seed": args.seed}
        rows.append(row)
        rowfile.append(args.rows, row)
        print(json.dumps(row) if args.json else
              f"{scheme:10s} {row['method']:6s} ppl {row['ppl']:10.3f}  x{row['ratio_to_fp'] or float('nan'):.3f}  "
              f"{ppl.windows} windows  quantize {row['quantize_s']}s  eval {row['eval_s']}s")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
