"""What the checks on every artifact load cost: the small files' sha256 and the encodings' value checks.

    python bench/load_checks.py [--layers 30] [--rounds 5]

Writes a SmolLM2-135M W8A8 RTN artifact once (2 x 32 calibration tokens: the checks do not depend on the
ranges), then times, interleaved round by round in one process: the manifest check as every load runs it
(sizes + sha256 of the files under 64 MB) against sizes only; the encodings' value checks alone; and a whole
``quant.artifact.load`` with the checks against one with them switched off. Prints medians and the ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from quant import CalibConfig, artifact, encodings_check, files, load_model, quantize
from quant.sim import quantizers, weight_owners


def _unchecked(name, e, spec, channels=None, source=""):
    """The values as apply_encodings takes them, without a check: the baseline."""
    scale = np.asarray(e["scale"], dtype=np.float64).reshape(-1)
    return scale, np.broadcast_to(np.asarray(e["offset"], dtype=np.float64).reshape(-1), scale.shape)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        lm = load_model("smollm2-135m", num_layers=args.layers)
        res = quantize(lm, "w8a8", "rtn", CalibConfig(samples=2, seqlen=32), progress=False)
        art = artifact.save(lm.model, lm.tokenizer, Path(d) / "art", res.recipe)
        enc = json.loads((art / "encodings.json").read_text())
        stored = encodings_check.check_file(enc)
        qs = quantizers(lm.model)
        channels = {n: m.weight.shape[0] for n, m in weight_owners(lm.model).items()}
        small_bytes = files.SMALL_FILE_BYTES
        real_check = encodings_check.check_entry
        t = {k: [] for k in ("manifest", "sizes only", "encodings", "load", "load unchecked")}
        for _ in range(args.rounds):
            t["manifest"].append(timed(lambda: files.check_manifest(art, "manifest.json", full=False)))
            files.SMALL_FILE_BYTES = 0
            t["sizes only"].append(timed(lambda: files.check_manifest(art, "manifest.json", full=False)))
            files.SMALL_FILE_BYTES = small_bytes
            t["encodings"].append(timed(lambda: [real_check(n, stored[n], q.spec, channels.get(n))
                                                 for n, q in qs.items()]))
            t["load"].append(timed(lambda: artifact.load(art)))
            files.SMALL_FILE_BYTES = 0
            encodings_check.check_entry = _unchecked
            t["load unchecked"].append(timed(lambda: artifact.load(art)))
            files.SMALL_FILE_BYTES = small_bytes
            encodings_check.check_entry = real_check
        med = {k: statistics.median(v) for k, v in t.items()}
        sizes = {p.name: p.stat().st_size for p in art.iterdir()}
        print(f"{args.layers} layers, {len(stored)} quantizers, encodings.json {sizes['encodings.json'] / 1e6:.2f} MB, "
              f"{args.rounds} interleaved rounds (medians)")
        for k, v in med.items():
            print(f"  {k:15s} {v * 1e3:8.1f} ms")
        print(f"  load with checks / without: {med['load'] / med['load unchecked']:.3f}")


if __name__ == "__main__":
    main()
