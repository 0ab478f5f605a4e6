"""Which layer breaks: every quantized tensor of an export's prefill graph on two runtimes, compared by SQNR.

``capture(export, runtime, ids)`` runs the prefill graph with each dequantized activation (the output of a
QuantizeLinear -> DequantizeLinear pair, named ``<tensor>.dq``) added as a graph output, and returns them
by the float tensor's name (``model.layers.3.mlp.down_proj.output``), the name the AIMET encodings and the
simulation's quantizers use. :class:`Agreement` accumulates, over windows, each tensor's signal and error
energy for a reference against another runtime, and the top-1 agreement of the logits; ``rows()`` gives the
SQNR per tensor in graph order, ``layers()`` the worst tensor per decoder layer, ``first_below(dB)`` the
first layer whose worst tensor falls below a threshold (10 dB, the bar of ExecuTorch's Qualcomm debugger).

The HTP side runs the graph in-session on onnxruntime-qnn's HTP backend (on x86: the emulator), CPU
fallback off, as ``farm eval --runtime qnn-htp`` does. Making a tensor a graph output can change what the
HTP fuses around it, so the logits' top-1 is also reported from the same run; the plain graph's accuracy
is ``farm eval EXPORT --runtime qnn-htp``.
"""

from __future__ import annotations

import math
import re
import tempfile
from pathlib import Path

import numpy as np

from .exported import Export, read_export
from .protocol import DeviceError

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def sqnr_db(signal: float, noise: float) -> float:
    """10 log10(signal / noise) from energies (sums of squares); inf where the two agree exactly."""
    if noise <= 0:
        return math.inf
    if signal <= 0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def layer_of(name: str) -> int | None:
    m = _LAYER.match(name)
    return int(m.group(1)) if m else None


def quantized_tensors(model) -> list[str]:
    """Float tensors quantized by a Q -> DQ pair, in graph order (the DQ output is ``<name>.dq``)."""
    producers = {o: n for n in model.graph.node for o in n.output}
    out = []
    for n in model.graph.node:
        if n.op_type != "DequantizeLinear":
            continue
        q = producers.get(n.input[0])
        if q is not None and q.op_type == "QuantizeLinear" and n.output[0] == f"{q.input[0]}.dq":
            out.append(q.input[0])
    return list(dict.fromkeys(out))


def _session(path: Path, runtime: str):
    from .runtime import cpu_eval_session, htp_session

    if runtime == "onnx":
        return cpu_eval_session(path)
    if runtime == "qnn-htp":
        return htp_session(path)
    raise DeviceError(f"unknown runtime {runtime!r}; known: onnx, qnn-htp")


class Capture:
    """One runtime's session over the prefill graph with every quantized tensor as an extra output."""

    def __init__(self, export: str | Path | Export, runtime: str, names: list[str] | None = None):
        import onnx

        exp = export if isinstance(export, Export) else read_export(export)
        spec = exp.graph("prefill")
        model = onnx.load(str(spec.path))
        self.names = quantized_tensors(model) if names is None else list(names)
        have = {o for n in model.graph.node for o in n.output}
        missing = [n for n in self.names if f"{n}.dq" not in have]
        if missing:
            raise DeviceError(f"{spec.path}: no quantized tensor {missing[0]!r} in the prefill graph")
        for n in self.names:
            model.graph.output.append(onnx.helper.make_tensor_value_info(f"{n}.dq", onnx.TensorProto.FLOAT, None))
        self.prompt_len = int(spec.meta.get("prompt_len", spec.inputs[0]["shape"][1]))
        self.runtime = runtime
        with tempfile.TemporaryDirectory() as tmp:  # the session keeps what it needs once created
            path = Path(tmp) / "capture.onnx"
            onnx.save(model, str(path), save_as_external_data=True, location="capture.onnx.data")
            self.session = _session(path, runtime)
        self.outputs = ["logits"] + [f"{n}.dq" for n in self.names]

    def __call__(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        ids = np.asarray(ids, dtype=np.int64).reshape(1, -1)
        if ids.shape[1] != self.prompt_len:
            raise ValueError(f"the prefill graph takes {self.prompt_len} tokens, got {ids.shape[1]}")
        values = self.session.run(self.outputs, {"input_ids": ids})
        out = {"logits": values[0]}
        out.update({n: v for n, v in zip(self.names, values[1:])})
        return out


class Agreement:
    """A reference against another runtime, accumulated over windows: energies per tensor, logits top-1."""

    def __init__(self, reference: str, other: str):
        self.reference, self.other = reference, other
        self.signal: dict[str, float] = {}
        self.noise: dict[str, float] = {}
        self.max_abs: dict[str, float] = {}
        self.agree = self.positions = 0

    def add(self, ref: dict, other: dict) -> None:
        for name, a in ref.items():
            b = other.get(name)
            if b is None or name == "logits":
                continue
            a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64).reshape(np.shape(a))
            self.signal[name] = self.signal.get(name, 0.0) + float((a64 * a64).sum())
            self.noise[name] = self.noise.get(name, 0.0) + float(((b64 - a64) ** 2).sum())
            self.max_abs[name] = max(self.max_abs.get(name, 0.0), float(np.abs(b64 - a64).max()))
        if "logits" in ref and "logits" in other:
            la, lb = np.asarray(ref["logits"]), np.asarray(other["logits"]).reshape(np.shape(ref["logits"]))
            self.agree += int((la.argmax(-1) == lb.argmax(-1)).sum())
            self.positions += int(np.prod(la.shape[:-1]))

    @property
    def top1(self) -> float | None:
        return self.agree / self.positions if self.positions else None

    def rows(self) -> list[dict]:
        return [{"tensor": n, "layer": layer_of(n), "sqnr_db": sqnr_db(self.signal[n], self.noise[n]),
                 "max_abs": self.max_abs[n]} for n in self.signal]

    def layers(self) -> list[dict]:
        """Per decoder layer, the tensor with the lowest SQNR (model-level tensors as layer None)."""
        worst: dict = {}
        for r in self.rows():
            w = worst.get(r["layer"])
            if w is None or r["sqnr_db"] < w["sqnr_db"]:
                worst[r["layer"]] = r
        return [worst[k] for k in sorted(worst, key=lambda k: (k is None, k if k is not None else 0))]

    def first_below(self, threshold_db: float) -> dict | None:
        for r in self.rows():  # graph order: the first tensor that falls below is where it breaks
            if r["sqnr_db"] < threshold_db:
                return r
        return None

    def summary(self, threshold_db: float) -> dict:
        first = self.first_below(threshold_db)
        return {"reference": self.reference, "other": self.other, "top1": self.top1,
                "threshold_db": threshold_db, "first_below": first, "layers": self.layers(), "tensors": self.rows()}


def compiled_targets(export: str | Path) -> list[Path]:
    """The export's compiled folders (``farm compile``), each with its ``compile.json``."""
    return sorted(p.parent for p in Path(export).glob("compiled-*/compile.json"))


def htp_vs_cpu(export: str | Path | Export, windows, threshold_db: float = 10.0) -> dict:
    """Every quantized tensor of the prefill graph on the HTP emulator against onnxruntime's CPU over
    ``windows`` (token-id rows): ``Agreement.summary`` plus ``worst_sqnr_db``, the lowest finite SQNR."""
    exp = export if isinstance(export, Export) else read_export(export)
    cpu = Capture(exp, "onnx")
    htp = Capture(exp, "qnn-htp", names=cpu.names)
    agr = Agreement("onnx", "qnn-htp")
    for ids in windows:
        agr.add(cpu(ids), htp(ids))
    out = agr.summary(threshold_db)
    finite = [r["sqnr_db"] for r in out["tensors"] if math.isfinite(r["sqnr_db"])]
    out["worst_sqnr_db"] = min(finite) if finite else math.inf
    out["windows"] = len(windows)
    return out
