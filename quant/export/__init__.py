"""The deployable export: an artifact (or a simulated model in memory) as ONNX QDQ graphs + encodings.

``export_artifact(ARTIFACT, OUT)`` (``farm export``) writes the folder whose contract is in
``devicelab/exported.py``: ``prefill.onnx`` and ``decode.onnx`` (opset 23, QuantizeLinear/
DequantizeLinear at every quantizer of the scheme, integer weights), their AIMET encodings, the tokenizer,
and ``export.json``. The folder is written into a temporary sibling and renamed at the end, so a failed
export leaves nothing behind. Requires the ``onnx`` package (the ``device`` extra), imported lazily so
``import quant`` stays light.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

EXPORTER = "mqfarm-onnx"
EXPORTER_VERSION = 1
EXTERNAL_DATA_BYTES = 1_800_000_000  # protobuf's hard limit is 2 GiB; above this, weights go to a .data file


class ExportFolderError(ValueError):
    """The export cannot be written (bad arguments, existing folder); nothing was written."""


def _onnx():
    try:
        import onnx
    except ImportError:
        raise ExportFolderError("exporting needs the onnx package: pip install -e '.[device]'") from None
    return onnx


def _check_args(model, prefill: int, ctx: int) -> None:
    limit = int(getattr(model.config, "max_position_embeddings", 0) or 0)
    if prefill < 1:
        raise ExportFolderError(f"--prefill must be at least 1 token, got {prefill}")
    if ctx < prefill:
        raise ExportFolderError(f"--ctx {ctx} is shorter than the prefill prompt ({prefill} tokens)")
    if limit and ctx + 1 > limit:
        raise ExportFolderError(f"--ctx {ctx} is above the model's context: max_position_embeddings is {limit}, "
                                f"so the cache holds at most {limit - 1} positions")


def build_graphs(model, prefill: int = 128, ctx: int = 1024, graphs=("prefill", "decode")):
    """The ONNX models in memory: ``{name: (onnx.ModelProto, io, qdq_sites)}``."""
    _onnx()
    from .decoder import DecoderExporter

    _check_args(model, prefill, ctx)
    exporter = DecoderExporter(model, prefill=prefill, ctx=ctx)
    out = {}
    for name in graphs:
        b, io = exporter.build(name)
        out[name] = (b.model(doc=f"mqfarm {name} graph"), io, b.qdq_sites)
    return out, exporter


def _save_onnx(model_proto, path: Path) -> list[str]:
    onnx = _onnx()
    size = sum(len(t.raw_data) for t in model_proto.graph.initializer)
    if size > EXTERNAL_DATA_BYTES:
        onnx.save_model(model_proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=1024)
        return [path.name, path.name + ".data"]
    onnx.save_model(model_proto, str(path))
    return [path.name]


def export_model(model, tokenizer, out_dir: str | Path, recipe: dict, *, prefill: int = 128, ctx: int = 1024,
                 overwrite: bool = False, progress: bool = True) -> Path:
    """Write the export folder for a simulated (or float) model in memory; see the module docstring."""
    from ..artifact import recipe_hash
    from ..files import atomic_folder, sha256_file
    from . import aimet

    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise ExportFolderError(f"export folder {out} already exists; pass --overwrite to replace it")
    scheme = getattr(model, "mq_scheme", None)
    graphs, exporter = build_graphs(model, prefill, ctx)
    from .graph import OPSET as opset
    with atomic_folder(out) as tmp:
        index = {
            "exporter": EXPORTER, "exporter_version": EXPORTER_VERSION, "opset": opset,
            "artifact_hash": recipe.get("content_hash") or recipe_hash(recipe), "model": recipe.get("model", ""),
            "scheme": scheme.name if scheme is not None else "fp", "method": recipe.get("method", "none"),
            "layers": recipe.get("layers"), "vocab_size": exporter.vocab, "num_layers": len(exporter.layers),
            "kv_heads": exporter.n_kv, "head_dim": exporter.head_dim, "hidden_size": exporter.hidden,
            "add_bos": bool(recipe.get("add_bos", False)), "prefill": prefill, "ctx": ctx,
            "kv_encoding": ({"k": exporter.kv[0].to_dict(), "v": exporter.kv[1].to_dict()} if exporter.kv else None),
            "graphs": {}, "files": {},
        }
        for name, (proto, io, sites) in graphs.items():
            files = _save_onnx(proto, tmp / f"{name}.onnx")
            extra = {}
            for o in io["outputs"] if exporter.kv else ():  # the cache outputs carry the shared KV encodings
                if "encoding" in o:
                    extra[o["name"]] = aimet.kv_entry(exporter.kv[0] if o["name"].startswith("k") else exporter.kv[1])
            for i in io["inputs"] if exporter.kv else ():
                if i["name"] in ("k_cache", "v_cache"):
                    extra[i["name"]] = aimet.kv_entry(exporter.kv[0] if i["name"] == "k_cache" else exporter.kv[1])
            (tmp / f"{name}.encodings").write_text(json.dumps(aimet.encodings(sites, extra, proto.graph), indent=1))
            entry = {"file": f"{name}.onnx", "encodings": f"{name}.encodings", **io,
                     "quantized_tensors": len(sites), "nodes": len(proto.graph.node)}
            entry["prompt_len" if name == "prefill" else "ctx"] = prefill if name == "prefill" else ctx
            index["graphs"][name] = entry
            for f in files + [f"{name}.encodings"]:
                index["files"][f] = {"bytes": (tmp / f).stat().st_size, "sha256": sha256_file(tmp / f)}
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp / "tokenizer")
        index["content_hash"] = hashlib.sha256(json.dumps(
            {k: v for k, v in index.items() if k != "files"} | {"files": {k: v["sha256"] for k, v in index["files"].items()}},
            sort_keys=True, default=str).encode()).hexdigest()[:16]
        (tmp / "export.json").write_text(json.dumps(index, indent=2, sort_keys=True, default=str))
    return out


def export_artifact(artifact_dir: str | Path, out_dir: str | Path | None = None, *, prefill: int = 128,
                    ctx: int = 1024, overwrite: bool = False, progress: bool = True, device_table: bool = False) -> Path:
    """Export a saved artifact (``farm export ARTIFACT --out DIR``); default folder ``ARTIFACT.export``
    (``ARTIFACT.device.export`` with ``device_table``: the artifact under its scheme + ``:device``, see
    ``quant.device_table``)."""
    from .. import artifact

    suffix = ".device.export" if device_table else ".export"
    out = Path(out_dir) if out_dir else Path(str(Path(artifact_dir)).rstrip("/") + suffix)
    if out.exists() and not overwrite:  # before loading the model
        raise ExportFolderError(f"export folder {out} already exists; pass --overwrite to replace it")
    if device_table:
        from ..device_table import to_device_table

        lm = to_device_table(artifact_dir, progress=progress)
    else:
        lm = artifact.load(artifact_dir)
    recipe = dict(lm.recipe, add_bos=lm.add_bos)
    return export_model(lm.model, lm.tokenizer, out, recipe, prefill=prefill, ctx=ctx, overwrite=overwrite,
                        progress=progress)
