"""What the two onnxruntime backends (``host``: CPU; ``qnn-sim``: the QNN HTP emulator) share: a prepared
export (one session per graph) and the measurement protocol run on it.

The protocol (``Workload``): ``warmup`` untimed runs, then ``repeats`` timed ones through
:func:`devicelab.timing.time_runs`, summarized by :mod:`devicelab.stats`.

* prefill: one sample = one run of the prefill graph at the export's fixed prompt length (the graphs have
  static shapes, so the workload's ``prompt_len`` is replaced by the export's and the record says so);
* decode: one sample = ``tokens`` decode steps as a generator runs them (position advancing, the new K/V
  written into the uint8 cache slot), divided by ``tokens``: milliseconds per token; ``tokens_per_s`` is
  1000 / median.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .. import stats
from ..exported import Export, GraphSpec, read_export
from ..protocol import DeviceError, DeviceInfo, Measurement, Workload
from ..timing import time_runs

GRAPHS = ("prefill", "decode")


@dataclass
class PreparedExport:
    export: Export
    sessions: dict = field(default_factory=dict)  # graph name -> onnxruntime.InferenceSession

    def session(self, device_name: str, graph: str):
        if graph not in self.sessions:
            raise DeviceError(f"{device_name}: the export {self.export.root} has no {graph!r} graph prepared "
                              f"(has {', '.join(sorted(self.sessions)) or 'none'})")
        return self.sessions[graph]


def prepare_export(model: Path, make_session: Callable[[Path], object], device_name: str) -> PreparedExport:
    """Read the export folder (ExportError for a wrong or unknown-version one) and build a session per graph."""
    export = read_export(model)
    prepared = PreparedExport(export)
    for graph in GRAPHS:
        if graph in export.index.get("graphs", {}):
            spec = export.graph(graph)
            try:
                prepared.sessions[graph] = make_session(spec.path)
            except Exception as e:  # onnxruntime raises its own types; name the device and the file
                raise DeviceError(f"{device_name}: cannot load {spec.path}: {type(e).__name__}: "
                                  f"{str(e).splitlines()[0] if str(e) else ''}") from e
    return prepared


def _decode_step_fn(sess, spec: GraphSpec, feeds: dict, tokens: int) -> Callable[[], None]:
    """``tokens`` decode steps from the prompt's end: position advances, each step's K/V go into the cache."""
    start = int(spec.meta.get("prompt_len", 0))
    ctx = int(spec.meta.get("ctx", 0)) or None
    outs = [o["name"] for o in spec.outputs]
    has_cache = {"k_cache", "v_cache"} <= set(feeds) and {"k_out", "v_out"} <= set(outs)
    if ctx is not None and start + tokens > ctx:
        raise DeviceError(f"decode workload of {tokens} tokens after a {start}-token prompt does not fit the "
                          f"export's cache of {ctx} positions; lower tokens")

    def run() -> None:
        for i in range(tokens):
            pos = start + i
            if "position_ids" in feeds:
                feeds["position_ids"][...] = pos
            res = sess.run(None, feeds)
            if has_cache:
                got = dict(zip(outs, res))
                slot = min(pos, feeds["k_cache"].shape[-2] - 1)
                feeds["k_cache"][..., slot:slot + 1, :] = got["k_out"]
                feeds["v_cache"][..., slot:slot + 1, :] = got["v_out"]

    return run


def measure(info: DeviceInfo, prepared: PreparedExport, workload: Workload, latency_meaningful: bool,
            extra: dict | None = None) -> Measurement:
    """Run ``workload`` on the prepared export and return the record (status ok)."""
    if workload.graph not in GRAPHS:
        raise DeviceError(f"{info.name}: unknown graph {workload.graph!r} (prefill or decode)")
    export = prepared.export
    spec = export.graph(workload.graph)
    sess = prepared.session(info.name, workload.graph)
    feeds = spec.synthetic_inputs(export.vocab_size)
    prompt_len = int(spec.meta.get("prompt_len", workload.prompt_len))
    workload = dataclasses.replace(workload, prompt_len=prompt_len)
    if workload.graph == "prefill":
        samples = time_runs(lambda: sess.run(None, feeds), workload.warmup, workload.repeats)
    else:
        steps = _decode_step_fn(sess, spec, feeds, workload.tokens)
        samples = [ms / workload.tokens for ms in time_runs(steps, workload.warmup, workload.repeats)]
    summary = stats.summarize(samples)
    rec_extra = {"graph_file": spec.path.name, "prompt_len": prompt_len, **(extra or {})}
    tokens_per_s = None
    if workload.graph == "prefill":
        rec_extra["prefill_tok_s"] = prompt_len / (summary["median_ms"] / 1000.0)
    else:
        tokens_per_s = 1000.0 / summary["median_ms"]
        rec_extra["ctx"] = int(spec.meta.get("ctx", 0))
    return Measurement(device=info, workload=workload, model_id=export.content_hash,
                       latency_meaningful=latency_meaningful, samples_ms=samples, tokens_per_s=tokens_per_s,
                       extra=rec_extra, **summary)


def infer(prepared: PreparedExport, device_name: str, graph: str, feeds: dict | None = None) -> dict[str, np.ndarray]:
    """One run of ``graph`` (synthetic inputs unless ``feeds``): output name -> array."""
    sess = prepared.session(device_name, graph)
    spec = prepared.export.graph(graph)
    feeds = feeds if feeds is not None else spec.synthetic_inputs(prepared.export.vocab_size)
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
