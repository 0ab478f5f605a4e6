"""The residual stream's largest value per layer, before and after the rotation folded into the weights.

    python bench/residual_range.py                       # SmolLM2, hadamard, first validation window
    python bench/residual_range.py --rotate random --windows 4

Prints, for the float model and the rotated float model, the largest |h| of each layer's output (the
``output_hidden_states``) and the largest crest factor (max |h| over the root mean square of its token's
vector): what a per-tensor static range of the residual stream has to cover.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from quant import data, load_model, rotation


@torch.no_grad()
def _ranges(model, ids):
    hs = model(input_ids=ids, use_cache=False, output_hidden_states=True).hidden_states
    return ([round(float(h.abs().max()), 1) for h in hs],
            round(max(float((h.abs().amax(-1) / h.pow(2).mean(-1).sqrt()).max()) for h in hs), 2))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--rotate", default="hadamard", choices=["random", "hadamard"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--windows", type=int, default=1)
    p.add_argument("--split", default="validation", choices=["validation", "test"])
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load_model(args.model)
    ids = data.eval_windows(lm.tokenizer, 512, limit=args.windows, add_bos=lm.add_bos, split=args.split)
    before, crest_before = _ranges(lm.model, ids)
    info = rotation.rotate(lm.model, rotation.RotationConfig(args.rotate, args.seed))
    after, crest_after = _ranges(lm.model, ids)
    print(json.dumps({"model": args.model, "rotation": info, "windows": args.windows, "split": args.split,
                      "max_before": max(before), "max_after": max(after), "crest_before": crest_before,
                      "crest_after": crest_after, "per_layer_before": before, "per_layer_after": after}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
