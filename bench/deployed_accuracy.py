"""Accuracy as deployed: one artifact's perplexity as simulated, under the device table, and as its exported
graphs compute it on onnxruntime's CPU and on the QNN HTP emulator, on the same windows, with the logits'
top-1 agreement between them.

    python bench/deployed_accuracy.py ARTIFACT [--prefill 512] [--windows 16] [--htp-windows 2] [--fp64]
                                      [--out FILE]

Columns (per-window NLLs and argmaxes are kept, so every column is also reported on the HTP's windows alone):
  sim          the artifact's simulated model (``farm eval ARTIFACT``)
  device sim   its scheme + the device table (``farm eval ARTIFACT --device-table``); the same as sim, and
               left out, when the artifact was made under ``:device``
  sim fp64     (``--fp64``) the device simulation in float64: the same codes but where a float32 rounding
               lands on the other side of a rounding boundary, so its top-1 against the float32 simulation
               is the agreement any implementation that is not bit-exact can expect
  onnx         its export on onnxruntime CPU (``farm export`` + ``farm eval EXPORT --runtime onnx``); left out
               under ``:device`` as above
  onnx device  the device-table export on onnxruntime CPU
  qnn-htp      the device-table export on the QNN HTP emulator (``--runtime qnn-htp``), first --htp-windows
Exports are written beside the artifact (``ARTIFACT.p<prefill>.export``, ``.device.p<prefill>.export``)
and reused. Each window's NLL and running top-1 go to stderr as they come (the emulator takes minutes per
window), ``--out`` appends one JSON row per artifact.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TOP1_PAIRS = (("qnn-htp", "onnx device"), ("onnx device", "device sim"), ("qnn-htp", "device sim"),
              ("sim fp64", "device sim"))


def run_column(fn, windows, label: str, ref: list | None = None) -> tuple[list[float], list[torch.Tensor]]:
    """Per-window summed NLL and argmax of ``fn`` (ids (1, T) -> logits); ``ref``: argmaxes to report
    the running top-1 against in the progress line."""
    from quant.eval.perplexity import window_nll

    nll, top = [], []
    for i, w in enumerate(windows):
        t0 = time.perf_counter()
        seen = {}

        def keep(ids, seen=seen):
            seen["logits"] = fn(ids)
            return seen["logits"]

        nll.append(float(window_nll(keep, w[None])[0]))
        top.append(seen["logits"][0].argmax(-1))
        msg = f"  {label} window {i + 1}/{len(windows)}: nll {nll[-1]:.2f}, {time.perf_counter() - t0:.1f}s"
        if ref is not None:
            msg += f", top-1 so far {agreement(top, ref[:len(top)]):.4f}"
        print(msg, file=sys.stderr, flush=True)
    return nll, top


def agreement(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    n = min(len(a), len(b))
    return sum(int((x == y).sum()) for x, y in zip(a[:n], b[:n])) / sum(int(x.numel()) for x in a[:n])


def ppl(values: list[float], tokens_per_window: int) -> float:
    return math.exp(sum(values) / (len(values) * tokens_per_window))


def module_fn(model):
    return lambda ids: model(input_ids=ids, use_cache=False).logits


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("artifact")
    p.add_argument("--prefill", type=int, default=512)
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--htp-windows", type=int, default=2)
    p.add_argument("--fp64", action="store_true", help="also the device simulation in float64 (the chaos floor)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    from devicelab.runtime import logits_fn
    from quant import artifact, data
    from quant.device_table import to_device_table
    from quant.export import export_artifact

    art = Path(args.artifact)
    recipe = artifact.read_recipe(art)
    on_device = str(recipe.get("scheme", "")) == _device_name(recipe.get("scheme", ""))
    exports = {"onnx device": art.with_name(f"{art.name}.device.p{args.prefill}.export")}
    if not on_device:
        exports["onnx"] = art.with_name(f"{art.name}.p{args.prefill}.export")
    for key, path in exports.items():
        if not (path / "export.json").exists():
            export_artifact(art, path, prefill=args.prefill, ctx=args.prefill + 64, overwrite=True,
                            device_table=key == "onnx device", progress=False)
    t_start = time.perf_counter()
    seconds: dict[str, float] = {}
    cols: dict[str, list[float]] = {}
    tops: dict[str, list[torch.Tensor]] = {}

    def column(key, fn, wins, ref=None):
        t0 = time.perf_counter()
        cols[key], tops[key] = run_column(fn, wins, key, tops.get(ref) if ref else None)
        seconds[key] = round(time.perf_counter() - t0, 1)

    if on_device:
        dev = artifact.load(art)
    else:
        lm = artifact.load(art)
        windows = data.eval_windows(lm.tokenizer, args.prefill, limit=args.windows, add_bos=lm.add_bos)
        column("sim", module_fn(lm.model), windows)
        del lm
        dev = to_device_table(art, progress=False)
    windows = data.eval_windows(dev.tokenizer, args.prefill, limit=args.windows, add_bos=dev.add_bos)
    column("device sim", module_fn(dev.model), windows)
    if args.fp64:
        model64 = dev.model.double()
        column("sim fp64", lambda ids: module_fn(model64)(ids).float(), windows, ref="device sim")
    del dev
    for key, path in exports.items():
        fn, _ = logits_fn(path, "onnx")
        column(key, lambda ids, fn=fn: torch.from_numpy(fn(ids.numpy())), windows, ref="device sim")
    if args.htp_windows:
        fn, _ = logits_fn(exports["onnx device"], "qnn-htp")
        column("qnn-htp", lambda ids: torch.from_numpy(fn(ids.numpy())), windows[:args.htp_windows], ref="onnx device")
    t = args.prefill - 1
    h = args.htp_windows
    row = {"artifact": str(art), "scheme": recipe.get("scheme"), "method": recipe.get("method"),
           "prefill": args.prefill, "windows": len(windows), "htp_windows": h, "nll": cols, "seconds": seconds,
           "total_seconds": round(time.perf_counter() - t_start, 1),
           "ppl": {k: ppl(v, t) for k, v in cols.items() if k != "qnn-htp"},
           "ppl_on_htp_windows": {k: ppl(v[:h], t) for k, v in cols.items()} if h else {},
           "top1": {f"{a} vs {b}": agreement(tops[a], tops[b]) for a, b in TOP1_PAIRS if a in tops and b in tops},
           "top1_on_htp_windows": {f"{a} vs {b}": agreement(tops[a][:h], tops[b][:h]) for a, b in TOP1_PAIRS
                                   if a in tops and b in tops} if h else {}}
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")
    print(f"{row['scheme']} {row['method']}: " + ", ".join(f"{k} {v:.2f}" for k, v in row["ppl"].items())
          + f"  ({len(windows)} windows of {args.prefill})")
    if h:
        print(f"  on the first {h}: " + ", ".join(f"{k} {v:.2f}" for k, v in row["ppl_on_htp_windows"].items()))
        print("  top-1 on those windows: " + ", ".join(f"{k} {v:.4f}" for k, v in row["top1_on_htp_windows"].items()))
    return 0


def _device_name(scheme: str) -> str:
    from quant.device_table import device_scheme_name

    return device_scheme_name(scheme) if scheme and scheme != "fp" else ""


if __name__ == "__main__":
    sys.exit(main())
