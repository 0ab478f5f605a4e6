"""Where the QNN HTP emulator departs from the QDQ graph: every quantized tensor of an export's prefill graph,
run by onnxruntime's CPU provider and by the HTP backend of onnxruntime-qnn, compared one by one.

    python bench/htp_divergence.py EXPORT [--match model.layers.0.] [--json]

Prints, in graph order, each dequantized tensor whose name contains ``--match`` (default: every layer's
residual outputs) with the relative L2 difference HTP vs CPU. The graph is run on the HTP in-session (no
compile step), with CPU fallback off. Slow: the emulator takes about 40 s for SmolLM2's 30 layers at 128
tokens, and compiles every run.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("export")
    p.add_argument("--match", default=None, help="substring of the tensors to compare (default: residual outputs)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    import onnx

    from devicelab.exported import read_export
    from devicelab.runtime import cpu_eval_session, htp_session

    exp = read_export(args.export)
    spec = exp.graph("prefill")
    feeds = spec.synthetic_inputs(exp.vocab_size)
    model = onnx.load(str(spec.path))
    quantized = {n.output[0] for n in model.graph.node if n.op_type == "QuantizeLinear"}
    names = [n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in quantized]
    if args.match:
        names = [n for n in names if args.match in n]
    else:
        names = [n for n in names if n.endswith((".attn_residual.dq", ".output.dq")) and ".mlp." not in n
                 and ".self_attn." not in n and "layernorm" not in n]
    for n in names:
        model.graph.output.append(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "debug.onnx"
        onnx.save(model, str(path), save_as_external_data=True, location="debug.onnx.data")
        runs = []
        for sess in (cpu_eval_session(path), htp_session(path)):
            runs.append(dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds))))
    rows = []
    for n in names:
        a, b = runs[0][n], runs[1][n]
        rows.append({"tensor": n, "rel_l2": float(np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-30)),
                     "max_abs": float(np.abs(a - b).max()), "min": float(a.min()), "max": float(a.max())})
    logits = runs[0]["logits"], runs[1]["logits"]
    top1 = float((logits[0].argmax(-1) == logits[1].argmax(-1)).mean())
    if args.json:
        print(json.dumps({"export": str(exp.root), "rows": rows, "logits_top1_agreement": top1}))
        return 0
    for r in rows:
        print(f"{r['tensor']:55s} rel {r['rel_l2']:.3e}  max|d| {r['max_abs']:.3e}  range {r['min']:.1f}..{r['max']:.1f}")
    print(f"logits top-1 agreement HTP vs CPU: {top1:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
