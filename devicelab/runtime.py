"""Running an export's prefill graph for its outputs (accuracy as deployed), not for its speed.

``logits_fn(export, runtime)`` returns ``ids (1, T) int64 -> logits (1, T, V) float32`` over numpy arrays:

* ``onnx``: onnxruntime's CPU provider, which executes the QDQ graph's semantics. One exception is turned
  off: by default onnxruntime fuses a weight's DequantizeLinear into ``MatMulNBits`` with
  ``accuracy_level`` 4, which quantizes the *activations* to int8 per block on the fly (measured on
  W8A16: 14x the graph's own error). That is a CPU speed trick, not the graph, so evaluation pins
  ``session.qdq_matmulnbits_accuracy_level=1`` (float accumulation). Latency benchmarks (the ``host``
  device) keep the default, which is what a deployment on a CPU would run.
* ``qnn-htp``: the QNN HTP backend of ``onnxruntime-qnn``, which on x86 emulates the NPU's integer
  arithmetic (slow; outputs only). CPU fallback is off, so every op ran on the (emulated) HTP.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from .exported import Export, read_export
from .protocol import DeviceError

RUNTIMES = ("onnx", "qnn-htp")


def cpu_eval_session(path: Path, threads: int = 1):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def htp_session(path: Path, soc_model: str = "57", htp_arch: str = "75"):
    from .backends.qnn_sim import QnnSimDevice

    return QnnSimDevice(soc_model=soc_model, htp_arch=htp_arch).session(Path(path))


def logits_fn(export: str | Path | Export, runtime: str = "onnx", threads: int = 1,
              graph: str = "prefill") -> tuple[Callable[[np.ndarray], np.ndarray], dict]:
    """The graph's logits as a function of token ids, and what ran it (runtime, file, prompt length)."""
    if runtime not in RUNTIMES:
        raise DeviceError(f"unknown runtime {runtime!r}; known: {', '.join(RUNTIMES)}")
    exp = export if isinstance(export, Export) else read_export(export)
    spec = exp.graph(graph)
    sess = cpu_eval_session(spec.path, threads) if runtime == "onnx" else htp_session(spec.path)
    t = int(spec.meta.get("prompt_len", spec.inputs[0]["shape"][1]))

    def run(ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        if ids.shape != (1, t):
            raise ValueError(f"{spec.path.name} takes input_ids of shape (1, {t}), got {ids.shape}")
        return sess.run(["logits"], {"input_ids": ids})[0]

    return run, {"runtime": runtime, "graph": spec.path.name, "prompt_len": t, "export_hash": exp.content_hash}
