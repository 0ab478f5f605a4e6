"""The summary in the paper's shape: one row per model x scheme x method, with perplexity and its ratio to
FP, the task accuracies that were logged, and per device the prefill latency, decode tokens/s and energy
per token; and the Pareto view of the same rows (quality against latency and energy, per device).

A row stands for the best finished trial of its group (lowest primary metric; the earliest on a tie) when
a sweep varies more than the identity (a scaling study): its ``trials`` cell says of how many. The best
value of each column is taken among the quantized rows: FP is the reference, not a contender.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from farm.core.vocab import FLOAT_METHOD  # the one farm module a report imports (docs/architecture.md)

from . import fmt
from .pareto import frontier
from .render import Link, Table
from .runs import TrialRun
from .tables import sort_key

GROUP = ("model", "layers", "scheme", "method")
RATIO = "vs fp"
# (DeviceResult field, header suffix, formatter, best)
DEVICE_COLUMNS = (("prefill_ms", "prefill ms", fmt.measured, "min"),
                  ("decode_tok_s", "decode tok/s", fmt.measured, "max"),
                  ("energy_mj_per_tok", "mJ/tok", fmt.measured, "min"))


def accuracy_keys(trials: list[TrialRun]) -> list[str]:
    """The task accuracies logged by lm-eval (``lmeval/<task>/acc``, ``.../acc_norm``), without stderrs."""
    keys = {k for t in trials for k in t.metrics if k.startswith("lmeval/") and k.count("/") == 2
            and k.rsplit("/", 1)[1].startswith("acc") and not k.endswith("_stderr")}
    return sorted(keys)


def timing_devices(trials: list[TrialRun]) -> list[str]:
    """Devices whose times are latency: seen with a time and never tagged ``latency_meaningful=false``."""
    seen: dict[str, bool] = {}
    for t in trials:
        for name, r in t.devices.items():
            seen[name] = seen.get(name, True) and r.latency_meaningful
    return sorted(d for d, ok in seen.items() if ok)


def groups(trials: list[TrialRun], metric: str | None) -> list[tuple[TrialRun, int]]:
    """The representative finished trial of each model x layers x scheme x method, with the group size."""
    by: dict[tuple, list[TrialRun]] = {}
    for t in trials:
        if t.status == "FINISHED":
            by.setdefault(tuple(t.params.get(k) for k in GROUP), []).append(t)
    out = []
    for g in by.values():
        best = min(g, key=lambda t: (t.metrics.get(metric, math.inf) if metric else 0.0, t.start_ms))
        out.append((best, len(g)))
    return out


@dataclass
class Summary:
    rows: list[dict]
    table: Table
    devices: list[str]     # devices with meaningful times, in column order
    metric: str | None


def _is_fp(row: dict) -> bool:
    return row.get("method") == FLOAT_METHOD or row.get("scheme") == "fp"


def summary(trials: list[TrialRun], metric: str | None, fp: dict, link=None) -> Summary:
    """``fp``: the FP value of ``metric`` per (model, layers); ``link(trial)``: its MLflow UI URL or None."""
    accs = accuracy_keys(trials)
    devices = timing_devices(trials)
    layered = len({t.params.get("layers") for t in trials}) > 1
    picked = groups(trials, metric)
    multi = any(n > 1 for _, n in picked)
    rows = []
    for t, n in picked:
        url = link(t) if link else None
        r = {"model": t.params.get("model"), "layers": t.params.get("layers"), "scheme": t.params.get("scheme"),
             "method": t.params.get("method"), "trials": n, "trial": Link(t.short, url) if url else t.short,
             "_trial": t}
        if metric and metric in t.metrics:
            r[metric] = t.metrics[metric]
            ref = fp.get((t.params.get("model"), t.params.get("layers")))
            r[RATIO] = t.metrics[metric] / ref if ref else None
        for k in accs:
            r[k] = t.metrics.get(k)
        res = t.devices
        for d in devices:
            for field, _, _, _ in DEVICE_COLUMNS:
                r[("device", d, field)] = getattr(res[d], field) if d in res else None
        rows.append(r)
    rows.sort(key=lambda r: (sort_key(r["model"]), sort_key(r["layers"]), not _is_fp(r), sort_key(r["scheme"]),
                             sort_key(r["method"])))

    columns = ["model"] + (["layers"] if layered else []) + ["scheme", "method"] + (["trials"] if multi else [])
    columns.append("trial")
    headers, formats, best = {}, {}, {}
    if metric:
        columns += [metric, RATIO]
        headers[metric] = metric.replace("ppl/", "ppl ")
        formats.update({metric: fmt.number, RATIO: fmt.ratio})
        best.update({metric: "min", RATIO: "min"})
    for k in accs:
        columns.append(k)
        _, task, name = k.split("/")
        headers[k], formats[k], best[k] = f"{task} {name}", fmt.accuracy, "max"
    for d in devices:
        for field, label, f, sense in DEVICE_COLUMNS:
            key = ("device", d, field)
            if any(r.get(key) is not None for r in rows):
                columns.append(key)
                headers[key], formats[key], best[key] = f"{d} {label}", f, sense
    table = Table(rows, columns, headers, formats, best, best_among=lambda r: not _is_fp(r), css="summary")
    return Summary(rows, table, [d for d in devices if any(c[:2] == ("device", d) for c in columns
                                                           if isinstance(c, tuple))], metric)


@dataclass
class ParetoPoint:
    row: dict
    device: str
    ratio: float
    prefill_ms: float
    energy: float | None
    on_frontier: bool = False     # over every objective measured on this device
    on_latency_front: bool = False  # ratio against prefill only (the left panel)
    on_energy_front: bool = False   # ratio against energy only (the right panel)

    @property
    def label(self) -> str:
        return f"{self.row['scheme']} {self.row['method']}"


def pareto_points(s: Summary) -> dict[str, list[ParetoPoint]]:
    """Per device, the summary rows with a ratio to FP and a prefill time, frontiers marked. Energy joins
    the objectives only where every point of the device has it (a frontier over unequal objectives would
    compare apples with pears)."""
    out: dict[str, list[ParetoPoint]] = {}
    for d in s.devices:
        pts = [ParetoPoint(r, d, r[RATIO], r[("device", d, "prefill_ms")], r.get(("device", d, "energy_mj_per_tok")))
               for r in s.rows if r.get(RATIO) is not None and r.get(("device", d, "prefill_ms")) is not None]
        if not pts:
            continue
        energy = all(p.energy is not None for p in pts)
        full = frontier([(p.ratio, p.prefill_ms) + ((p.energy,) if energy else ()) for p in pts])
        lat = frontier([(p.ratio, p.prefill_ms) for p in pts])
        en = frontier([(p.ratio, p.energy) for p in pts]) if energy else [False] * len(pts)
        for p, a, b, c in zip(pts, full, lat, en):
            p.on_frontier, p.on_latency_front, p.on_energy_front = a, b, c
        out[d] = pts
    return out


def pareto_table(points: dict[str, list[ParetoPoint]]) -> Table:
    rows = [{"device": p.device, "model": p.row["model"], "scheme": p.row["scheme"], "method": p.row["method"],
             RATIO: p.ratio, "prefill ms": p.prefill_ms, "mJ/tok": p.energy, "on frontier": p.on_frontier}
            for pts in points.values() for p in sorted(pts, key=lambda p: (not p.on_frontier, p.ratio))]
    return Table(rows, ["device", "model", "scheme", "method", RATIO, "prefill ms", "mJ/tok", "on frontier"],
                 formats={RATIO: fmt.ratio, "prefill ms": fmt.measured, "mJ/tok": fmt.measured}, css="pareto")


def device_table(trials: list[TrialRun], link=None) -> Table | None:
    """Every trial's measurement on every device, with the prefill confidence interval; an emulator's
    times are withheld (its row says why) so nobody reads them as latency."""
    rows = []
    for t in trials:
        for name, r in sorted(t.devices.items()):
            url = link(t) if link else None
            row = {"trial": Link(t.short, url) if url else t.short, "scheme": t.params.get("scheme"),
                   "method": t.params.get("method"), "device": name}
            if r.latency_meaningful:
                row.update({"prefill ms": r.prefill_ms, "ci low": r.prefill_ci_low, "ci high": r.prefill_ci_high,
                            "decode tok/s": r.decode_tok_s, "mJ/tok": r.energy_mj_per_tok, "note": r.error})
            else:
                row["note"] = "; ".join(x for x in ("emulator: outputs only, times are not latency", r.error) if x)
            rows.append(row)
    if not rows:
        return None
    cols = ["trial", "scheme", "method", "device", "prefill ms", "ci low", "ci high", "decode tok/s", "mJ/tok",
            "note"]
    return Table(rows, cols, formats={c: fmt.measured for c in cols[4:9]}, css="devices")


def device_identities(trials: list[TrialRun]) -> list[dict]:
    """Each device with each identity it reported (a phone updated between runs shows twice)."""
    seen: dict[tuple, dict] = {}
    for t in trials:
        for name, r in t.devices.items():
            runtime, version = r.identity.get("runtime", ""), r.identity.get("runtime_version", "")
            if version and version not in runtime:  # some backends put the version in the runtime already
                runtime = f"{runtime} {version}".strip()
            named = r.identity.get("name", "")
            ident = (named if named and named != name else "", r.identity.get("model", ""), r.identity.get("soc", ""),
                     r.identity.get("os_build", ""), runtime)
            e = seen.setdefault((name, ident, r.latency_meaningful), {
                "device": name + (f" ({ident[0]})" if ident[0] else ""), "model": ident[1] or None,
                "soc": ident[2] or None, "os build": ident[3] or None, "runtime": ident[4] or None,
                "latency": "yes" if r.latency_meaningful else "no (emulator)", "trials": 0})
            e["trials"] += 1
    return sorted(seen.values(), key=lambda e: (e["device"], str(e["os build"])))


__all__ = ["Summary", "summary", "pareto_points", "pareto_table", "device_table",
           "device_identities", "accuracy_keys", "timing_devices"]
