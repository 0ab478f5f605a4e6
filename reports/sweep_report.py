"""The report of one sweep, in the order a reader asks: how much quality does each method keep (the
ratio-to-FP bars), the summary in the paper's shape (model x scheme x method: perplexity, ratio to FP, task
accuracies, per device prefill latency, decode tokens/s, energy per token; best of each column
highlighted), the quality/latency/energy Pareto view, every device measurement, every trial, the pivot over
the training budget and the plot against calibration samples (a scaling study), the training curves
(``reports.training``), the failed trials with their errors, and the provenance (``reports.provenance``).

Written as ``report.md`` and a self-contained ``report.html`` (the same blocks; images embedded), plus the
PNGs and ``trials.json`` in ``out_dir``. The axes are found from the runs themselves (the params that
vary), so any sweep gets a sensible report. When the tracking URI is an http(s) server every trial links
to its run in the MLflow UI.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from farm.core.vocab import FLOAT_METHOD

from . import fmt
from . import plots
from .numerics import numerics_blocks
from .provenance import provenance_blocks
from .render import Heading, Image, Link, Para, Table, to_html, to_markdown
from .runs import TrialRun, load_trials
from .summary import device_table, measurement_conditions, pareto_points, pareto_table, summary
from .tables import cell, pivot, sort_key
from .training import load_curves
from .training import plot as plot_curves

BUDGET_COLUMNS = ("method_config.epochs", "method_config.iterations", "method_config.steps")
SAMPLES = "calib.samples"
SEED_KEYS = ("calib.seed", "seed")
IDENTITY = ("model", "layers", "scheme", "method")


def varying(trials: list[TrialRun]) -> list[str]:
    """Params that differ between trials. A method's hyper-parameter counts only if it differs among the
    trials of one method (methods have different defaults); calibration keys only among quantized trials."""
    quantized = [t for t in trials if t.params.get("method") != FLOAT_METHOD]
    keys: list[str] = []
    for t in trials:
        keys += [k for k in t.params if k not in keys and not k.startswith(("resources.", "eval."))
                 and k not in ("plugin", "method_config", "calib")]

    def differs(group, k):
        return len({json.dumps(t.params.get(k), sort_keys=True, default=str) for t in group if k in t.params}) > 1

    def within_a_method(k):
        by: dict = {}
        for t in quantized:
            by.setdefault(t.params.get("method"), []).append(t)
        return any(differs(g, k) for g in by.values())

    return [k for k in keys if (differs(trials, k) if k in IDENTITY
                                else within_a_method(k) if k.startswith("method_config.")
                                else differs(quantized, k))]


def independent(keys: list[str], rows: list[dict]) -> list[str]:
    """The ``keys`` that vary over ``rows``, without those the earlier ones determine (a learning rate and
    its minimum varied together need one column, not two)."""
    kept: list[str] = []

    def groups(ks):
        return len({json.dumps([r.get(k) for k in ks], default=str) for r in rows})

    for k in keys:
        if groups(kept + [k]) > groups(kept):
            kept.append(k)
    return kept


def primary_metric(trials: list[TrialRun]) -> str | None:
    names = sorted({k for t in trials for k in t.metrics if k.startswith("ppl/")})
    return names[0] if names else None


def _fp_reference(trials: list[TrialRun], metric: str) -> dict:
    """FP value of ``metric`` per (model, layers): the denominator of every ratio."""
    out = {}
    for t in trials:
        if t.status == "FINISHED" and t.params.get("scheme") == "fp" and metric in t.metrics:
            out[(t.params.get("model"), t.params.get("layers"))] = t.metrics[metric]
    return out


def run_link(tracking_uri: str):
    """``trial -> URL of its run in the MLflow UI`` when the store is an http(s) server, else None."""
    if not tracking_uri.startswith(("http://", "https://")):
        return None
    base = tracking_uri.rstrip("/")
    return lambda t: f"{base}/#/experiments/{t.experiment_id}/runs/{t.run_id}"


def _trial_cell(t: TrialRun, link):
    return Link(t.short, link(t)) if link else t.short


TRIAL_FORMATS = {"vs fp": fmt.ratio, "quantize s": fmt.duration, "total s": fmt.duration}


def rows_of(trials: list[TrialRun], axes: list[str], metric: str | None, fp: dict, link=None) -> list[dict]:
    rows = []
    for t in trials:
        r = {"trial": _trial_cell(t, link), "status": t.status, **{k: t.params.get(k) for k in axes}}
        if metric and metric in t.metrics:
            r[metric] = t.metrics[metric]
            ref = fp.get((t.params.get("model"), t.params.get("layers")))
            r["vs fp"] = t.metrics[metric] / ref if ref else None
        r["quantize s"] = t.metrics.get("time/quantize_s")
        r["total s"] = t.metrics.get("time/total_s")
        if t.status == "FAILED":
            r["error"] = t.tags.get("error", "")[:120]
        rows.append(r)
    return sorted(rows, key=lambda r: tuple(sort_key(r.get(k)) for k in axes))


def _plot(rows: list[dict], x: str, lines: list[str], path: Path, title: str) -> bool:
    pts = [r for r in rows if r.get("vs fp") is not None and isinstance(r.get(x), (int, float))]
    if len({r[x] for r in pts}) < 2:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.4, 4.2), dpi=110)
    # seeds are repeats, not conditions: one line per condition (their mean) in a band from min to max
    lines = [k for k in lines if k not in SEED_KEYS]
    groups: dict = {}
    for r in pts:
        groups.setdefault(tuple(r.get(k) for k in lines), []).append(r)
    for key, g in sorted(groups.items(), key=lambda kv: tuple(sort_key(v) for v in kv[0])):
        at: dict = {}
        for r in g:
            at.setdefault(r[x], []).append(r["vs fp"])
        xs = sorted(at)
        label = ", ".join(f"{k.split('.')[-1]}={v}" if k.startswith(("method_config.", "calib.")) else str(v)
                          for k, v in zip(lines, key) if v is not None)
        line, = ax.plot(xs, [sum(at[v]) / len(at[v]) for v in xs], marker="o", label=label or "trials")
        if any(len(at[v]) > 1 for v in xs):
            ax.fill_between(xs, [min(at[v]) for v in xs], [max(at[v]) for v in xs], color=line.get_color(),
                            alpha=0.2, linewidth=0)
    ax.set_xscale("log", base=2)
    ax.set_xlabel(x)
    ax.set_ylabel("perplexity / FP perplexity")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: never over the lines
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def failed_blocks(trials: list[TrialRun], axes: list[str], link=None) -> list:
    """The trials whose newest run did not finish, with the error each recorded (the first line; the full
    traceback is the run's ``trial/error.txt`` artifact)."""
    bad = [t for t in trials if t.status in ("FAILED", "KILLED")]
    if not bad:
        return []
    rows = [{"trial": _trial_cell(t, link), **{k: t.params.get(k) for k in axes}, "status": t.status,
             "kind": t.tags.get("error_kind") or None, "runs": t.executions,
             "error": (t.tags.get("error") or t.tags.get("farm_note") or "(no error recorded)").splitlines()[0][:500]}
            for t in bad]
    rows.sort(key=lambda r: tuple(sort_key(r.get(k)) for k in axes))
    return [Heading("Failed trials"),
            Para(f"{len(bad)} trial(s) without a finished run; `runs` counts every MLflow run of the trial."),
            Table(rows, ["trial", *axes, "status", "kind", "runs", "error"], css="failed")]


@dataclass
class _Context:
    """What the report's sections read: the trials and everything derived from them once."""

    sweep: str
    tracking_uri: str
    out: Path
    trials: list[TrialRun]
    link: object
    axes: list[str]
    metric: str | None
    fp: dict
    rows: list[dict]
    summ: object
    columns: str | None
    x: str | None

    @property
    def quantized(self) -> list[dict]:
        """Finished quantized trials with a ratio to FP: the rows of the pivot and the samples plot."""
        return [r for r in self.rows if r.get("status") == "FINISHED" and r.get("method") != FLOAT_METHOD
                and r.get("vs fp") is not None]


def _header(c: _Context) -> list:
    counts: dict = {}
    for t in c.trials:
        counts[t.status] = counts.get(t.status, 0) + 1
    commits = sorted({t.tags.get("git_commit", "")[:12] for t in c.trials} - {""})
    blocks: list = [
        Heading(f"Sweep report: {c.sweep}", 1),
        Para(f"{len(c.trials)} trials ({', '.join(f'{n} {s.lower()}' for s, n in sorted(counts.items()))}); "
             f"MLflow `{c.tracking_uri}`; code {', '.join(commits) or 'unknown'}; generated "
             f"{time.strftime('%Y-%m-%d %H:%M:%S')}.")]
    blocks += numerics_blocks(c.trials)  # results of other arithmetic are flagged before any table
    if c.metric:
        refs = "; ".join(f"{m}{'' if ly is None else f' (layers={ly})'}: {fmt.number(v)}" for (m, ly), v in sorted(
            c.fp.items(), key=lambda kv: tuple(sort_key(v) for v in kv[0])))
        blocks.append(Para(f"Metric: `{c.metric}`, lower is better; `vs fp` divides by the FP trial of the same "
                           f"model ({refs or 'no FP trial finished'})."))
    return blocks


def _ratio_bars(c: _Context) -> list:
    if plots.ratio_bars(c.summ.rows, c.out / "ratio_to_fp.png",
                        f"{c.sweep}: {c.metric or 'perplexity'} relative to FP"):
        return [Heading("Ratio to FP"), Image("ratio_to_fp.png", "ratio to FP per method and scheme")]
    return []


def _summary(c: _Context) -> list:
    if not c.summ.rows:
        return []
    multi = "trials" in c.summ.table.columns
    return [Heading("Summary"),
            Para("One row per model, scheme and method" + (
                 " (the best trial of each by the metric; `trials` says of how many)" if multi else "")
                 + ". Bold: the best value of the column among the quantized rows the sweep asked for (FP and "
                 "a W8A16 device baseline the sweep added are references); a device column's best "
                 "only when its interval overlaps no other row's. Devices: prefill latency in ms (median "
                 "[95% interval]), decode tokens/s, energy in mJ per token, and where one session timed the "
                 "models together, each one's time ratio to the FP32 and W8A16 baselines of that session "
                 "(median of per-round ratios [interval]; below 1 is faster; `~1`: the interval holds 1, a "
                 "difference the session could not tell from noise)."),
            c.summ.table]


def _pareto(c: _Context) -> list:
    points = pareto_points(c.summ)
    if not plots.pareto(points, c.out / "pareto.png", f"{c.sweep}: quality against latency and energy"):
        return []
    return [Heading("Quality, latency and energy"),
            Para("Each point is a summary row on one device, its latency with the measurement's interval "
                 "(error bars; the prefill time ratio to FP32 where one session timed them all); the frontier "
                 "joins the rows no other row beats on both axes. `on frontier`: no other row is at least as "
                 "good on the ratio, the latency and (where every row has it) the energy, and better on one. "
                 "`not separable`: a frontier point that another point of no worse quality matches within "
                 "the latency intervals, so its place on the frontier may be noise."),
            Image("pareto.png", "Pareto plot of quality against latency and energy", svg="pareto.svg"),
            pareto_table(points)]


def _devices(c: _Context) -> list:
    dev = device_table(c.trials, c.link)
    if dev is None:
        return []
    blocks = [Heading("Device measurements"),
              Para("Every trial on every device: median prefill latency with its bootstrap confidence interval "
                   "(ms), decode tokens/s, energy per token (mJ), the time ratios to the baselines of the same "
                   "session, and the trials whose exports run the same ops (only the constants differ, so "
                   "their differences are noise)."), dev]
    how = measurement_conditions(c.trials)
    if how:
        blocks += [Heading("How the device numbers were measured"),
                   Para("Per device and measurement session: the device, threads, interleaved rounds, how many "
                        "models were timed together, and what else the host did meanwhile (other processes' "
                        "CPU use, in cores). `loaded`: other work ran beside it; read those numbers with care."),
                   Table(how, ["device", "session", "trials", "loaded", "how"], css="conditions")]
    return blocks


def _trials(c: _Context) -> list:
    cols = ["trial", *c.axes] + ([c.metric, "vs fp"] if c.metric else []) + ["quantize s", "total s", "status"]
    if any("error" in r for r in c.rows):
        cols.append("error")
    return [Heading("Trials"), Table(c.rows, cols, formats=TRIAL_FORMATS, css="trials")]


def _budget_pivot(c: _Context) -> list:
    column = c.columns or next((k for k in BUDGET_COLUMNS if k in c.axes), None)
    quantized = c.quantized
    if not (column and column in c.axes and quantized):
        return []
    # a failed trial keeps its cell, so a diverged run reads as such instead of a gap
    cells = quantized + [{**r, "vs fp": "failed"} for r in c.rows
                         if r.get("status") == "FAILED" and r.get("method") != FLOAT_METHOD]
    index = independent([k for k in c.axes if k != column], cells)
    # methods without the key (SmoothQuant has no epochs) get their own column: the untrained start
    table, values = pivot(cells, index, column, "vs fp")
    short = column.split(".")[-1]
    value_cols = [(column, v) for v in values]
    headers = {(column, v): f"{short} {cell(v)}" if v is not None else f"(no {short})" for v in values}
    return [Heading(f"Ratio to FP by {column}"),
            Table(table, index + value_cols, headers, formats={k: fmt.ratio for k in value_cols}, css="pivot")]


def _samples_plot(c: _Context) -> list:
    xk = c.x or (SAMPLES if SAMPLES in c.axes else None)
    quantized = c.quantized
    if not (xk and quantized):
        return []
    groups = independent([k for k in c.axes if k != xk], quantized)
    if not _plot(quantized, xk, groups, c.out / "ppl_vs_samples.png", f"{c.sweep}: {c.metric}"):
        return []
    seeds = [k for k in groups if k in SEED_KEYS]
    blocks: list = [Heading(f"Ratio to FP against {xk}")]
    if seeds:
        blocks.append(Para(f"Each line is the mean over `{seeds[0]}`; the band spans its minimum to maximum."))
    return blocks + [Image("ppl_vs_samples.png", "ratio to FP")]


def _training(c: _Context) -> list:
    curves = load_curves(c.trials, c.tracking_uri)
    if not curves:
        return []
    by_id = {t.trial_id: t for t in c.trials}
    keys = independent(c.axes, c.rows) or c.axes
    crows = sorted(({"trial": _trial_cell(by_id[tid], c.link), **{k: by_id[tid].params.get(k) for k in keys},
                     "status": by_id[tid].status, "mode": cv.mode, "steps": cv.steps, "first loss": cv.first,
                     "last loss": cv.last, "late change": cv.late_change}
                    for tid, cv in curves.items()), key=lambda r: tuple(sort_key(r.get(k)) for k in keys))
    blocks: list = [
        Heading("Training loss"),
        Para("From the per-step losses in MLflow. `last loss`: mean of the last tenth of the steps "
             "(block-wise: of the last layer's). `late change`: that mean over the mean of the tenth "
             "before, minus one; negative means the loss was still falling when training stopped "
             "(block-wise: the median over layers)."),
        Table(crows, ["trial", *keys, "mode", "steps", "first loss", "last loss", "late change", "status"],
              css="training")]
    labels = {tid: ", ".join(f"{k.split('.')[-1]}={by_id[tid].params.get(k)}" for k in keys) for tid in curves}
    groups = {tid: f"{by_id[tid].params.get('scheme')} {by_id[tid].params.get('method')}" for tid in curves}
    if plot_curves(curves, labels, c.out / "training_loss.png", c.sweep, groups):
        blocks.append(Image("training_loss.png", "training loss"))
    return blocks


def _failed(c: _Context) -> list:
    return failed_blocks(c.trials, c.axes, c.link)


def _provenance(c: _Context) -> list:
    return provenance_blocks(c.trials, c.tracking_uri)


# the report's sections, in the order a reader asks (the module docstring); a new section is a function
# of the context returning blocks (reports.render), added here at its place
SECTIONS = (_header, _ratio_bars, _summary, _pareto, _devices, _trials, _budget_pivot, _samples_plot, _training,
            _failed, _provenance)


def sweep_report(sweep: str, tracking_uri: str, out_dir: str | Path, columns: str | None = None,
                 x: str | None = None) -> Path:
    """Build the report of ``sweep`` from MLflow into ``out_dir``; returns the path of ``report.md``.

    ``columns``: the param pivoted into columns (default: the training budget, epochs or iterations, when
    it varies); ``x``: the plot's x axis (default: calibration samples, when they vary)."""
    trials = load_trials(sweep, tracking_uri)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    link = run_link(tracking_uri)
    axes = varying(trials)
    metric = primary_metric(trials)
    fp = _fp_reference(trials, metric) if metric else {}
    c = _Context(sweep, tracking_uri, out, trials, link, axes, metric, fp, rows_of(trials, axes, metric, fp, link),
                 summary(trials, metric, fp, link), columns, x)
    blocks = [b for section in SECTIONS for b in section(c)]

    (out / "trials.json").write_text(json.dumps([{"trial_id": t.trial_id, "status": t.status, "params": t.params,
                                                  "metrics": t.metrics, "executions": t.executions}
                                                 for t in trials], indent=1, default=str))
    (out / "report.html").write_text(to_html(blocks, f"Sweep report: {sweep}", base=out))
    path = out / "report.md"
    path.write_text(to_markdown(blocks))
    return path
