"""`farm export` and `farm compile`: from an artifact to what a phone loads; and `farm eval EXPORT`.

    farm export runs/w8a8-rtn [--prefill 128] [--ctx 1024]   # as the phone runs it -> runs/w8a8-rtn.device.export
    farm export runs/w8a8-rtn --no-device-table              # the artifact's own scheme -> runs/w8a8-rtn.export
    farm compile runs/w8a8-rtn.device.export --target sm8650 # -> .../compiled-sm8650/
    farm eval runs/w8a8-rtn.device.export --runtime onnx     # perplexity of the exported graph (ORT CPU)
    farm eval runs/w8a8-rtn.device.export --runtime qnn-htp --limit 8   # on the QNN HTP emulator

``quant`` writes the export, ``devicelab`` compiles and runs it; this module only joins them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .printing import report


def add_commands(sub) -> dict:
    e = sub.add_parser("export", help="write an artifact's deployable ONNX QDQ graphs (prefill, decode) + encodings")
    e.add_argument("artifact", help="artifact folder written by `farm quantize`")
    e.add_argument("--out", default=None, help="export folder (default: ARTIFACT.export)")
    e.add_argument("--prefill", type=int, default=128, help="prompt length of the prefill graph (tokens)")
    e.add_argument("--ctx", type=int, default=1024, help="KV-cache positions of the decode graph")
    e.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    e.add_argument("--device-table", action=argparse.BooleanOptionalAction, default=None,
                   help="what the phone runs (the default for a quantized artifact, -> ARTIFACT.device.export): the "
                        "artifact's scheme plus the device overrides (16-bit residual stream, norms, final norm, "
                        "down_proj input and logits, 8-bit lm_head, symmetric per-channel weights), learned ranges "
                        "kept, new ones calibrated; --no-device-table: the artifact's own scheme (-> ARTIFACT.export), "
                        "which the HTP refuses where it has asymmetric per-channel weights")

    c = sub.add_parser("compile", help="compile an export for a Snapdragon NPU (QNN context binary)")
    c.add_argument("export", help="export folder written by `farm export`")
    c.add_argument("--target", default="sm8650",
                   help="sm8650 (Snapdragon 8 Gen 3, default), sm8550 (8 Gen 2), sm8450, or soc_model=N,htp_arch=V")
    c.add_argument("--out", default=None, help="compiled folder (default: EXPORT/compiled-TARGET)")
    c.add_argument("--route", default="ort", choices=["ort", "qnn-sdk"],
                   help="ort: onnxruntime-qnn's HTP compiler (default); qnn-sdk: the QNN SDK tools on PATH")
    c.add_argument("--graphs", default=None, help="comma-separated graphs to compile (default: all)")
    c.add_argument("--allow-cpu-fallback", action="store_true",
                   help="compile what the HTP takes and leave the rest on the CPU (listed in compile.json)")
    c.add_argument("--overwrite", action="store_true", help="replace the compiled folder if it exists")
    c.add_argument("--json", action="store_true", help="print compile.json")
    return {"export": cmd_export, "compile": cmd_compile}


def cmd_export(args) -> int:
    from quant.export import export_artifact
    from quant.files import check_replaceable

    device = args.device_table
    if device is None:  # the phone's table unless asked otherwise; a float model has none
        from quant.artifact import read_recipe

        device = read_recipe(args.artifact).get("scheme", "fp") != "fp"
    suffix = ".device.export" if device else ".export"
    dest = Path(args.out) if args.out else Path(str(Path(args.artifact)).rstrip("/") + suffix)
    check_replaceable(dest, args.overwrite, "export folder")  # before loading: only an export of ours is replaced
    out = export_artifact(args.artifact, args.out, prefill=args.prefill, ctx=args.ctx, overwrite=args.overwrite,
                          device_table=device)
    index = json.loads((out / "export.json").read_text())
    sizes = sum(f["bytes"] for f in index["files"].values())
    print(f"wrote {out}: {', '.join(index['graphs'])} graphs, scheme {index['scheme']}, "
          f"{sizes / 1e6:.1f} MB, content hash {index['content_hash']}")
    return 0


def cmd_compile(args) -> int:
    from devicelab.compile import compile_export
    from quant.files import check_replaceable

    if args.out:  # the default lives inside the export folder; a folder of the user's is never replaced
        check_replaceable(Path(args.out), args.overwrite, "compiled folder")

    graphs = tuple(g.strip() for g in args.graphs.split(",")) if args.graphs else None
    out = compile_export(args.export, args.target, args.out, graphs=graphs, route=args.route,
                         allow_cpu_fallback=args.allow_cpu_fallback, overwrite=args.overwrite,
                         progress=not args.json)
    record = json.loads((out / "compile.json").read_text())
    if args.json:
        print(json.dumps(record, sort_keys=True))
        return 0
    for g, info in record["graphs"].items():
        cpu = f", {len(info['cpu_nodes'])} nodes on the CPU" if info["cpu_nodes"] else ""
        print(f"{g}: {info['context_binary']} ({info['context_binary_bytes'] / 1e6:.1f} MB){cpu}")
    print(f"wrote {out} for {record['target']['name']} ({record['target']['description']})")
    return 0


def is_export(path: str | None) -> bool:
    return bool(path) and (Path(path) / "export.json").is_file()


def eval_export(args, progress: bool) -> int:
    """`farm eval EXPORT --runtime onnx|qnn-htp`: perplexity of the deployed graph, same windows and path."""
    import torch
    from transformers import AutoTokenizer

    from devicelab.exported import read_export
    from devicelab.runtime import logits_fn
    from quant import data
    from quant.eval.perplexity import perplexity

    exp = read_export(args.artifact)
    if args.suite:
        raise ValueError("--suite runs on the simulated model only: lm-eval needs logits for any length, an "
                         "export has a fixed prompt length")
    runtime = args.runtime or "onnx"
    try:
        fn, info = logits_fn(exp, runtime)
    except Exception as e:  # a graph onnxruntime cannot load (damaged at the same size): its message, one line
        if type(e).__module__.split(".")[0] != "onnxruntime":
            raise
        raise ValueError("onnxruntime: " + " ".join(str(e).split())) from None
    seqlen = info["prompt_len"]
    if args.seqlen and args.seqlen != seqlen:
        raise ValueError(f"the export's prefill graph takes {seqlen} tokens; re-export with --prefill {args.seqlen}")
    tok = AutoTokenizer.from_pretrained(str(exp.root / "tokenizer"))
    windows = data.eval_windows(tok, seqlen, args.corpus, limit=args.limit, add_bos=bool(exp.index.get("add_bos")))

    def logits(ids: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(fn(ids.cpu().numpy()))

    res = perplexity(logits, windows, corpus=args.corpus if args.corpus in data.CORPORA else "custom",
                     progress=progress)
    label = {"model": exp.index.get("model"), "scheme": exp.index.get("scheme"), "method": exp.index.get("method"),
             "runtime": runtime}
    report(label, res, args.json, {"export": str(exp.root), "export_hash": exp.content_hash})
    return 0
