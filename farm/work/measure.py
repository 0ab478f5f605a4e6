"""A sweep's measurement session on one device target: every export the sweep made for that target,
baselines included, timed together, interleaved, in one process, after the sweep's training is done.

Why a session and not one timing per trial as it finishes:

* a latency taken beside a training job measures the training job; the driver starts a host session only
  when no trial is running, and the session asks Ray for the whole node, so nothing is placed beside it;
* a latency is only comparable with one taken in the same session: the FP32 and W8A16 baselines of each
  model run in the same rounds as the quantized exports (A, B, C, A, B, C, ...: ``Pool.compare``, one timed
  run per export per round), so the machine's drift lands on all of them alike, and each export's speed is
  reported as a ratio to each baseline: the median of the per-round ratios with a bootstrap interval;
* exports of the same architecture and scheme run the same ops (only the constants differ): they are
  timed together like the rest, and the summary says which exports share a graph, so a report never
  presents their noise as a difference between methods.

Each entry's result carries the device records, the ratios, the graph group and the host's conditions over
the session (``devicelab.conditions``: CPUs, governor, load, other processes' CPU use; ``loaded`` when
other work ran beside it).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

from ..core.ids import config_hash

BASELINE_ROLES = ("fp", "w8a16")  # what every quantized export is compared with, per model


@dataclass(frozen=True)
class Entry:
    """One export of the session: ``role`` fp | w8a16 | quantized; ``group`` the model (and layer count)
    whose baselines it is compared with; ``signature`` its graph identity (same ops, same shapes)."""

    trial_id: str
    role: str
    group: str
    folder: str  # the export (or compiled) folder the device runs
    signature: str


def graph_signature(export_folder: Path) -> str:
    """What makes two exports run the same ops: the exporter, the model's shapes, the scheme, the graphs'
    node and quantizer counts and their inputs and outputs. The constants (weights, encodings) are left
    out on purpose: they differ between methods and do not change the work."""
    import json

    index = json.loads((Path(export_folder) / "export.json").read_text())
    keep = ("exporter", "exporter_version", "model", "layers", "scheme", "num_layers", "vocab_size", "kv_heads",
            "head_dim", "hidden_size", "prefill", "ctx")
    graphs = {name: {"nodes": g.get("nodes"), "quantized_tensors": g.get("quantized_tensors"),
                     "inputs": [(i["name"], i["shape"], i["dtype"]) for i in g.get("inputs", [])],
                     "outputs": [(o["name"], o["shape"], o["dtype"]) for o in g.get("outputs", [])]}
              for name, g in sorted(index.get("graphs", {}).items())}
    return config_hash({**{k: index.get(k) for k in keep}, "graphs": graphs})


def eval_windows(export, limit: int):
    """Token ids of the evaluation corpus at the export's prompt length, with the export's own tokenizer:
    what a phone is fed instead of synthetic ids (its inputs are files, so they can be real text)."""
    from transformers import AutoTokenizer

    from quant import data

    t = int(export.graph("prefill").meta.get("prompt_len", export.graph("prefill").inputs[0]["shape"][1]))
    tok = AutoTokenizer.from_pretrained(str(export.root / "tokenizer"))
    return data.eval_windows(tok, t, limit=limit, add_bos=bool(export.index.get("add_bos"))).numpy()


def _session_windows(pool, target: str, entries: list[Entry]):
    """Real text for a phone session: the windows of the entries' one tokenizer (every model of the session
    must share it, since one set of input files serves all of them); None for other devices, or when the
    models' tokenizers differ (their inputs stay synthetic, and the records say so)."""
    import hashlib

    from devicelab.exported import read_export

    if not any(e.kind == "adb" for e in pool.resolve(target)):
        return None
    exports = [read_export(e.folder) for e in entries]
    digests = set()
    for exp in exports:
        tok = exp.root / "tokenizer"
        if not tok.is_dir():
            return None
        digests.add(hashlib.sha256(b"".join(f.read_bytes() for f in sorted(tok.iterdir()) if f.is_file())).hexdigest())
    if len(digests) != 1 or len({int(x.graph("prefill").meta.get("prompt_len", 0)) for x in exports}) != 1:
        return None
    return eval_windows(exports[0], 4)


def paired_ratio(baseline_ms: list[float], candidate_ms: list[float], level: float = 0.95, seed: int = 0) -> dict:
    """Candidate / baseline as the median of per-round ratios, with its percentile-bootstrap interval.
    Both lists are in run order, one sample per round, so round i of each shared the machine's state."""
    from devicelab import stats

    n = min(len(baseline_ms), len(candidate_ms))
    if n == 0:
        raise ValueError("no rounds to compare")
    ratios = [c / b for b, c in zip(baseline_ms[:n], candidate_ms[:n])]
    lo, hi = stats.bootstrap_median_ci(ratios, level, seed=seed)
    return {"ratio": stats.median(ratios), "ci_low": lo, "ci_high": hi, "pairs": n, "level": level,
            "separable": not lo <= 1.0 <= hi}


def session_key(target: str, workloads: list, entries: list[Entry], export_keys: dict) -> str:
    """A session is its exports' contents on its device with its workloads: one more trial is a new session
    (its baselines must be timed beside it), a resumed sweep with nothing new reuses the old one."""
    return config_hash({"stage": "measure", "target": target, "workloads": list(workloads),
                        "exports": sorted((e.trial_id, e.role, export_keys[e.trial_id]) for e in entries)})


def run_session(target: str, workloads: list[dict], entries: list[Entry], devices_file: str = "",
                on_event=None) -> dict:
    """Time every entry on one device of ``target``, interleaved, once per workload; see the module
    docstring. Returns ``{"device", "conditions", "started_at", "ended_at", "entries": {trial id: ...}}``."""
    from devicelab import inventory
    from devicelab.conditions import Window
    from devicelab.pool import Pool
    from devicelab.protocol import Workload

    if not entries:
        raise ValueError(f"a measurement session on {target!r} needs at least one export")
    inv = inventory.load(devices_file) if devices_file else inventory.defaults()
    pool = Pool(inv, on_event=on_event)
    exports = {e.trial_id: Path(e.folder) for e in entries}
    windows = _session_windows(pool, target, entries)
    t0 = time.time()
    per_workload = {}
    with Window() as window:
        for w in workloads:
            wl = Workload.from_dict(w)
            # one timed run per export per round: the rounds are the A/B pairs of the ratios
            if len(exports) == 1:  # nothing to interleave with (a sweep without baselines)
                (tid, folder), = exports.items()
                res = pool.bench(folder, target, [wl], windows=windows)
                if not res.ok:
                    raise RuntimeError(f"{target}: " + "; ".join(r.error for r in res.failed))
                per_workload[wl.graph] = {tid: res.records[0]}
                continue
            # one timed run per export per round: the rounds are the A/B pairs of the ratios
            per_workload[wl.graph] = pool.compare(exports, target, wl, rounds=wl.repeats, windows=windows)
    conditions = window.conditions.to_dict()
    by_sig: dict[str, list[str]] = {}
    for e in entries:
        by_sig.setdefault(e.signature, []).append(e.trial_id)
    out = {}
    for e in entries:
        recs = [per_workload[g][e.trial_id] for g in per_workload]
        ratios = {}
        for role in BASELINE_ROLES:
            base = next((b for b in entries if b.group == e.group and b.role == role), None)
            # FP is the reference of references: its inverse ratios would only repeat the others'
            if base is None or base.trial_id == e.trial_id or e.role == "fp":
                continue
            ratios[role] = {}
            for graph, by_trial in per_workload.items():
                ratios[role][graph] = paired_ratio(by_trial[base.trial_id].samples_ms, by_trial[e.trial_id].samples_ms)
                ratios[role][graph]["baseline"] = base.trial_id
            energies = [(per_workload[g][base.trial_id].energy_mj_per_token, per_workload[g][e.trial_id].energy_mj_per_token)
                        for g in per_workload]
            energies = [(b, c) for b, c in energies if b and c]
            if energies:
                b, c = energies[-1]  # energy per token is measured on decode, the last workload
                ratios[role]["energy"] = {"ratio": c / b, "baseline": base.trial_id}
        out[e.trial_id] = {"role": e.role, "group": e.group, "records": [r.to_dict() for r in recs],
                           "ratios": ratios, "signature": e.signature,
                           "same_graph": [t for t in by_sig[e.signature] if t != e.trial_id],
                           "conditions": conditions}
    device = next(iter(next(iter(per_workload.values())).values())).device.name if per_workload else ""
    return {"target": target, "device": device, "conditions": conditions, "started_at": t0,
            "ended_at": time.time(), "entries": out}
