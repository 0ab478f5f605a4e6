"""Cost of one MobileQuant training step relative to a plain float forward+backward on the same tokens.

    python bench/step_overhead.py                     # SmolLM2, W8A8, 1 x 512 tokens
    python bench/step_overhead.py --layers 8 --seqlen 256 --repeats 5 --json
    python bench/step_overhead.py --train-float 16bit # 16-bit sites unquantized while training
    python bench/step_overhead.py --device cuda --profile 15   # on a GPU, with the 15 costliest ops
    python bench/step_overhead.py --ablate minmax     # also the step with torch's min and max for LWC

With ``MQFARM_CUDA_GRAPHS=1`` on a GPU the quantized step is replayed from a CUDA graph, as training then
runs it (``quant.graphs``); the eager step and a graphed plain step are timed too, so the ratio can be read
like for like.

The quantized step is the real one (``E2ETrainer.step``: every decoder layer with LET reparametrised
weights, LWC weight ranges recomputed, learnable activation ranges, MSE on the last hidden state, backward,
AdamW update). The plain step is the same stack in float with every weight trainable, MSE against the same
target, backward. Both run interleaved in one process; the ratio of medians is printed (aim: <= 1.5).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from quant import CalibConfig, data, load_model
from quant.layers import LayerRunner
from quant.learn import attach
from quant.methods import MethodContext, mobilequant, omniquant
from quant.sim import float_mode, simulate
from quant.graphs import GraphedLoss, graphs_enabled
from quant.train import E2ETrainer, freeze_model, make_optimizer
from quant.zoo import resolve_device


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--scheme", default="w8a8")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--train-float", default="", help="TrainConfig.train_float: roles, or 16bit")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="also profile two quantized steps and print the N ops with the most self time")
    p.add_argument("--ablate", default="", choices=["", "minmax"],
                   help="also time the MobileQuant step without one speed-up, interleaved: minmax = LWC's row "
                        "min/max by torch (two passes) instead of the fused kernel (one)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    lm = load_model(args.model, num_layers=args.layers, device=device)
    calib = CalibConfig(samples=4, seqlen=args.seqlen)
    windows = data.calibration_windows(lm.tokenizer, calib.samples, calib.seqlen, calib.seed,
                                       add_bos=lm.add_bos).to(device)
    simulate(lm.model, args.scheme)
    cfg = mobilequant.MobileQuantConfig(epochs=1, train_float=args.train_float)
    omniquant.initialise(lm.model, windows, cfg, MethodContext(lm=lm, calib=calib, progress=False))
    trainer = E2ETrainer(lm.model, windows, cfg, MethodContext(progress=False))
    ids = windows[:1]
    with torch.no_grad(), float_mode(lm.model):
        target = trainer.runner.stack(trainer.runner.embed(ids))
    learn = attach(lm.model, None, cfg.pairs, cfg.let, cfg.lwc, cfg.lrl, cfg.lwc_init)
    freeze_model(lm.model, learn)
    opt = make_optimizer(learn, cfg)

    plain = load_model(args.model, num_layers=args.layers, device=device).model
    plain.train(False)
    for prm in plain.parameters():
        prm.requires_grad_(True)
    prunner = LayerRunner(plain)

    def plain_step(loss_fn):
        plain.zero_grad(set_to_none=True)
        loss_fn(ids, target).backward()

    def plain_loss(i, t):
        return F.mse_loss(prunner.stack(prunner.embed(i)), t)

    steps = {"plain": lambda: plain_step(plain_loss), "mobilequant_eager": lambda: trainer.step(opt, ids, target)}
    if args.ablate == "minmax":
        from quant import kernels

        def without_minmax():
            kernels.MINMAX = False
            try:
                trainer.step(opt, ids, target)
            finally:
                kernels.MINMAX = True
        steps["mobilequant_torch_minmax"] = without_minmax
    graphs = graphs_enabled(device)
    if graphs:
        # as training runs it with graphs on (quant.graphs), and a plain step given the same help
        plain_graphed = GraphedLoss(plain_loss, plain.parameters(), device, steps=10**9)
        graphed_trainer = E2ETrainer(lm.model, windows, cfg, MethodContext(progress=False))
        graphed_trainer.use_graphs(learn, steps=10**9)
        steps["plain_graphed"] = lambda: plain_step(plain_graphed)
        steps["mobilequant"] = lambda: graphed_trainer.step(opt, ids, target)
    for fn in steps.values():  # warm-up: kernels, captured layer arguments; the second call captures a graph
        fn(), fn()
    times = {k: [] for k in steps}
    for _ in range(args.repeats):
        for name, fn in steps.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    trained = "mobilequant" if graphs else "mobilequant_eager"
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=acts) as prof:
            for _ in range(2):
                steps[trained]()
            sync()
        key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=key, row_limit=args.profile), file=sys.stderr)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.profile), file=sys.stderr)
    ratio = med[trained] / med["plain"]
    res = {"model": args.model, "layers": lm.num_layers, "scheme": args.scheme, "tokens": ids.numel(),
           "plain_step_s": round(med["plain"], 4), "mobilequant_step_s": round(med[trained], 4),
           "ratio": round(ratio, 3), "cuda_graphs": graphs,
           "mobilequant_eager_step_s": round(med["mobilequant_eager"], 4),
           "eager_ratio": round(med["mobilequant_eager"] / med["plain"], 3),
           "train_float": args.train_float, "repeats": args.repeats, "threads": torch.get_num_threads(),
           "device": str(device), "learnables": learn.counts()}
    if args.ablate:
        res["ablated_step_s"] = round(med["mobilequant_torch_minmax"], 4)
        res["ablated_ratio"] = round(med["mobilequant_torch_minmax"] / med["plain"], 3)
    if graphs:
        res["plain_graphed_step_s"] = round(med["plain_graphed"], 4)
        res["graphed_ratio"] = round(med["mobilequant"] / med["plain_graphed"], 3)
    if args.json:
        print(json.dumps(res))
    else:
        print(f"{args.model} ({lm.num_layers} layers), {args.scheme}, 1 x {args.seqlen} tokens, on {device}, "
              f"{torch.get_num_threads()} threads, median of {args.repeats}"
              + (f", training with {args.train_float} in float" if args.train_float else ""))
        print(f"plain float forward+backward: {res['plain_step_s']:.4f} s")
        if graphs:
            print(f"  the same from a CUDA graph:  {res['plain_graphed_step_s']:.4f} s")
            print(f"MobileQuant step, eager:      {res['mobilequant_eager_step_s']:.4f} s "
                  f"(ratio {res['eager_ratio']:.2f})")
            print(f"MobileQuant step, CUDA graph: {res['mobilequant_step_s']:.4f} s "
                  f"(as training runs it; {res['graphed_ratio']:.2f} against the graphed plain step)")
        else:
            print(f"MobileQuant training step:    {res['mobilequant_step_s']:.4f} s")
        if args.ablate:
            print(f"without the {args.ablate} speed-up:  {res['ablated_step_s']:.4f} s (ratio {res['ablated_ratio']:.2f})")
        print(f"ratio: {ratio:.2f} (aim <= 1.5)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
