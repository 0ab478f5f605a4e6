"""`farm diff EXPORT --runtime qnn-htp`: which layer breaks on the NPU.

    farm diff runs/w8a8-rtn.device.export --runtime qnn-htp [--artifact runs/w8a8-rtn] [--windows 2]
              [--threshold 10] [--json]

Every quantized tensor of the prefill graph on the QNN HTP emulator against onnxruntime's CPU, and, with
``--artifact``, against the simulation (the artifact under the export's scheme, the device table where the
export has it): SQNR in dB per tensor and per layer (its worst tensor), the logits' top-1 agreement, and
the first tensor in graph order below ``--threshold``. The captures are ``devicelab.divergence``'s; the join
with the simulation (quantizer outputs by tensor name) is here, because devicelab does not import quant.
"""

from __future__ import annotations

import json
import math
from pathlib import Path


def add_commands(sub) -> dict:
    d = sub.add_parser("diff", help="per-layer, per-tensor SQNR of an export on the QNN HTP emulator vs the CPU "
                                    "and the simulation; names the first layer below a threshold")
    d.add_argument("export", help="export folder written by `farm export` and compiled by `farm compile`")
    d.add_argument("--runtime", default="qnn-htp", choices=["qnn-htp"], help="the runtime to check (the NPU's)")
    d.add_argument("--artifact", default=None, help="the artifact the export was made from: adds the simulation")
    d.add_argument("--windows", type=int, default=2, help="evaluation windows (the emulator is slow: ~40 s per "
                                                          "128-token window on SmolLM2's 30 layers)")
    d.add_argument("--threshold", type=float, default=10.0, help="SQNR (dB) below which a tensor is broken")
    d.add_argument("--json", action="store_true")
    return {"diff": cmd_diff}


def _simulation(artifact: str, scheme: str):
    from quant import artifact as art
    from quant.device_table import device_scheme_name, to_device_table

    recipe = art.read_recipe(artifact)
    if recipe.get("scheme") == scheme:
        return art.load(artifact)
    if recipe.get("scheme", "fp") != "fp" and device_scheme_name(recipe["scheme"]) == scheme:
        return to_device_table(artifact, progress=False)
    raise ValueError(f"--artifact {artifact} has scheme {recipe.get('scheme')!r} but the export has {scheme!r}: "
                     "give the artifact the export was made from")


def _sim_capture(lm, names: set[str]):
    """The simulated model's quantizer outputs by tensor name, and its logits, for one window."""
    import torch

    from quant.sim import quantizers

    got: dict = {}
    hooks = []
    for name, q in quantizers(lm.model, "act").items():
        if name in names:
            hooks.append(q.register_forward_hook(
                lambda _m, _a, out, name=name: got.__setitem__(name, out.detach().float().cpu().numpy().copy())))

    def run(ids):
        got.clear()
        with torch.no_grad():
            logits = lm.model(input_ids=torch.as_tensor(ids).reshape(1, -1), use_cache=False).logits
        return dict(got, logits=logits.float().numpy())

    return run, hooks


def cmd_diff(args) -> int:
    from devicelab.backends.qnn_sim import qnn_ep_devices
    from devicelab.divergence import Agreement, Capture, compiled_targets
    from devicelab.exported import read_export

    from ..work.measure import eval_windows

    exp = read_export(args.export)
    if not compiled_targets(exp.root):
        raise ValueError(f"{exp.root} has no compiled graph: run `farm compile {exp.root}` first (it says whether "
                         "the HTP takes every node)")
    if args.windows < 1:
        raise ValueError(f"--windows must be at least 1, got {args.windows}")
    qnn_ep_devices()  # onnxruntime-qnn missing: its error says what to install
    windows = eval_windows(exp, args.windows)
    cpu = Capture(exp, "onnx")
    htp = Capture(exp, "qnn-htp", names=cpu.names)
    pairs = {"htp_vs_cpu": Agreement("onnx", "qnn-htp")}
    sim = hooks = None
    if args.artifact:
        lm = _simulation(args.artifact, str(exp.index.get("scheme")))
        sim, hooks = _sim_capture(lm, set(cpu.names))
        pairs["htp_vs_sim"] = Agreement("sim", "qnn-htp")
        pairs["cpu_vs_sim"] = Agreement("sim", "onnx")
    try:
        for ids in windows:
            c, h = cpu(ids), htp(ids)
            pairs["htp_vs_cpu"].add(c, h)
            if sim is not None:
                s = sim(ids)
                pairs["htp_vs_sim"].add(s, h)
                pairs["cpu_vs_sim"].add(s, c)
    finally:
        for hk in hooks or ():
            hk.remove()
    out = {k: v.summary(args.threshold) for k, v in pairs.items()}
    record = {"export": str(exp.root), "export_hash": exp.content_hash, "scheme": exp.index.get("scheme"),
              "windows": len(windows), "prompt_len": cpu.prompt_len, **out}
    if args.json:
        print(json.dumps(_finite(record)))
        return 0
    print(f"{exp.root}: {exp.index.get('scheme')}, {len(windows)} window(s) of {cpu.prompt_len} tokens, "
          f"{len(cpu.names)} quantized tensors")
    for key, s in out.items():
        first = s["first_below"]
        where = (f"first below {args.threshold:g} dB: {first['tensor']} ({first['sqnr_db']:.1f} dB)" if first
                 else f"no tensor below {args.threshold:g} dB")
        print(f"\n{key.replace('_', ' ')}: logits top-1 {s['top1']:.3f}; {where}")
        for r in s["layers"]:
            label = "model" if r["layer"] is None else f"layer {r['layer']:>2}"
            print(f"  {label}  worst {r['sqnr_db']:6.1f} dB  {r['tensor']}")
    return 0


def _finite(x):
    """JSON has no infinity: an SQNR of exact agreement is written as null."""
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return None if isinstance(x, float) and not math.isfinite(x) else x
