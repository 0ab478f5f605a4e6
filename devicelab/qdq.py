"""Folding QDQ pairs out of an exported graph: the float graph that AIMET-style tools quantize themselves.

``qnn-onnx-converter --quantization_overrides`` and AI Hub's ``.aimet`` folders take a *float* ONNX model
plus encodings keyed by its tensor names. The export's encodings are keyed by the float tensors its QDQ
pairs quantize (``quant/export/graph.py``), so removing the pairs gives exactly that graph:

* activation ``X -> QuantizeLinear -> DequantizeLinear -> consumers`` becomes ``X -> consumers``;
* a weight ``W.q (integer initializer) -> DequantizeLinear -> W`` becomes the float initializer ``W``
  holding the dequantized values (the quantized weights, so the encodings reproduce them exactly);
* integer graph inputs/outputs (the uint8 KV cache) become float ones, the cache encodings' tensors.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _dequant(q: np.ndarray, scale: np.ndarray, zp: np.ndarray, axis: int) -> np.ndarray:
    q = q.astype(np.float32)
    if scale.size > 1:
        shape = [1] * q.ndim
        shape[axis] = -1
        scale, zp = scale.reshape(shape), zp.reshape(shape)
    return ((q - zp.astype(np.float32)) * scale.astype(np.float32)).astype(np.float32)


def strip_qdq(src: str | Path, dst: str | Path):
    """Write the float graph of ``src`` to ``dst`` (external data beside it when large); returns the model."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(src))
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    producers = {o: n for n in g.node for o in n.output}
    rename: dict[str, str] = {}  # dequantized tensor -> float tensor it stands for
    drop, new_inits = set(), []
    for n in g.node:
        if n.op_type != "DequantizeLinear":
            continue
        src_t = n.input[0]
        axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
        if src_t in inits:  # a weight: fold to float
            arr = _dequant(numpy_helper.to_array(inits[src_t]), numpy_helper.to_array(inits[n.input[1]]),
                           numpy_helper.to_array(inits[n.input[2]]) if len(n.input) > 2 else np.zeros(1), axis)
            new_inits.append(numpy_helper.from_array(arr, n.output[0]))
            drop.add(id(n))
            continue
        prod = producers.get(src_t)
        if prod is not None and prod.op_type == "QuantizeLinear":
            rename[n.output[0]] = prod.input[0]
            drop.add(id(n))
            drop.add(id(prod))
        elif prod is None:  # an integer graph input: the input itself becomes float
            rename[n.output[0]] = src_t
            drop.add(id(n))
    # a QuantizeLinear that produces a graph output (the cache): the output becomes its float input
    outputs = {o.name for o in g.output}
    out_rename = {}
    for n in g.node:
        if n.op_type == "QuantizeLinear" and n.output[0] in outputs:
            out_rename[n.output[0]] = n.input[0]
            drop.add(id(n))

    def resolve(name: str) -> str:
        while name in rename:
            name = rename[name]
        return name

    kept = []
    for n in g.node:
        if id(n) in drop:
            continue
        for i, name in enumerate(n.input):
            n.input[i] = resolve(name)
        kept.append(n)
    # graph outputs keep their names: an Identity from the float tensor
    for o in g.output:
        if o.name in out_rename:
            kept.append(helper.make_node("Identity", [resolve(out_rename[o.name])], [o.name], name=f"{o.name}.from_float"))
            o.type.tensor_type.elem_type = TensorProto.FLOAT
    for i in g.input:
        if i.type.tensor_type.elem_type in (TensorProto.UINT8, TensorProto.INT8, TensorProto.UINT16, TensorProto.INT16):
            i.type.tensor_type.elem_type = TensorProto.FLOAT
    # onnxruntime refuses a graph with two nodes of one name; the folded Q/DQ pairs' consumers can end up
    # sharing a name with the Identity nodes added above, or with each other where the exporter reused one
    seen: set[str] = set()
    for n in kept:
        if not n.name:
            continue
        name, k = n.name, 1
        while name in seen:
            name, k = f"{n.name}.{k}", k + 1
        n.name = name
        seen.add(name)
    used = {x for n in kept for x in n.input}
    keep_inits = [t for t in g.initializer if t.name in used] + [t for t in new_inits if t.name in used]
    del g.node[:]
    g.node.extend(kept)
    del g.initializer[:]
    g.initializer.extend(keep_inits)
    size = sum(len(t.raw_data) for t in keep_inits)
    dst = Path(dst)
    onnx.save_model(model, str(dst), save_as_external_data=size > 1_800_000_000, all_tensors_to_one_file=True,
                    location=dst.name + ".data")
    return model
