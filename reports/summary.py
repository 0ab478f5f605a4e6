"""The summary in the paper's shape: one row per model x scheme x method, with perplexity and its ratio to
FP, the task accuracies that were logged, and per device the prefill latency, decode tokens/s and energy
per token; and the Pareto view of the same rows (quality against latency and energy, per device).

A row stands for the best finished trial of its group (lowest primary metric; the earliest on a tie) when
a sweep varies more than the identity (a scaling study): its ``trials`` cell says of how many. The best
value of each column is taken among the quantized rows the sweep asked for: FP, and a W8A16 trial the sweep
added only as a device baseline, are references, not contenders.

Device numbers are measured values with intervals. Where a measurement session timed the models together,
the summary shows each one's time ratio to the FP32 and W8A16 baselines of the same session with its
interval; a device column's best is highlighted only when its interval overlaps no other row's (two
exports of one graph differ by noise alone, and a highlight would say otherwise). On the Pareto view, a
frontier point is "not separable" when another point of no worse quality has a latency interval that
overlaps its own: within the measurement's noise, that point could be as fast.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from farm.core.vocab import BASELINE, FLOAT_METHOD  # the one farm module a report imports (docs/architecture.md)

from . import fmt
from .device_metrics import Interval
from .pareto import frontier
from .render import Link, Table
from .runs import TrialRun
from .tables import sort_key

GROUP = ("model", "layers", "scheme", "method")
RATIO = "vs fp"
# (DeviceResult attribute, header suffix, formatter, best)
DEVICE_COLUMNS = (("prefill", "prefill ms", fmt.interval, "min"),
                  ("decode", "decode tok/s", fmt.interval, "max"),
                  ("energy_mj_per_tok", "mJ/tok", fmt.measured, "min"))
# the ratio columns of a measurement session: (graph, baseline), time ratios (lower is faster)
RATIO_COLUMNS = (("prefill", "fp"), ("decode", "fp"), ("prefill", "w8a16"), ("decode", "w8a16"),
                 ("energy", "fp"), ("energy", "w8a16"))


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


def is_reference(row: dict) -> bool:
    """FP, or a trial added only as a device baseline (tagged by the sweep): never the column's best."""
    trial = row.get("_trial")
    return _is_fp(row) or bool(trial is not None and trial.tags.get(BASELINE))


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
            for graph, base in RATIO_COLUMNS:
                r[("device", d, "ratio", graph, base)] = res[d].ratios.get((graph, base)) if d in res else None
        rows.append(r)
    rows.sort(key=lambda r: (sort_key(r["model"]), sort_key(r["layers"]), not _is_fp(r), not is_reference(r),
                             sort_key(r["scheme"]), sort_key(r["method"])))

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
                headers[key], formats[key] = f"{d} {label}", f
                if separable_best(rows, key, sense):
                    best[key] = sense
        for graph, base in RATIO_COLUMNS:
            key = ("device", d, "ratio", graph, base)
            if any(r.get(key) is not None for r in rows):
                columns.append(key)
                headers[key], formats[key] = f"{d} {graph} vs {base}", fmt.interval
                if separable_best(rows, key, "min"):
                    best[key] = "min"
    table = Table(rows, columns, headers, formats, best, best_among=lambda r: not is_reference(r), css="summary")
    return Summary(rows, table, [d for d in devices if any(c[:2] == ("device", d) for c in columns
                                                           if isinstance(c, tuple))], metric)


def separable_best(rows: list[dict], key, sense: str) -> bool:
    """Whether the best quantized row of column ``key`` is told apart from every other by its interval
    (values without an interval count as exact)."""
    vals = [r[key] for r in rows if r.get(key) is not None and not is_reference(r)]
    if len(vals) < 2:
        return False
    top = (min if sense == "min" else max)(vals)
    others = [v for v in vals if v is not top]
    as_interval = top if isinstance(top, Interval) else Interval(top)
    return not any(as_interval.overlaps(v) for v in others)


@dataclass
class ParetoPoint:
    row: dict
    device: str
    ratio: float
    prefill_ms: float
    energy: float | None
    latency: Interval | None = None  # the latency axis: prefill time ratio to FP (a session's), else ms
    on_frontier: bool = False     # over every objective measured on this device
    on_latency_front: bool = False  # ratio against prefill only (the left panel)
    on_energy_front: bool = False   # ratio against energy only (the right panel)
    separable: bool = True  # no point of no worse quality has a latency interval overlapping this one's

    @property
    def label(self) -> str:
        return f"{self.row['scheme']} {self.row['method']}"

    @property
    def latency_is_ratio(self) -> bool:
        return bool(getattr(self.latency, "is_ratio", False))


def pareto_points(s: Summary) -> dict[str, list[ParetoPoint]]:
    """Per device, the summary rows with a ratio to FP and a prefill time, frontiers marked. The latency
    axis is the prefill time ratio to FP where a measurement session gave every point one (FP itself is 1),
    else the median prefill ms; both carry their intervals. Energy joins the objectives only where every
    point of the device has it (a frontier over unequal objectives would compare apples with pears)."""
    out: dict[str, list[ParetoPoint]] = {}
    for d in s.devices:
        pts = [ParetoPoint(r, d, r[RATIO], float(r[("device", d, "prefill")]), r.get(("device", d, "energy_mj_per_tok")))
               for r in s.rows if r.get(RATIO) is not None and r.get(("device", d, "prefill")) is not None]
        if not pts:
            continue
        ratios = [Interval(1.0, 1.0, 1.0, is_ratio=True) if _is_fp(p.row)
                  else p.row.get(("device", d, "ratio", "prefill", "fp")) for p in pts]
        use_ratio = all(r is not None for r in ratios)
        for p, r in zip(pts, ratios):
            p.latency = r if use_ratio else p.row[("device", d, "prefill")]
        energy = all(p.energy is not None for p in pts)
        full = frontier([(p.ratio, float(p.latency)) + ((p.energy,) if energy else ()) for p in pts])
        lat = frontier([(p.ratio, float(p.latency)) for p in pts])
        en = frontier([(p.ratio, p.energy) for p in pts]) if energy else [False] * len(pts)
        for p, a, b, c in zip(pts, full, lat, en):
            p.on_frontier, p.on_latency_front, p.on_energy_front = a, b, c
        for p in pts:
            p.separable = not any(q is not p and q.ratio <= p.ratio and q.latency.overlaps(p.latency) for q in pts)
        out[d] = pts
    return out


def pareto_table(points: dict[str, list[ParetoPoint]]) -> Table:
    rows = [{"device": p.device, "model": p.row["model"], "scheme": p.row["scheme"], "method": p.row["method"],
             RATIO: p.ratio, "prefill ms": p.row[("device", p.device, "prefill")],
             "prefill vs fp": p.latency if p.latency_is_ratio else None, "mJ/tok": p.energy,
             "on frontier": p.on_frontier,
             "separable": None if not p.on_frontier else ("yes" if p.separable else "not separable")}
            for pts in points.values() for p in sorted(pts, key=lambda p: (not p.on_frontier, p.ratio))]
    cols = ["device", "model", "scheme", "method", RATIO, "prefill ms", "prefill vs fp", "mJ/tok", "on frontier",
            "separable"]
    if not any(r["prefill vs fp"] is not None for r in rows):
        cols.remove("prefill vs fp")
    return Table(rows, cols, formats={RATIO: fmt.ratio, "prefill ms": fmt.interval, "prefill vs fp": fmt.interval,
                                      "mJ/tok": fmt.measured}, css="pareto")


def device_table(trials: list[TrialRun], link=None) -> Table | None:
    """Every trial's measurement on every device: the prefill median with its confidence interval, decode
    tokens/s, energy, the session's time ratios to FP and W8A16 with their intervals, and the trials whose
    exports run the same ops; an emulator's times are withheld (its row says why) so nobody reads them as
    latency, and a measurement taken beside other work says so."""
    rows = []
    for t in trials:
        for name, r in sorted(t.devices.items()):
            url = link(t) if link else None
            row = {"trial": Link(t.short, url) if url else t.short, "scheme": t.params.get("scheme"),
                   "method": t.params.get("method"), "device": name}
            if r.latency_meaningful:
                notes = [r.error] + (["LOADED: other work ran beside it"] if r.loaded else [])
                row.update({"prefill ms": r.prefill_ms, "ci low": r.prefill_ci_low, "ci high": r.prefill_ci_high,
                            "decode tok/s": r.decode_tok_s, "mJ/tok": r.energy_mj_per_tok,
                            "same graph as": ", ".join(r.same_graph) or None,
                            "note": "; ".join(x for x in notes if x)})
                for graph, base in RATIO_COLUMNS:
                    row[f"{graph} vs {base}"] = r.ratios.get((graph, base))
            else:
                row["note"] = "; ".join(x for x in ("emulator: outputs only, times are not latency", r.error) if x)
            rows.append(row)
    if not rows:
        return None
    ratio_cols = [f"{g} vs {b}" for g, b in RATIO_COLUMNS if any(r.get(f"{g} vs {b}") is not None for r in rows)]
    cols = ["trial", "scheme", "method", "device", "prefill ms", "ci low", "ci high", "decode tok/s", "mJ/tok"]
    formats = {c: fmt.measured for c in cols[4:]} | {c: fmt.interval for c in ratio_cols}
    cols += ratio_cols + (["same graph as"] if any(r.get("same graph as") for r in rows) else []) + ["note"]
    return Table(rows, cols, formats=formats, css="devices")


def measurement_conditions(trials: list[TrialRun]) -> list[dict]:
    """How each device's numbers were taken: one row per (device, session), in the session's own words
    (device, threads, interleaved rounds, models timed together, the host's load), flagged when loaded."""
    seen: dict = {}
    for t in trials:
        for name, r in t.devices.items():
            if not r.latency_meaningful or (r.prefill_ms is None and r.decode_tok_s is None):
                continue  # an emulator's times are not latency; a lost target measured nothing
            key = (name, r.session or t.trial_id)
            e = seen.setdefault(key, {"device": name, "session": r.session[:8] or None,
                                      "how": r.conditions or "one trial at a time (no session record)",
                                      "loaded": "yes" if r.loaded else "no", "trials": 0})
            e["trials"] += 1
    return sorted(seen.values(), key=lambda e: (e["device"], str(e["session"])))


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


__all__ = ["Summary", "summary", "pareto_points", "pareto_table", "device_table", "measurement_conditions",
           "device_identities", "accuracy_keys", "timing_devices"]
