"""qnn-net-run's inputs for an export's graph: raw files and one input list per graph, from ``export.json``.

* **prefill**: real token ids (the caller's windows of evaluation text: devicelab imports no quant, so the
  caller tokenizes), one input-list line per window;
* **decode**: one step at position ``T`` after a real prefill of the first ``T`` tokens of a window, run
  here on onnxruntime's CPU: its uint8 ``k_out`` / ``v_out`` fill cache slots ``0..T-1``, the
  attention bias opens those slots and the new token's slot ``ctx`` (the exporter's convention).

Files are float32, qnn-net-run's default input format (it quantizes each input with the tensor's own
encoding, so a dequantized uint8 cache comes back to the same codes), so every raw file is
``4 x numel`` bytes of its graph input: :func:`expected_bytes` is what the stand-in and the tests hold the
files to. Lines are ``name:=file`` pairs (the documented form that does not depend on input order).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .exported import Export, read_export
from .protocol import DeviceError

NEG = float(np.finfo(np.float32).min)


@dataclass
class GraphInputs:
    graph: str
    list_file: str  # name of the input list, relative to the folder
    files: list  # raw file names, in the folder
    lines: int  # inferences described (one per window)
    feeds: list  # the numpy feeds of each line (for scoring against onnxruntime)


def expected_bytes(spec: dict) -> int:
    """Bytes of one input as a float32 raw file (qnn-net-run's default input format)."""
    return int(np.prod(spec["shape"])) * 4


def zero_point(enc: dict) -> float:
    """The uint8 zero point of a cache encoding: AIMET's ``offset`` is its negative; the exporter's own
    entries also carry ``aimet_offset`` (and then ``offset`` is the zero point itself)."""
    return -float(enc["aimet_offset"]) if "aimet_offset" in enc else -float(enc["offset"])


def _dequant(q: np.ndarray, enc: dict) -> np.ndarray:
    return ((q.astype(np.float32) - zero_point(enc)) * float(enc["scale"])).astype(np.float32)


def cache_encoding(export: Export, graph: str, name: str) -> dict | None:
    spec = next(i for i in export.graph(graph).inputs + export.graph(graph).outputs if i["name"] == name)
    if "encoding" in spec:
        return spec["encoding"]
    kv = export.index.get("kv_encoding") or {}
    key = {"k_cache": "k", "v_cache": "v", "k_out": "k", "v_out": "v"}.get(name)
    return kv.get(key) if key else None


def prefill_feeds(export: Export, windows: np.ndarray) -> list[dict]:
    spec = export.graph("prefill")
    t = int(spec.meta.get("prompt_len", spec.inputs[0]["shape"][1]))
    ids = np.asarray(windows, dtype=np.int64)
    if ids.ndim != 2 or ids.shape[1] != t:
        raise DeviceError(f"{export.root}: the prefill graph takes windows of {t} token ids, got shape {ids.shape}")
    if ids.min() < 0 or ids.max() >= export.vocab_size:
        raise DeviceError(f"{export.root}: token ids must lie in [0, {export.vocab_size}), got [{ids.min()}, {ids.max()}]")
    return [{"input_ids": w[None]} for w in ids]


def decode_feeds(export: Export, windows: np.ndarray) -> list[dict]:
    """One decode step per window, after a real prefill of the window (onnxruntime CPU)."""
    from .runtime import cpu_eval_session

    pre = prefill_feeds(export, windows)
    spec = export.graph("decode")
    ctx = int(spec.meta["ctx"])
    shapes = {i["name"]: i["shape"] for i in spec.inputs}
    t = pre[0]["input_ids"].shape[1]
    if t >= ctx:
        raise DeviceError(f"{export.root}: a {t}-token prefill does not leave a free slot in the {ctx}-position cache")
    sess = cpu_eval_session(export.graph("prefill").path)
    names = [o.name for o in sess.get_outputs()]
    out = []
    for f in pre:
        got = dict(zip(names, sess.run(None, f)))
        kc, vc = np.zeros(shapes["k_cache"], np.uint8), np.zeros(shapes["v_cache"], np.uint8)
        kc[..., :t, :], vc[..., :t, :] = got["k_out"], got["v_out"]
        bias = np.full(shapes["attention_bias"], NEG, np.float32)
        bias[0, :t] = 0.0
        bias[0, ctx] = 0.0
        nxt = int(f["input_ids"][0, -1])  # the window's last token again: any real token serves for timing
        out.append({"input_ids": np.array([[nxt]], np.int64), "position_ids": np.array([[t]], np.int64),
                    "k_cache": kc, "v_cache": vc, "attention_bias": bias})
    return out


def to_float_raw(export: Export, graph: str, name: str, value: np.ndarray) -> np.ndarray:
    """The float32 values qnn-net-run reads for input ``name`` (a uint8 cache dequantized with its encoding)."""
    spec = next(i for i in export.graph(graph).inputs if i["name"] == name)
    enc = cache_encoding(export, graph, name) if spec["dtype"] == "uint8" else None
    if spec["dtype"] == "uint8" and enc is None:
        raise DeviceError(f"{export.root}: {graph} input {name} is uint8 but export.json gives it no encoding")
    return _dequant(value, enc) if enc is not None else np.asarray(value, dtype=np.float32)


def write_inputs(export: str | Path | Export, graph: str, windows: np.ndarray, folder: str | Path,
                 remote_dir: str) -> GraphInputs:
    """Raw files and ``<graph>_input_list.txt`` in ``folder`` (paths in the list are ``remote_dir/<file>``:
    where they will be on the phone)."""
    exp = export if isinstance(export, Export) else read_export(export)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    feeds = prefill_feeds(exp, windows) if graph == "prefill" else decode_feeds(exp, windows)
    specs = exp.graph(graph).inputs
    files, lines = [], []
    for k, f in enumerate(feeds):
        entries = []
        for spec in specs:
            raw = to_float_raw(exp, graph, spec["name"], f[spec["name"]])
            if raw.size * 4 != expected_bytes(spec):
                raise DeviceError(f"{graph} input {spec['name']}: {raw.size * 4} bytes, the graph takes "
                                  f"{expected_bytes(spec)}")
            name = f"{graph}_{k}_{spec['name']}.raw"
            raw.astype("<f4").tofile(folder / name)
            files.append(name)
            entries.append(f"{spec['name']}:={remote_dir}/{name}")
        lines.append(" ".join(entries))
    list_file = f"{graph}_input_list.txt"
    (folder / list_file).write_text("\n".join(lines) + "\n")
    return GraphInputs(graph, list_file, files, len(lines), feeds)


def output_bytes(export: Export, graph: str) -> int:
    """Bytes of one inference's outputs as qnn-net-run writes them by default (float32)."""
    return sum(int(np.prod(o["shape"])) * 4 for o in export.graph(graph).outputs)
