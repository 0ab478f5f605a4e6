"""Reading an export folder (written by ``quant.export``; devicelab never imports quant, so the contract
is this file's docstring and ``EXPORTER`` / ``SUPPORTED_VERSIONS``).

Layout::

    EXPORT/
      export.json            the index below
      prefill.onnx           T-token prompt -> logits, K/V for the cache    (+ prefill.onnx.data if > 2 GB)
      decode.onnx            1 token + uint8 KV cache of ctx positions -> logits, new K/V
      prefill.encodings      AIMET-format encodings keyed by the graph's tensor names
      decode.encodings
      compiled-<target>/     written by ``farm compile``: EPContext ONNX + QNN context binary + compile.json

``export.json``::

    {"exporter": "mqfarm-onnx", "exporter_version": 1, "artifact_hash": "...", "content_hash": "...",
     "model": "smollm2-135m", "scheme": "w8a8", "method": "rtn", "opset": 21,
     "vocab_size": 49152, "num_layers": 30, "kv_heads": 3, "head_dim": 64, "add_bos": false,
     "kv_encoding": {"k": {...}, "v": {...}},          # the shared uint8 cache encodings
     "graphs": {
       "prefill": {"file": "prefill.onnx", "encodings": "prefill.encodings", "prompt_len": 128,
                   "inputs":  [{"name": "input_ids", "shape": [1, 128], "dtype": "int64"}],
                   "outputs": [{"name": "logits", "shape": [1, 128, 49152], "dtype": "float32"},
                               {"name": "k_out", "shape": [30, 3, 128, 64], "dtype": "uint8",
                                "encoding": {"scale": .., "offset": .., "bitwidth": 8}}, ...]},
       "decode":  {"file": "decode.onnx", ..., "ctx": 1024,
                   "inputs": [input_ids (1,1) int64, position_ids (1,1) int64,
                              k_cache / v_cache (L, H_kv, ctx, D) uint8, attention_bias (1, ctx + 1) float32]}}}

Workloads need only this index: inputs are synthesized from names, shapes and dtypes (token ids below
``vocab_size``, zeros elsewhere), so any backend can run any export without knowing the model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .export_checks import ExportCheckError, check_export

EXPORTER = "mqfarm-onnx"
SUPPORTED_VERSIONS = (1,)


class ExportError(ValueError):
    """An export folder is missing, malformed or from an exporter this devicelab does not know."""


@dataclass(frozen=True)
class GraphSpec:
    name: str  # prefill | decode
    path: Path
    inputs: list
    outputs: list
    meta: dict

    def synthetic_inputs(self, vocab_size: int, seed: int = 0) -> dict[str, np.ndarray]:
        """Deterministic inputs of the right names, shapes and dtypes: token ids, position ids, zero caches."""
        rng = np.random.default_rng(seed)
        out = {}
        for spec in self.inputs:
            shape, dtype = tuple(spec["shape"]), np.dtype(spec["dtype"])
            if spec["name"] == "input_ids":
                out[spec["name"]] = rng.integers(0, vocab_size, size=shape).astype(dtype)
            elif spec["name"] == "position_ids":
                out[spec["name"]] = np.full(shape, self.meta.get("prompt_len", 128), dtype=dtype)
            else:
                out[spec["name"]] = np.zeros(shape, dtype=dtype)
        return out


@dataclass(frozen=True)
class Export:
    root: Path
    index: dict

    @property
    def content_hash(self) -> str:
        return self.index.get("content_hash", "")

    @property
    def vocab_size(self) -> int:
        return int(self.index["vocab_size"])

    def graph(self, name: str) -> GraphSpec:
        graphs = self.index.get("graphs", {})
        if name not in graphs:
            raise ExportError(f"{self.root}: export has no {name!r} graph (has {sorted(graphs)})")
        g = graphs[name]
        path = self.root / g["file"]
        if not path.is_file():
            raise ExportError(f"{self.root}: {name} graph file {g['file']} is missing")
        return GraphSpec(name, path, g["inputs"], g["outputs"], g)


def read_export(path: str | Path) -> Export:
    root = Path(path)
    index_path = root / "export.json"
    if not index_path.is_file():
        raise ExportError(f"{root} is not an export folder: no export.json (write one with `farm export ARTIFACT`)")
    try:
        index = json.loads(index_path.read_text())
    except json.JSONDecodeError as e:
        raise ExportError(f"{index_path}: not valid JSON: {e}") from None
    if index.get("exporter") != EXPORTER:
        raise ExportError(f"{index_path}: exporter {index.get('exporter')!r} is not {EXPORTER!r}")
    version = index.get("exporter_version")
    if version not in SUPPORTED_VERSIONS:
        raise ExportError(f"{index_path}: exporter_version {version!r} is not one this devicelab reads "
                          f"({', '.join(map(str, SUPPORTED_VERSIONS))}); re-export with this version of the farm")
    try:  # sizes, the encodings' hashes and values: a damaged export is refused before it runs or compiles
        check_export(root, index)
    except ExportCheckError as e:
        raise ExportError(str(e)) from None
    return Export(root, index)
