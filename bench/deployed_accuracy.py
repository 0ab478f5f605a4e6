"""Accuracy as deployed: one artifact's perplexity as simulated, under the device table, and as its exported
graphs compute it on onnxruntime's CPU and on the QNN HTP emulator, on the same windows.

    python bench/deployed_accuracy.py ARTIFACT [--prefill 512] [--windows 16] [--htp-windows 2] [--out FILE]

Columns (per-window NLLs are kept, so every column is also reported on the HTP's windows alone):
  sim          the artifact's simulated model (``farm eval ARTIFACT``)
  device sim   its scheme + the device table (``farm eval ARTIFACT --device-table``)
  onnx         its export on onnxruntime CPU (``farm export`` + ``farm eval EXPORT --runtime onnx``)
  onnx device  the device-table export on onnxruntime CPU
  qnn-htp      the device-table export on the QNN HTP emulator (``--runtime qnn-htp``), first --htp-windows
Exports are written beside the artifact (``ARTIFACT.p<prefill>.export``, ``.device.p<prefill>.export``)
and reused. ``--out`` appends one JSON row per artifact.
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


def nlls(fn, windows, progress: str) -> list[float]:
    from quant.eval.perplexity import window_nll

    out = []
    for i, w in enumerate(windows):
        t0 = time.perf_counter()
        out.append(float(window_nll(fn, w[None])[0]))
        print(f"  {progress} window {i + 1}/{len(windows)}: {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
    return out


def ppl(values: list[float], tokens_per_window: int) -> float:
    return math.exp(sum(values) / (len(values) * tokens_per_window))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("artifact")
    p.add_argument("--prefill", type=int, default=512)
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--htp-windows", type=int, default=2)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    from devicelab.runtime import logits_fn
    from quant import artifact, data
    from quant.device_table import to_device_table
    from quant.export import export_artifact

    art = Path(args.artifact)
    exports = {"onnx": art.with_name(f"{art.name}.p{args.prefill}.export"),
               "onnx device": art.with_name(f"{art.name}.device.p{args.prefill}.export")}
    for key, path in exports.items():
        if not (path / "export.json").exists():
            export_artifact(art, path, prefill=args.prefill, ctx=args.prefill + 64, overwrite=True,
                            device_table=key == "onnx device", progress=False)
    lm = artifact.load(art)
    windows = data.eval_windows(lm.tokenizer, args.prefill, limit=args.windows, add_bos=lm.add_bos)
    cols: dict[str, list[float]] = {}
    cols["sim"] = nlls(lm.model, windows, "sim")
    del lm
    dev = to_device_table(art, progress=False)
    cols["device sim"] = nlls(dev.model, windows, "device sim")
    del dev
    for key, path in exports.items():
        fn, _ = logits_fn(path, "onnx")
        cols[key] = nlls(lambda ids, fn=fn: torch.from_numpy(fn(ids.numpy())), windows, key)
    if args.htp_windows:
        fn, _ = logits_fn(exports["onnx device"], "qnn-htp")
        cols["qnn-htp"] = nlls(lambda ids: torch.from_numpy(fn(ids.numpy())), windows[:args.htp_windows], "qnn-htp")
    t = args.prefill - 1
    recipe = artifact.read_recipe(art)
    row = {"artifact": str(art), "scheme": recipe.get("scheme"), "method": recipe.get("method"),
           "prefill": args.prefill, "windows": len(windows), "htp_windows": args.htp_windows, "nll": cols,
           "ppl": {k: ppl(v, t) for k, v in cols.items() if k != "qnn-htp"},
           "ppl_on_htp_windows": {k: ppl(v[:args.htp_windows], t) for k, v in cols.items()} if args.htp_windows else {}}
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")
    print(f"{row['scheme']} {row['method']}: " + ", ".join(f"{k} {v:.2f}" for k, v in row["ppl"].items())
          + f"  ({len(windows)} windows of {args.prefill})")
    if row["ppl_on_htp_windows"]:
        print(f"  on the first {args.htp_windows}: " + ", ".join(f"{k} {v:.2f}" for k, v in row["ppl_on_htp_windows"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
