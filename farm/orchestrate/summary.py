"""What a sweep's results look like to a person: the summary table (one row per trial, the varying
settings, the primary metric and its ratio to the float model, device latency and ratio columns), the
closing lines of `farm sweep`, and `farm status` (result files first, then the newest MLflow run)."""

from __future__ import annotations

import sys

from ..core.ids import FLOAT_METHOD, flatten
from ..core.layout import DataLayout
from ..plan.spec import Sweep
from .progress import fmt_duration, table
from .results import load_result, primary_metric


def summary_rows(sweep: Sweep, results: dict, states: dict | None = None) -> tuple[list[dict], list[str]]:
    """One row per trial: id, the varying settings, status, the primary metric, its ratio to FP, time."""
    states = states or {}
    fp = {}
    for tid, res in results.items():
        cfg = sweep_trial(sweep, tid)
        if cfg and cfg["method"] == FLOAT_METHOD:
            name, value = primary_metric(res)
            fp[(cfg["model"], cfg["layers"], name)] = value
    varying = [k for k in sweep.varying]
    cols = ["trial"] + varying + ["status"]
    metric_names = sorted({primary_metric(r)[0] for r in results.values() if primary_metric(r)[0]})
    devices = _latency_columns(results)
    cols += metric_names + (["vs fp"] if fp else []) + [c for c, _, _ in devices] + ["time"]
    rows = []
    for t in sweep.trials:
        flat = flatten({k: v for k, v in t.config.items() if k != "eval"})
        row = {"trial": t.short, **{k: flat.get(k) for k in varying}}
        res = results.get(t.id)
        if res:
            row["status"] = "done"
            name, value = primary_metric(res)
            if name:
                row[name] = value
                base = fp.get((t.config["model"], t.config["layers"], name))
                if base:
                    row["vs fp"] = f"{value / base:.3f}"
            row["time"] = fmt_duration(res.get("timing", {}).get("total_s"))
            for col, lbl, graph in devices:
                summary = (res.get("devices") or {}).get(lbl, {})
                if graph.startswith("x"):  # a ratio column: x<baseline>/<graph>
                    base, g = graph[1:].split("/")
                    r = (summary.get("ratios") or {}).get(base, {}).get(g)
                    if r:
                        row[col] = ratio_cell(r)
                    continue
                rec = next((r for r in summary.get("records", []) if r["workload"]["graph"] == graph), None)
                if rec is not None:
                    row[col] = f"{rec['median_ms']:.4g}" if graph == "prefill" else f"{rec['tokens_per_s']:.4g}"
        else:
            row["status"] = states.get(t.id, "pending")
        rows.append(row)
    return rows, cols


def _latency_columns(results: dict) -> list[tuple[str, str, str]]:
    """(column, device label, graph) for the device stages that measured latency (an emulator's times
    are not latency: left out)."""
    seen: dict = {}
    for res in results.values():
        for lbl, summary in (res.get("devices") or {}).items():
            for rec in summary.get("records", []):
                if rec.get("latency_meaningful") and rec["status"] == "ok":
                    seen[(lbl, rec["workload"]["graph"])] = True
    ratios: dict = {}
    for res in results.values():
        for lbl, summary in (res.get("devices") or {}).items():
            for base, by_graph in (summary.get("ratios") or {}).items():
                for g in by_graph:
                    if g in ("prefill", "decode") and (lbl, "prefill") in seen:
                        ratios[(lbl, base, g)] = True
    cols = []
    for lbl, graph in sorted(seen, key=lambda k: (k[0], k[1] != "prefill")):
        cols.append((f"{lbl} prefill ms" if graph == "prefill" else f"{lbl} tok/s", lbl, graph))
    for lbl, base, g in sorted(ratios, key=lambda k: (k[0], k[1] != "fp", k[2] != "prefill")):
        cols.append((f"{g} vs {base}", lbl, f"x{base}/{g}"))
    return cols


def ratio_cell(r: dict) -> str:
    """``0.832 [0.810, 0.851]``: a time ratio with its interval; ``~1`` marks an interval that holds 1 (no
    difference that the session could tell from noise)."""
    cell = f"{r['ratio']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]"
    return cell + (" ~1" if r["ci_low"] <= 1.0 <= r["ci_high"] else "")


def sweep_trial(sweep: Sweep, tid: str) -> dict | None:
    for t in sweep.trials:
        if t.id == tid:
            return t.config
    return None


def print_summary(outcome, file=None) -> None:
    """The table and the closing lines of a run: ``outcome`` is the sweep's Outcome (farm.orchestrate.sweep)."""
    file = file or sys.stdout
    states = {tid: "FAILED" for tid in outcome.failed}
    if outcome.interrupted:
        states.update({t.id: "KILLED" for t in outcome.sweep.trials if t.id not in outcome.results
                       and t.id not in outcome.failed})
    rows, cols = summary_rows(outcome.sweep, outcome.results, states)
    print(table(rows, cols), file=file)
    n_done = len(outcome.results)
    print(f"\n{n_done}/{len(outcome.sweep.trials)} trials done ({len(outcome.executed)} run now, "
          f"{len(outcome.failed)} failed) in {fmt_duration(outcome.wall_s)}", file=file)
    for tid, err in outcome.failed.items():
        print(f"  FAILED {tid[:8]}: {err}", file=file)
    for key, err in outcome.device_failed.items():
        tid, lbl = key.split("/", 1)
        print(f"  FAILED {tid[:8]} on device {lbl}: {err}", file=file)
    for reg in outcome.registered:
        metric = [k for k in reg if k.startswith("ppl/")]
        extra = f" ({metric[0]}={reg[metric[0]]:.3f})" if metric else ""
        print(f"registered {reg['name']} v{reg['version']} @best = trial {reg['trial'][:8]}{extra}", file=file)


def sweep_status(sweep: Sweep, opts) -> tuple[list[dict], list[str], dict]:
    """The state of every trial: done (result file), else the newest MLflow run's status, else pending."""
    from .tracking import Tracker

    results = {t.id: r for t in sweep.trials if (r := load_result(opts.data_dir, t.id)) is not None}
    states = {}
    other_numerics: dict = {}  # numerics version -> trial runs in MLflow made with it (not this code's)
    db = DataLayout(opts.data_dir).mlflow_db
    if opts.tracking_uri or db.exists():
        tracker = Tracker(opts.uri, sweep.name)
        for run in reversed(tracker.trial_runs()):  # oldest first, so the newest wins
            found = run.data.params.get("numerics")
            if numerics_mismatch(found):
                other_numerics[found or "none"] = other_numerics.get(found or "none", 0) + 1
            tid = run.data.tags.get("trial_id")
            if tid and tid not in results:
                states[tid] = run.info.status
                if run.info.status == "RUNNING":  # training logs live: show how far it got
                    hist = tracker.client.get_metric_history(run.info.run_id, "train/loss")
                    if hist:
                        last = max(hist, key=lambda m: m.step)
                        states[tid] = f"RUNNING step {last.step} loss {last.value:.4g}"
    rows, cols = summary_rows(sweep, results, states)
    counts = {"total": len(sweep.trials), "done": len(results)}
    for s in states.values():
        s = s.split()[0].lower()
        counts[s] = counts.get(s, 0) + 1
    counts["pending"] = len(sweep.trials) - len(results) - len(states)
    if other_numerics:  # {version: runs}; `farm status` prints it as a note
        counts["other_numerics"] = other_numerics
    return rows, cols, counts


def numerics_mismatch(found) -> str | None:
    """Why a result's numerics version (an MLflow param, a string) is not this code's; None when it is."""
    from quant.numerics import mismatch

    return mismatch(found)


def numerics_note(other: dict) -> str | None:
    """One line for `farm status`: the trial runs of the sweep that another numerics version made."""
    if not other:
        return None
    from quant import numerics

    parts = ", ".join(f"{n} with {'no version' if v == 'none' else f'version {v}'}" for v, n in sorted(other.items()))
    return (f"not comparable: {sum(other.values())} trial run(s) in MLflow were made by other arithmetic ({parts}); "
            f"this code is numerics version {numerics.NUMERICS_VERSION} and counts only its own results")
