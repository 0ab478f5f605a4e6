"""Accuracy on the phone: the logits the phone computed for real text, scored against the same export on
onnxruntime's CPU (``farm eval EXPORT --device NAME``).

"Is the phone's output garbage?" is answered on the phone itself: the prefill graph runs the caller's
windows of evaluation text in one qnn-net-run process, every window's ``logits`` are pulled back, and for
the same windows onnxruntime's CPU runs the export's QDQ graph. Reported: top-1 agreement over all
positions, the perplexity of the windows under each (next-token loss at positions ``0..T-2``), the mean
absolute logit difference, and the worst window.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .exported import read_export
from .protocol import DeviceError


def _nll(logits: np.ndarray, ids: np.ndarray) -> tuple[float, int]:
    x = logits[:-1].astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    lse = np.log(np.exp(x).sum(-1))
    picked = x[np.arange(len(x)), ids[1:]]
    return float((lse - picked).sum()), len(x)


def score(device_logits: list[np.ndarray], cpu_logits: list[np.ndarray], windows: np.ndarray) -> dict:
    """Top-1 agreement, perplexities and logit differences of matching (T, V) logits per window."""
    agree = total = 0
    nll_dev = nll_cpu = 0.0
    n = 0
    diffs, per_window = [], []
    for d, c, ids in zip(device_logits, cpu_logits, windows):
        a = int((d.argmax(-1) == c.argmax(-1)).sum())
        agree, total = agree + a, total + len(d)
        x, k = _nll(d, ids)
        y, _ = _nll(c, ids)
        nll_dev, nll_cpu, n = nll_dev + x, nll_cpu + y, n + k
        diffs.append(float(np.abs(d - c).mean()))
        per_window.append(a / len(d))
    return {"windows": len(windows), "positions": total, "top1_agreement": agree / total,
            "ppl_device": math.exp(nll_dev / n), "ppl_cpu": math.exp(nll_cpu / n),
            "mean_abs_logit_diff": float(np.mean(diffs)), "worst_window_top1": min(per_window)}


def evaluate_on_device(device, export_dir: str | Path, windows: np.ndarray, prepared=None) -> dict:
    """Run ``windows`` (token ids, (N, T) with T the compiled prompt length) through the phone's prefill
    and score the pulled logits against onnxruntime's CPU on the same export."""
    from .runtime import logits_fn

    export = read_export(export_dir)
    windows = np.asarray(windows, dtype=np.int64)
    prepared = prepared or device.prepare(Path(export_dir), windows=windows)
    folder, results = device.outputs(prepared, "prefill", len(windows))
    spec = next(o for o in export.graph("prefill").outputs if o["name"] == "logits")
    shape = tuple(spec["shape"])
    got = []
    for r in results:
        raw = np.fromfile(r / "logits.raw", dtype="<f4")
        if raw.size != int(np.prod(shape)):
            raise DeviceError(f"{device.name}: {r / 'logits.raw'} holds {raw.size} floats, the graph's logits "
                              f"{list(shape)} are {int(np.prod(shape))}")
        got.append(raw.reshape(shape)[0])
    run, _ = logits_fn(export, "onnx")
    cpu = [run(w[None])[0] for w in windows]
    out = score(got, cpu, windows)
    out.update(device=device.name, export_hash=export.content_hash, pulled=str(folder),
               runtime_version=prepared.runtime_version)
    return out
