"""The README's zero-shot table: one model, several scheme/method rows, every local lm-eval task.

    python bench/lmeval_table.py                               # smollm2-135m: fp, w8a16 rtn, w8a8 rtn
    python bench/lmeval_table.py --rows fp w8a8:rtn --limit 20 # quick look
    python bench/lmeval_table.py --out runs/lmeval.jsonl       # append finished rows; a rerun skips them
    python bench/lmeval_table.py --json                        # rows as JSON lines
    python bench/lmeval_table.py --rows fp @runs/mq-w8a8       # a saved artifact (`farm quantize --out`)

Each row: load the model, quantize it in place (``CalibConfig(samples, seqlen)``), run the suite through
``quant.eval.harness.run_suite`` (real lm-eval, HFLM over the model object), and report every metric,
the task sizes, the quantize time and the suite's wall time. Ends with a markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from quant import CalibConfig, artifact, load_model, quantize
from quant.eval import harness, tasks

import rowfile  # bench/rowfile.py, beside this script

COLUMNS = [("mq_wiki_rolling", "word_perplexity", "wiki word ppl", "{:.2f}"),
           ("mq_wiki_rolling", "bits_per_byte", "wiki bits/byte", "{:.4f}"),
           ("mq_lambada", "acc", "lambada acc", "{:.3f}"),
           ("mq_lambada", "perplexity", "lambada ppl", "{:.1f}"),
           ("mq_hellaswag", "acc", "hellaswag acc", "{:.3f}"),
           ("mq_hellaswag", "acc_norm", "hellaswag acc_norm", "{:.3f}"),
           ("mq_knowledge", "acc", "knowledge acc", "{:.3f}"),
           ("mq_knowledge", "acc_norm", "knowledge acc_norm", "{:.3f}")]


def markdown(rows: list[dict]) -> str:
    head = ["scheme", "method"] + [c[2] for c in COLUMNS] + ["quantize (s)", "suite (s)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        m = r["metrics"]
        cells = [r["scheme"], r["method"]]
        for task, metric, _, fmt in COLUMNS:
            v = m.get(f"lmeval/{task}/{metric}")
            cells.append("-" if v is None else fmt.format(v))
        cells += [f"{r['quantize_s']:.0f}", f"{m['lmeval/suite_s']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--rows", nargs="+", default=["fp", "w8a16:rtn", "w8a8:rtn"], help="scheme[:method] rows")
    p.add_argument("--suite", default="local")
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=None, help="at most N documents per task (quick looks)")
    p.add_argument("--batch-size", type=int, default=harness.DEFAULT_BATCH_SIZE)
    p.add_argument("--json", action="store_true", help="print rows as JSON lines")
    p.add_argument("--out", default=None, help="JSON-lines file: finished rows are appended and skipped on rerun")
    args = p.parse_args(argv)

    def same_run(r):
        same_calib = (r["calib_samples"], r["seqlen"]) == (args.calib_samples, args.seqlen)
        return ((r["model"], r["suite"], r["limit"]) == (args.model, args.suite, args.limit)
                and (same_calib or r["row"].startswith("@")))  # an artifact carries its own calibration

    done = {r["row"]: r for r in rowfile.read(args.out, same_run)}
    sizes = {n: s.size for n, s in tasks.TASKS.items()}
    print(f"# model={args.model} suite={args.suite} limit={args.limit} sizes={sizes}", file=sys.stderr)
    rows = []
    for spec in args.rows:
        if spec in done:
            print(f"{spec}: already in {args.out}, skipped", file=sys.stderr)
            rows.append(done[spec])
            continue
        t0 = time.perf_counter()
        if spec.startswith("@"):  # a saved artifact: its own recipe says how it was made
            lm = artifact.load(spec[1:])
            recipe = lm.recipe
            if recipe["model"] != args.model:
                print(f"{spec}: is a {recipe['model']} artifact, not {args.model}", file=sys.stderr)
                return 2
        else:
            scheme, _, method = spec.partition(":")
            lm = load_model(args.model)
            recipe = quantize(lm, scheme, method or "rtn", CalibConfig(args.calib_samples, args.seqlen, args.seed),
                              progress=False).recipe
        metrics = harness.run_suite(lm, args.suite, limit=args.limit, batch_size=args.batch_size, progress=False)
        row = {"row": spec, "model": args.model, "scheme": recipe["scheme"], "method": recipe["method"],
               "suite": args.suite, "limit": args.limit, "calib_samples": recipe["calibration"].get("samples"),
               "seqlen": recipe["calibration"].get("seqlen"), "quantize_s": recipe["timing"]["quantize_s"],
               "method_config": recipe.get("method_config", {}),
               "total_s": round(time.perf_counter() - t0, 1), "metrics": metrics}
        rows.append(row)
        rowfile.append(args.out, row)
        if args.json:
            print(json.dumps(row), flush=True)
        else:
            print(f"{spec}: suite {metrics['lmeval/suite_s']:.0f}s", file=sys.stderr, flush=True)
    if not args.json:
        print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
