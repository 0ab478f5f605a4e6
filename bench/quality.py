"""The headline quality table: every method at the same calibration budget, perplexity and ratio to FP.

    python bench/quality.py                                  # SmolLM2, W8A8 and W4A8, all methods, full corpus
    python bench/quality.py --limit 100 --rows runs/q.jsonl  # resumable: finished rows are skipped on rerun
    python bench/quality.py --model gemma3-270m --schemes w8a8 --methods fp rtn smoothquant mobilequant
    python bench/quality.py --hp mobilequant.lwc_lr=5e-3 --hp omniquant.epochs=4
    python bench/quality.py --device cuda --eval-batch 16          # on a GPU
    python bench/quality.py --methods fp smoothquant mobilequant --rotate none hadamard \
        --splits validation test --limit 40                      # rotation, chosen on validation

Every row is evaluated on each of ``--splits`` (``quant.data.split_bounds``: test = the first 75% of the
evaluation tokens, validation = the last 25%); choose hyper-parameters on the validation column and report
the test column. ``--limit`` is the number of windows of each split.

A learned method whose loss diverges gets a row that says so (and the message); the other rows still run.

Every learned method gets the same windows (``--calib-samples`` x ``--seqlen``, ``--seed``) and the same
number of epochs; the budget is printed first. Columns: perplexity, ratio to FP, quantize wall time.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict

import torch

from quant import CalibConfig, evaluate_perplexity, load_model, quantize
from quant.methods import method_config
from quant.train import TrainingDiverged
from quant.zoo import resolve_device

import rowfile  # bench/rowfile.py, beside this script

LEARNED = ("omniquant", "lrl-block", "mobilequant")


def _parse_hp(items: list[str]) -> dict:
    out: dict[str, dict] = {}
    for item in items:
        try:
            key, value = item.split("=", 1)
            method, field = key.split(".", 1)
        except ValueError:
            raise SystemExit(f"--hp expects METHOD.FIELD=VALUE, got {item!r}") from None
        try:
            v = json.loads(value)
        except json.JSONDecodeError:
            v = value
        out.setdefault(method, {})[field] = v
    return out


def _overrides(method: str, hp: dict, epochs: int) -> dict:
    out = dict(hp.get(method, {}))
    if method in LEARNED:
        out.setdefault("epochs", epochs)
    return out


def _full_config(method: str, hp: dict, epochs: int) -> dict | None:
    """Every hyper-parameter, defaults included: a row is reused only if nothing differs."""
    if method == "fp":
        return None
    return json.loads(json.dumps(asdict(method_config(method, _overrides(method, hp, epochs)))))


CALIB_BUDGET = ("calib_samples", "epochs", "seed", "rotate_seed", "calib_corpus")


def _eval_budget(budget: dict) -> dict:
    """What the float row depends on: the model and the evaluation windows, not the calibration."""
    return {k: v for k, v in budget.items() if k not in CALIB_BUDGET}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--schemes", nargs="+", default=["w8a8", "w4a8"])
    p.add_argument("--methods", nargs="+", default=["fp", "rtn", "smoothquant", *LEARNED])
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512, help="calibration and evaluation window")
    p.add_argument("--epochs", type=int, default=4, help="epochs of every learned method")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=None, help="first N evaluation windows (default: all)")
    p.add_argument("--hp", action="append", default=[], metavar="METHOD.FIELD=VALUE")
    p.add_argument("--rows", default=None, help="JSON-lines file: finished rows are appended and skipped on rerun")
    p.add_argument("--json", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--eval-batch", type=int, default=1, help="evaluation windows per forward")
    p.add_argument("--rotate", nargs="+", default=["none"], choices=["none", "random", "hadamard"],
                   help="rotations folded into the weights before each method (quant.rotation)")
    p.add_argument("--rotate-seed", type=int, default=0)
    p.add_argument("--splits", nargs="+", default=["test"], choices=["test", "validation"])
    p.add_argument("--calib-corpus", default="news", help="calibration corpus name or text file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        device = resolve_device(args.device)
    except ValueError as e:
        raise SystemExit(f"--device: {e}") from None
    hp = _parse_hp(args.hp)
    calib = CalibConfig(args.calib_samples, args.seqlen, args.seed, args.calib_corpus)
    budget = {"model": args.model, "layers": args.layers, "calib_samples": args.calib_samples,
              "seqlen": args.seqlen, "epochs": args.epochs, "seed": args.seed, "limit": args.limit,
              "splits": args.splits, "rotate_seed": args.rotate_seed}
    if args.calib_corpus != "news":
        budget["calib_corpus"] = args.calib_corpus
    if device.type != "cpu":  # GPU kernels round differently: CPU and GPU rows are not mixed
        budget["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    print(f"# budget: {json.dumps(budget)}  hp: {json.dumps(hp)}", file=sys.stderr)

    def same_run(r):  # a row is reused only if the budget and every hyper-parameter match
        if r["method"] == "fp":  # the float model reads no calibration: its row serves every budget
            return _eval_budget(r.get("budget") or {}) == _eval_budget(budget)
        return r.get("budget") == budget and r.get("config") == _full_config(r["method"], hp, args.epochs)

    done = {(r["scheme"], r["method"], r.get("rotate", "none")): r for r in rowfile.read(args.rows, same_run)}
    rows = list(done.values())
    fp_ppl = {sp: next((r["ppl_" + sp] for r in rows if r["method"] == "fp" and r.get("rotate", "none") == "none"),
                       None) for sp in args.splits}
    plan = [("fp", "fp", "none")] if "fp" in args.methods else []
    plan += [(s, m, rot) for s in args.schemes for m in args.methods if m != "fp" for rot in args.rotate]
    for scheme, method, rot in plan:
        if (scheme, method, rot) in done:
            print(f"{scheme}/{method}/rotate={rot}: in {args.rows}, skipped", file=sys.stderr)
            continue
        overrides = _overrides(method, hp, args.epochs)
        lm = load_model(args.model, num_layers=args.layers, device=device)
        t0 = time.perf_counter()
        common = {"scheme": scheme, "method": method, "rotate": rot, "budget": budget, "hp": hp.get(method, {}),
                  "config": _full_config(method, hp, args.epochs)}
        rotate = {"kind": rot, "seed": args.rotate_seed}
        try:
            if method == "fp":
                res = quantize(lm, "fp")
            else:
                res = quantize(lm, scheme, method, calib, method_config=method_config(method, overrides),
                               rotate=rotate)
        except TrainingDiverged as e:
            res, diverged = None, str(e)
        q_s = round(time.perf_counter() - t0, 1)
        if res is None:
            row = {**common, "ppl": None, "ratio_to_fp": None, "diverged": diverged, "quantize_s": q_s,
                   "steps": None}
        else:
            info = res.recipe.get("method_info", {})
            row = {**common, "quantize_s": q_s, "steps": info.get("steps"),
                   "rotation": res.recipe.get("rotation"), "calib_corpus_id": res.recipe["calibration"].get("corpus_id"),
                   "train_loss": (info.get("epoch_losses") or [None])[-1] if "epoch_losses" in info
                   else info.get("final_mse")}
            for sp in args.splits:
                ppl = evaluate_perplexity(lm, args.seqlen, limit=args.limit, batch_size=args.eval_batch, split=sp)
                if method == "fp":
                    fp_ppl[sp] = ppl.ppl
                row.update({f"ppl_{sp}": round(ppl.ppl, 3), f"windows_{sp}": ppl.windows,
                            f"eval_s_{sp}": round(ppl.seconds, 1),
                            f"ratio_{sp}": round(ppl.ppl / fp_ppl[sp], 4) if fp_ppl[sp] else None})
            row["ppl"], row["ratio_to_fp"] = row[f"ppl_{args.splits[0]}"], row[f"ratio_{args.splits[0]}"]
        rows.append(row)
        rowfile.append(args.rows, row)
        print(json.dumps(row), file=sys.stderr)
        del lm
    if args.json:
        for r in rows:
            print(json.dumps(r))
        return 0
    print(f"\n{args.model}, calibration {args.calib_samples} x {args.seqlen} {args.calib_corpus} tokens "
          f"(seed {args.seed}), {args.epochs} epochs for learned methods, evaluation "
          f"{'first ' + str(args.limit) if args.limit else 'all'} windows of {args.seqlen} wiki tokens of each "
          f"split, on {budget.get('device', 'cpu')}\n")
    heads = " | ".join(f"ppl {sp} | ratio {sp}" for sp in args.splits)
    print(f"| scheme | method | rotate | {heads} | quantize (s) | steps |")
    print("|---|---|---|" + "---|---|" * len(args.splits) + "---|---|")
    order = {m: i for i, m in enumerate(["fp", "rtn", "smoothquant", *LEARNED])}
    for r in sorted(rows, key=lambda r: (r["scheme"] != "fp", r["scheme"], order.get(r["method"], 99),
                                         r.get("rotate", "none"))):
        cells = []
        for sp in args.splits:
            if r.get("diverged"):
                cells.append("diverged | -")
            else:
                ratio = r.get(f"ratio_{sp}")
                cells.append(f"{r[f'ppl_{sp}']:.2f} | {f'{ratio:.3f}' if ratio else '-'}")
        print(f"| {r['scheme']} | {r['method']} | {r.get('rotate', 'none')} | {' | '.join(cells)} | "
              f"{r['quantize_s']:.0f} | {r['steps'] or '-'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
