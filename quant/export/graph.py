"""A small ONNX graph builder that knows our quantizers: nodes, constants, and QDQ pairs from encodings.

Names are the point: every tensor is named after the model's module path (``model.layers.3.mlp.down_proj``)
plus what it is (``.output``, ``.weight_q``), so a person reading the graph in Netron, a QNN log or an
AIMET encodings file can map it back to the model. A quantized site ``X`` becomes ``X`` (float) ->
QuantizeLinear -> ``X.q`` (integer) -> DequantizeLinear -> ``X.dq``; the encodings are keyed by ``X``,
the float tensor a converter such as ``qnn-onnx-converter --quantization_overrides`` sees once the QDQ
pairs are folded away.

Integer types follow the quantizer's spec: asymmetric -> unsigned (zero point = our ``offset``), symmetric
-> signed (zero point 0), at 4, 8 or 16 bits (opset 21 and later have all six).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..quantizer import QSpec

OPSET = 23  # RMSNormalization (the norm the HTP runs natively) is opset 23
IR_VERSION = 11

_INT_TYPES = {  # (bits, symmetric) -> (TensorProto type, numpy dtype used before packing)
    (4, False): (TensorProto.UINT4, np.uint8), (4, True): (TensorProto.INT4, np.int8),
    (8, False): (TensorProto.UINT8, np.uint8), (8, True): (TensorProto.INT8, np.int8),
    (16, False): (TensorProto.UINT16, np.uint16), (16, True): (TensorProto.INT16, np.int16),
}
NP_NAMES = {TensorProto.FLOAT: "float32", TensorProto.INT64: "int64", TensorProto.UINT8: "uint8",
            TensorProto.INT8: "int8", TensorProto.UINT16: "uint16", TensorProto.INT16: "int16"}


def int_type(spec: QSpec) -> tuple[int, type]:
    return _INT_TYPES[(spec.bits, spec.symmetric)]


def _int_tensor(name: str, values: np.ndarray, spec: QSpec) -> onnx.TensorProto:
    ttype, npt = int_type(spec)
    values = np.asarray(values)
    if not np.all((values >= spec.qmin) & (values <= spec.qmax)):
        raise ValueError(f"{name}: integer codes outside [{spec.qmin}, {spec.qmax}]")
    if spec.bits == 4:  # make_tensor packs two 4-bit values per byte
        return helper.make_tensor(name, ttype, values.shape, values.astype(npt).reshape(-1).tolist())
    return numpy_helper.from_array(values.astype(npt), name)


class GraphBuilder:
    def __init__(self, name: str):
        self.name = name
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.qdq_sites: dict[str, dict] = {}  # float tensor name -> encoding entry (for the AIMET file)
        self._names: set[str] = set()
        self._consts: dict[tuple, str] = {}

    # -- plumbing --
    def _fresh(self, name: str) -> str:
        if name in self._names:
            raise ValueError(f"tensor name {name!r} used twice in graph {self.name}")
        self._names.add(name)
        return name

    def node(self, op: str, inputs: list[str], output: str, **attrs) -> str:
        self.nodes.append(helper.make_node(op, inputs, [self._fresh(output)], name=output, **attrs))
        return output

    def nodes_multi(self, op: str, inputs: list[str], outputs: list[str], **attrs) -> list[str]:
        self.nodes.append(helper.make_node(op, inputs, [self._fresh(o) for o in outputs], name=outputs[0], **attrs))
        return outputs

    def input(self, name: str, elem_type: int, shape: list[int]) -> str:
        self.inputs.append(helper.make_tensor_value_info(self._fresh(name), elem_type, shape))
        return name

    def output(self, name: str, elem_type: int, shape: list[int]) -> None:
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, shape))

    def initializer(self, name: str, array: np.ndarray | onnx.TensorProto) -> str:
        if not isinstance(array, onnx.TensorProto):  # (np.ascontiguousarray would make a 0-d array 1-d)
            array = numpy_helper.from_array(np.array(array, order="C", copy=True), name)
        t = array
        t.name = self._fresh(name)
        self.initializers.append(t)
        return name

    def const(self, value, dtype=np.float32) -> str:
        """A small shared constant (shapes, axes, scalars), deduplicated by value."""
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            self._consts[key] = self.initializer(f"const.{len(self._consts)}", arr)
        return self._consts[key]

    # -- quantization --
    def _qparams(self, base: str, spec: QSpec, scale, offset, axis_len: int | None):
        scale = np.asarray(scale, dtype=np.float32).reshape(-1)
        offset = np.asarray(offset, dtype=np.float64).reshape(-1)
        if axis_len is None:  # per-tensor: scalars
            scale, offset = scale.reshape(()), offset.reshape(())
        s = self.initializer(f"{base}.scale", scale)
        z = self.initializer(f"{base}.zero_point", _int_tensor(f"{base}.zero_point", np.rint(offset), spec))
        return s, z

    def qdq(self, x: str, spec: QSpec, scale, offset, site: str | None = None) -> str:
        """Quantize-dequantize activation ``x`` (per-tensor); returns the dequantized tensor's name."""
        base = site or x
        s, z = self._qparams(base, spec, scale, offset, None)
        q = self.node("QuantizeLinear", [x, s, z], f"{base}.q")
        self.qdq_sites[x] = {"spec": spec, "scale": np.asarray(scale, np.float64).reshape(-1),
                             "offset": np.asarray(offset, np.float64).reshape(-1)}
        return self.node("DequantizeLinear", [q, s, z], f"{base}.dq")

    def quantize(self, x: str, spec: QSpec, scale, offset, out: str) -> str:
        """QuantizeLinear only: an integer graph output (the KV cache)."""
        s, z = self._qparams(out, spec, scale, offset, None)
        return self.node("QuantizeLinear", [x, s, z], out)

    def dequantize(self, q: str, spec: QSpec, scale, offset, out: str) -> str:
        s, z = self._qparams(out, spec, scale, offset, None)
        return self.node("DequantizeLinear", [q, s, z], out)

    def int_weight(self, name: str, codes: np.ndarray, spec: QSpec, scale, offset, axis: int | None,
                   param_name: str) -> str:
        """An integer initializer ``name.q`` and its DequantizeLinear ``name``; ``axis`` for per-channel.

        ``param_name``: the weight's name in the model (``model.layers.0.mlp.down_proj.weight``), under
        which the AIMET file lists it.
        """
        per_channel = axis is not None and np.asarray(scale).size > 1
        q = self.initializer(f"{name}.q", _int_tensor(f"{name}.q", codes, spec))
        s, z = self._qparams(name, spec, scale, offset, codes.shape[axis] if per_channel else None)
        attrs = {"axis": axis} if per_channel else {}
        self.qdq_sites[name] = {"spec": spec, "scale": np.asarray(scale, np.float64).reshape(-1),
                                "offset": np.asarray(offset, np.float64).reshape(-1), "param": param_name,
                                "per_channel": per_channel}
        return self.node("DequantizeLinear", [q, s, z], name, **attrs)

    def model(self, doc: str = "") -> onnx.ModelProto:
        g = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, self.initializers, doc_string=doc)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="mqfarm",
                              doc_string=doc)
        m.ir_version = IR_VERSION
        return m
