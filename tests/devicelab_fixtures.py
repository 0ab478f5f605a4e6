"""A tiny export folder for devicelab tests, written until (and besides) the real exporter: the same
contract as ``quant.export`` (devicelab/exported.py), at toy size.

``make_tiny_export(path)`` writes a one-layer decoder (token + position embedding, single-head attention
with a causal mask, a ReLU FFN, an LM head) as two opset-21 QDQ ONNX graphs, quantized by onnxruntime's
own QNN-oriented static quantizer: uint8 per-tensor asymmetric activations, int8 symmetric weights, the
K/V cache as uint8 with one encoding shared by both graphs (pinned through tensor overrides, so prefill's
``k_out`` and decode's ``k_cache`` read the same grid). Graph inputs and outputs are exactly the contract's:

* prefill: ``input_ids`` (1, T) int64 -> ``logits`` (1, T, V) float32, ``k_out``/``v_out`` (1, 1, T, D) uint8;
* decode: ``input_ids``/``position_ids`` (1, 1) int64, ``k_cache``/``v_cache`` (1, 1, ctx, D) uint8,
  ``attention_bias`` (1, ctx + 1) float32 -> ``logits`` (1, 1, V), ``k_out``/``v_out`` (1, 1, 1, D) uint8.

Weights come from a fixed seed, so two calls write identical graphs (and the same ``content_hash``).
``slow=True`` widens the model (hidden 512, vocabulary 4096) so that it really runs several times slower:
regression tests compare the two. Building either takes well under a second.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 21
KV_SCALE, KV_ZERO_POINT = 4.0 / 255.0, 128  # the shared cache grid: [-2.0, 2.0] in 255 steps


@dataclass(frozen=True)
class TinyDims:
    vocab: int
    hidden: int
    head_dim: int
    ffn: int
    prompt_len: int
    ctx: int


FAST = TinyDims(vocab=512, hidden=64, head_dim=32, ffn=128, prompt_len=16, ctx=64)
SLOW = TinyDims(vocab=4096, hidden=512, head_dim=128, ffn=1024, prompt_len=16, ctx=64)


def _weights(d: TinyDims, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)

    def w(*shape, scale=1.0):
        return (rng.standard_normal(shape) * scale / np.sqrt(shape[0])).astype(np.float32)

    return {"emb": (rng.standard_normal((d.vocab, d.hidden)) * 0.5).astype(np.float32),
            "pos": (rng.standard_normal((d.ctx + 1, d.hidden)) * 0.1).astype(np.float32),
            "wq": w(d.hidden, d.head_dim), "wk": w(d.hidden, d.head_dim), "wv": w(d.hidden, d.head_dim),
            "wo": w(d.head_dim, d.hidden), "w1": w(d.hidden, d.ffn), "w2": w(d.ffn, d.hidden, scale=0.5),
            "wlm": w(d.hidden, d.vocab)}


def _const(name: str, arr) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(arr), name)


def _block(nodes: list, inits: list, d: TinyDims, h0: str, keys: str, values: str, mask: str | None,
           bias: str | None, q_len: int, kv_len: int) -> None:
    """Attention of ``q_len`` queries over ``kv_len`` keys (in the cache's 4-D layout (1, 1, S, D)),
    residual, FFN, residual, LM head -> logits."""
    n = nodes.append
    inits += [_const("q_shape", np.array([1, 1, q_len, d.head_dim], np.int64)),
              _const("attn_shape", np.array([1, q_len, d.head_dim], np.int64)),
              _const("inv_sqrt_d", np.array(1.0 / np.sqrt(d.head_dim), np.float32))]
    n(helper.make_node("MatMul", [h0, "wq"], ["q"]))
    n(helper.make_node("Reshape", ["q", "q_shape"], ["q4"]))
    n(helper.make_node("Transpose", [keys], ["kT"], perm=[0, 1, 3, 2]))
    n(helper.make_node("MatMul", ["q4", "kT"], ["scores"]))
    n(helper.make_node("Mul", ["scores", "inv_sqrt_d"], ["scores_scaled"]))
    last = "scores_scaled"
    if mask is not None:
        n(helper.make_node("Add", [last, mask], ["scores_masked"]))
        last = "scores_masked"
    if bias is not None:
        inits.append(_const("bias_shape", np.array([1, 1, 1, kv_len], np.int64)))
        n(helper.make_node("Reshape", [bias, "bias_shape"], ["bias_4d"]))
        n(helper.make_node("Add", [last, "bias_4d"], ["scores_biased"]))
        last = "scores_biased"
    n(helper.make_node("Softmax", [last], ["probs"], axis=-1))
    n(helper.make_node("MatMul", ["probs", values], ["attn4"]))
    n(helper.make_node("Reshape", ["attn4", "attn_shape"], ["attn"]))
    n(helper.make_node("MatMul", ["attn", "wo"], ["attn_out"]))
    n(helper.make_node("Add", [h0, "attn_out"], ["h1"]))
    n(helper.make_node("MatMul", ["h1", "w1"], ["ffn_up"]))
    n(helper.make_node("Relu", ["ffn_up"], ["ffn_act"]))
    n(helper.make_node("MatMul", ["ffn_act", "w2"], ["ffn_out"]))
    n(helper.make_node("Add", ["h1", "ffn_out"], ["h2"]))
    n(helper.make_node("MatMul", ["h2", "wlm"], ["logits"]))


def _prefill_float(d: TinyDims, wts: dict) -> onnx.ModelProto:
    T, D = d.prompt_len, d.head_dim
    nodes, inits = [], [_const(k, v) for k, v in wts.items()]
    inits += [_const("positions", np.arange(T, dtype=np.int64)[None, :]),
              _const("causal", np.triu(np.full((T, T), -30.0, np.float32), 1)[None, None]),
              _const("kv_shape", np.array([1, 1, T, D], np.int64))]
    nodes += [helper.make_node("Gather", ["emb", "input_ids"], ["tok_emb"]),
              helper.make_node("Gather", ["pos", "positions"], ["pos_emb"]),
              helper.make_node("Add", ["tok_emb", "pos_emb"], ["h0"]),
              helper.make_node("MatMul", ["h0", "wk"], ["k"]),
              helper.make_node("MatMul", ["h0", "wv"], ["v"]),
              helper.make_node("Reshape", ["k", "kv_shape"], ["k_out"]),
              helper.make_node("Reshape", ["v", "kv_shape"], ["v_out"])]
    _block(nodes, inits, d, "h0", "k_out", "v_out", "causal", None, T, T)
    graph = helper.make_graph(
        nodes, "tiny_prefill",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, T])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, T, d.vocab]),
         helper.make_tensor_value_info("k_out", TensorProto.FLOAT, [1, 1, T, D]),
         helper.make_tensor_value_info("v_out", TensorProto.FLOAT, [1, 1, T, D])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=10)


def _decode_float(d: TinyDims, wts: dict) -> onnx.ModelProto:
    C, D = d.ctx, d.head_dim
    nodes, inits = [], [_const(k, v) for k, v in wts.items()]
    inits.append(_const("kv_shape", np.array([1, 1, 1, D], np.int64)))
    nodes += [helper.make_node("Gather", ["emb", "input_ids"], ["tok_emb"]),
              helper.make_node("Gather", ["pos", "position_ids"], ["pos_emb"]),
              helper.make_node("Add", ["tok_emb", "pos_emb"], ["h0"]),
              helper.make_node("MatMul", ["h0", "wk"], ["k"]),
              helper.make_node("MatMul", ["h0", "wv"], ["v"]),
              helper.make_node("Reshape", ["k", "kv_shape"], ["k_out"]),
              helper.make_node("Reshape", ["v", "kv_shape"], ["v_out"]),
              helper.make_node("Concat", ["k_cache", "k_out"], ["k_all"], axis=2),
              helper.make_node("Concat", ["v_cache", "v_out"], ["v_all"], axis=2)]
    _block(nodes, inits, d, "h0", "k_all", "v_all", None, "attention_bias", 1, C + 1)
    cache = [1, 1, C, D]
    graph = helper.make_graph(
        nodes, "tiny_decode",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, 1]),
         helper.make_tensor_value_info("position_ids", TensorProto.INT64, [1, 1]),
         helper.make_tensor_value_info("k_cache", TensorProto.FLOAT, cache),
         helper.make_tensor_value_info("v_cache", TensorProto.FLOAT, cache),
         helper.make_tensor_value_info("attention_bias", TensorProto.FLOAT, [1, C + 1])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 1, d.vocab]),
         helper.make_tensor_value_info("k_out", TensorProto.FLOAT, [1, 1, 1, D]),
         helper.make_tensor_value_info("v_out", TensorProto.FLOAT, [1, 1, 1, D])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=10)


class _Reader:
    """Calibration feeds for onnxruntime's static quantizer (a CalibrationDataReader)."""

    def __init__(self, feeds: list[dict]):
        self._it = iter(feeds)

    def get_next(self):
        return next(self._it, None)


def _calibration(d: TinyDims, graph: str, n: int = 8) -> list[dict]:
    rng = np.random.default_rng(1)
    out = []
    for _ in range(n):
        if graph == "prefill":
            out.append({"input_ids": rng.integers(0, d.vocab, (1, d.prompt_len)).astype(np.int64)})
        else:
            cache = lambda: rng.uniform(-2.0, 2.0, (1, 1, d.ctx, d.head_dim)).astype(np.float32)  # noqa: E731
            out.append({"input_ids": rng.integers(0, d.vocab, (1, 1)).astype(np.int64),
                        "position_ids": np.array([[d.prompt_len]], np.int64),
                        "k_cache": cache(), "v_cache": cache(),
                        "attention_bias": np.zeros((1, d.ctx + 1), np.float32)})
    return out


def _quantize(model: onnx.ModelProto, d: TinyDims, graph: str, kv_tensors: list[str]) -> onnx.ModelProto:
    from onnxruntime.quantization import QuantType, quantize
    from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config

    kv = {"scale": np.array(KV_SCALE, np.float32), "zero_point": np.array(KV_ZERO_POINT, np.uint8)}
    overrides = {t: [dict(kv)] for t in kv_tensors}
    with tempfile.TemporaryDirectory(prefix="tiny-export-") as tmp:
        src, dst = Path(tmp) / "float.onnx", Path(tmp) / "qdq.onnx"
        onnx.save(model, src)
        cfg = get_qnn_qdq_config(str(src), _Reader(_calibration(d, graph)), activation_type=QuantType.QUInt8,
                                 weight_type=QuantType.QInt8, init_overrides=overrides)
        quantize(str(src), str(dst), cfg)
        return onnx.load(dst)


def _uint8_cache_io(model: onnx.ModelProto, inputs: list[str], outputs: list[str]) -> onnx.ModelProto:
    """Make the cache tensors uint8 at the graph boundary, as on the device: an input feeds its
    DequantizeLinear directly (its QuantizeLinear goes), an output is its QuantizeLinear's result."""
    g = model.graph
    for name in inputs:
        q = next(nd for nd in g.node if nd.op_type == "QuantizeLinear" and nd.input[0] == name)
        for nd in g.node:
            for i, x in enumerate(nd.input):
                if x == q.output[0]:
                    nd.input[i] = name
        g.node.remove(q)
        vi = next(v for v in g.input if v.name == name)
        vi.type.tensor_type.elem_type = TensorProto.UINT8
    for name in outputs:  # Q -> DQ -> name (-> consumers): the Q's result becomes the output
        dq = next(nd for nd in g.node if nd.op_type == "DequantizeLinear" and nd.output[0] == name)
        q_out = dq.input[0]
        for nd in g.node:
            nd.input[:] = [f"{name}_dequantized" if x == name else name if x == q_out else x for x in nd.input]
            nd.output[:] = [f"{name}_dequantized" if x == name else name if x == q_out else x for x in nd.output]
        vo = next(v for v in g.output if v.name == name)
        vo.type.tensor_type.elem_type = TensorProto.UINT8
    onnx.checker.check_model(model)
    return model


def _encodings(model: onnx.ModelProto) -> dict:
    """AIMET-format encodings read off the QDQ graph (offset = -zero_point, AIMET's convention)."""
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    acts, params = {}, {}
    for nd in model.graph.node:
        if nd.op_type not in ("QuantizeLinear", "DequantizeLinear") or nd.input[1] not in inits:
            continue
        scale = inits[nd.input[1]]
        zp = inits[nd.input[2]] if len(nd.input) > 2 else np.zeros_like(scale, np.uint8)
        tensor = nd.input[0] if nd.op_type == "QuantizeLinear" else nd.output[0]
        bits = 8 * zp.dtype.itemsize
        entries = [{"bitwidth": bits, "scale": float(s), "offset": -int(z), "dtype": "int",
                    "is_symmetric": str(bool(zp.dtype.kind == "i" and int(z) == 0))}
                   for s, z in zip(np.atleast_1d(scale), np.atleast_1d(zp))]
        if nd.op_type == "DequantizeLinear" and nd.input[0] in inits:
            params[nd.output[0]] = entries  # the float tensor the folded graph (devicelab.qdq) holds
        elif nd.op_type == "QuantizeLinear":
            acts[tensor] = entries
    return {"version": "0.6.1", "activation_encodings": acts, "param_encodings": params}


def _spec(name: str, shape: list, dtype: str, **extra) -> dict:
    return {"name": name, "shape": shape, "dtype": dtype, **extra}


def make_tiny_export(path: Path, *, slow: bool = False) -> Path:
    """Write a tiny export folder at ``path`` (created; must not hold an export already) and return it."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    d = SLOW if slow else FAST
    wts = _weights(d)
    T, C, D, V = d.prompt_len, d.ctx, d.head_dim, d.vocab
    kv_enc = {"scale": KV_SCALE, "offset": -KV_ZERO_POINT, "bitwidth": 8}
    prefill = _uint8_cache_io(_quantize(_prefill_float(d, wts), d, "prefill", ["k", "v"]), [], ["k_out", "v_out"])
    decode = _uint8_cache_io(_quantize(_decode_float(d, wts), d, "decode", ["k_cache", "v_cache", "k", "v"]),
                             ["k_cache", "v_cache"], ["k_out", "v_out"])
    digest = hashlib.sha256()
    for name, model in (("prefill", prefill), ("decode", decode)):
        blob = model.SerializeToString()
        digest.update(blob)
        (path / f"{name}.onnx").write_bytes(blob)
        (path / f"{name}.encodings").write_text(json.dumps(_encodings(model), indent=1))
    index = {
        "exporter": "mqfarm-onnx", "exporter_version": 1,
        "artifact_hash": "tiny-slow" if slow else "tiny", "content_hash": digest.hexdigest()[:16],
        "model": "tiny-qdq-slow" if slow else "tiny-qdq", "scheme": "w8a8", "method": "rtn", "opset": OPSET,
        "vocab_size": V, "num_layers": 1, "kv_heads": 1, "head_dim": D, "add_bos": False,
        "kv_encoding": {"k": kv_enc, "v": kv_enc},
        "graphs": {
            "prefill": {"file": "prefill.onnx", "encodings": "prefill.encodings", "prompt_len": T,
                        "inputs": [_spec("input_ids", [1, T], "int64")],
                        "outputs": [_spec("logits", [1, T, V], "float32"),
                                    _spec("k_out", [1, 1, T, D], "uint8", encoding=kv_enc),
                                    _spec("v_out", [1, 1, T, D], "uint8", encoding=kv_enc)]},
            "decode": {"file": "decode.onnx", "encodings": "decode.encodings", "ctx": C, "prompt_len": T,
                       "inputs": [_spec("input_ids", [1, 1], "int64"), _spec("position_ids", [1, 1], "int64"),
                                  _spec("k_cache", [1, 1, C, D], "uint8", encoding=kv_enc),
                                  _spec("v_cache", [1, 1, C, D], "uint8", encoding=kv_enc),
                                  _spec("attention_bias", [1, C + 1], "float32")],
                       "outputs": [_spec("logits", [1, 1, V], "float32"),
                                   _spec("k_out", [1, 1, 1, D], "uint8", encoding=kv_enc),
                                   _spec("v_out", [1, 1, 1, D], "uint8", encoding=kv_enc)]}},
    }
    (path / "export.json").write_text(json.dumps(index, indent=2))
    return path


def copy_export(src: Path, dst: Path, **index_changes) -> Path:
    """A copy of an export folder with fields of export.json replaced (bad-input tests)."""
    shutil.copytree(src, dst)
    index = json.loads((dst / "export.json").read_text())
    index.update(index_changes)
    (dst / "export.json").write_text(json.dumps(index, indent=2))
    return dst


def tiny_exporter(artifact_dir: str, out_dir: Path, prefill: int, ctx: int, device_table: bool = False) -> Path:
    """The device stage's export step for tests (``farm.orchestrate.sweep.Options.exporter``): the tiny export in place
    of the trial's real model, until tests run the real exporter on every trial."""
    return make_tiny_export(Path(out_dir))


RUNTIME = Path(__file__).parent / "data" / "adb_runtime"


def qnn_sdk_root(path: Path, htp_arch: str = "75", omit: tuple[str, ...] = ()) -> Path:
    """A QNN SDK root laid out as QAIRT ships it, holding the 8 files a phone run needs for ``htp_arch``:
    the test qnn-net-run / qnn-profile-viewer (tests/data/adb_runtime) and stand-in libraries. ``omit``:
    SDK-relative paths to leave out (missing-file tests)."""
    from devicelab.qnn_sdk import sdk_files

    path = Path(path)
    for rel in sdk_files(htp_arch):
        if rel in omit:
            continue
        dst = path / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        src = RUNTIME / Path(rel).name
        if src.is_file():
            shutil.copy(src, dst)
        else:
            dst.write_bytes(b"\x7fELF stand-in for " + Path(rel).name.encode())
    return path


def compiled_tiny_export(path: Path, target: str = "sm8650") -> Path:
    """The tiny export compiled for ``target`` by the real onnxruntime-qnn HTP compiler (a few seconds)."""
    from devicelab.compile import compile_export

    export = make_tiny_export(Path(path))
    compile_export(export, target, progress=False)
    return export


SDK_HOST = Path(__file__).parent / "data" / "qnn_sdk_host"


def sdk_host_tools(folder: Path) -> Path:
    """The QNN SDK's host tools as stand-ins (tests/data/qnn_sdk_host), run by this interpreter: a folder to
    put first on PATH for the qnn-sdk compile route."""
    import sys

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for src in SDK_HOST.iterdir():
        text = src.read_text().split("\n", 1)[1]
        (folder / src.name).write_text(f"#!{sys.executable}\n{text}")
        (folder / src.name).chmod(0o755)
    return folder
