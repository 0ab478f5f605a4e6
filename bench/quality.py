"""The headline quality table: every method at the same calibration budget, perplexity and ratio to FP.

    python bench/quality.py                                  # SmolLM2, W8A8 and W4A8, all methods, full corpus
    python bench/quality.py --limit 100 --rows runs/q.jsonl  # resumable: finished rows are skipped on rerun
    python bench/quality.py --model gemma3-270m --schemes w8a8 --methods fp rtn smoothquant mobilequant
    python bench/quality.py --hp mobilequant.lwc_lr=5e-3 --hp omniquant.epochs=4
    python bench/quality.py --device cuda --eval-batch 16          # on a GPU

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
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        device = resolve_device(args.device)
    except ValueError as e:
        raise SystemExit(f"--device: {e}") from None
    hp = _parse_hp(args.hp)
    calib = CalibConfig(args.calib_samples, args.seqlen, args.seed)
    budget = {"model": args.model, "layers": args.layers, "calib_samples": args.calib_samples,
              "seqlen": args.seqlen, "epochs": args.epochs, "seed": args.seed, "limit": args.limit}
    if device.type != "cpu":  # GPU kernels round differently: CPU and GPU rows are not mixed
        budget["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    print(f"# budget: {json.dumps(budget)}  hp: {json.dumps(hp)}", file=sys.stderr)

    def same_run(r):  # a row is reused only if the budget and every hyper-parameter match
        return r.get("budget") == budget and r.get("config") == _full_config(r["method"], hp, args.epochs)

    done = {(r["scheme"], r["method"]): r for r in rowfile.read(args.rows, same_run)}
    rows = list(done.values())
    fp_ppl = next((r["ppl"] for r in rows if r["method"] == "fp"), None)
    plan = [("fp", "fp")] if "fp" in args.methods else []
    plan += [(s, m) for s in args.schemes for m in args.methods if m != "fp"]
    for scheme, method in plan:
        if (scheme, method) in done:
            print(f"{scheme}/{method}: in {args.rows}, skipped", file=sys.stderr)
            continue
        overrides = _overrides(method, hp, args.epochs)
        lm = load_model(args.model, num_layers=args.layers, device=device)
        t0 = time.perf_counter()
        common = {"scheme": scheme, "method": method, "budget": budget, "hp": hp.get(method, {}),
                  "config": _full_config(method, hp, args.epochs)}
        try:
            if method == "fp":
                res = quantize(lm, "fp")
            else:
                res = quantize(lm, scheme, method, calib, method_config=method_config(method, overrides))
        except TrainingDiverged as e:
            res, diverged = None, str(e)
        q_s = round(time.perf_counter() - t0, 1)
        if res is None:
            row = {**common, "ppl": None, "ratio_to_fp": None, "diverged": diverged, "quantize_s": q_s,
                   "steps": None}
        else:
            ppl = evaluate_perplexity(lm, args.seqlen, limit=args.limit, batch_size=args.eval_batch)
            if method == "fp":
                fp_ppl = ppl.ppl
            info = res.recipe.get("method_info", {})
            row = {**common, "ppl": round(ppl.ppl, 3),
                   "ratio_to_fp": round(ppl.ppl / fp_ppl, 4) if fp_ppl else None, "quantize_s": q_s,
                   "eval_s": round(ppl.seconds, 1), "windows": ppl.windows, "steps": info.get("steps"),
                   "train_loss": (info.get("epoch_losses") or [None])[-1] if "epoch_losses" in info
                   else info.get("final_mse")}
        rows.append(row)
        rowfile.append(args.rows, row)
        print(json.dumps(row), file=sys.stderr)
        del lm
    if args.json:
        for r in rows:
            print(json.dumps(r))
        return 0
    print(f"\n{args.model}, calibration {args.calib_samples} x {args.seqlen} news tokens (seed {args.seed}), "
          f"{args.epochs} epochs for learned methods, evaluation "
          f"{'first ' + str(args.limit) if args.limit else 'all'} windows of {args.seqlen} wiki tokens, "
          f"on {budget.get('device', 'cpu')}\n")
    print("| scheme | method | perplexity | ratio to FP | quantize (s) | steps |")
    print("|---|---|---|---|---|---|")
    order = {m: i for i, m in enumerate(["fp", "rtn", "smoothquant", *LEARNED])}
    for r in sorted(rows, key=lambda r: (r["scheme"] != "fp", r["scheme"], order.get(r["method"], 99))):
        ratio = f"{r['ratio_to_fp']:.3f}" if r["ratio_to_fp"] else "-"
        ppl = "diverged" if r.get("diverged") else f"{r['ppl']:.2f}"
        print(f"| {r['scheme']} | {r['method']} | {ppl} | {ratio} | {r['quantize_s']:.0f} | "
              f"{r['steps'] or '-'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
