"""Nightly reports, from MLflow only: the night's verdicts (``night.md`` / ``night.html``) and the history
of every metric across nights with the accepted baselines marked (``history.md`` / ``history.html``).

What they read (farm/orchestrate/nightly.py writes it): the experiment ``<suite>.nightly``, one run per night tagged
``farm_role=night`` with metrics ``<slot>/<metric>`` and the artifact ``night.json``; the registered model
``nightly.<suite>``, whose versions are the accepted nights and whose alias marks the current baseline.

Units: latency in ms (prefill: one prompt; decode: per token), A/B ratios candidate / baseline (1.10 =
10% slower), changes as signed percentages, perplexity as is.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import time
from pathlib import Path

from farm.core.vocab import ROLE, ROLE_NIGHT

from . import fmt
from .plots import DPI, _pyplot
from .render import Heading, Image, Link, Para, Table, to_html, to_markdown
from .runs import search_all

MAX_PANELS = 24  # history plots: metrics beyond this many are listed in the table only


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(uri)


def _link(uri: str, experiment_id: str, run_id: str):
    if not uri.startswith(("http://", "https://")) or not run_id:
        return run_id[:8] if run_id else "-"
    return Link(run_id[:8], f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}")


def _pct(v) -> str:
    return "-" if v is None else f"{v:+.1%}"


def load_night(run_id: str, tracking_uri: str) -> tuple[dict, object]:
    """The night record (night.json) and the MLflow run."""
    client = _client(tracking_uri)
    run = client.get_run(run_id)
    tmp = Path(tempfile.mkdtemp(prefix="nightly-report-"))
    try:
        record = json.loads(Path(client.download_artifacts(run_id, "night.json", str(tmp))).read_text())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return record, run


def night_blocks(record: dict, run, tracking_uri: str) -> list:
    tags = run.data.tags
    verdict = record.get("verdict", tags.get("nightly.verdict", "?"))
    word = {"baseline": "baseline set", "pass": "PASS", "regression": "REGRESSION", "error": "COULD NOT RUN"}
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(record.get("started_at", 0)))
    blocks: list = [Heading(f"Nightly {record['suite']}: {word.get(verdict, verdict)}", 1)]
    base = record.get("baseline")
    basetext = (f"baseline: night run `{base['run_id']}` (alias `{base['alias']}`, version {base['version']})"
                if base else "no baseline before tonight: this night became the baseline")
    blocks.append(Para(f"Night {when}, run `{record['run_id']}`, code `{tags.get('git_commit', '?')[:12]}`, suite "
                       f"`{record.get('suite_file', '')}`; {basetext}"
                       f"{'; accepted as the new baseline' if record.get('accepted') and base else ''}."))
    if record.get("error"):
        blocks += [Heading("Could not run"), Para(record["error"])]
    verdicts = record.get("verdicts", [])
    bad = [v for v in verdicts if v["regression"]]
    if bad:
        blocks += [Heading("Regressions"),
                   Para("Each names the metric, the size of the change, how sure it is and the two trial runs.")]
        blocks += [Para(f"`{v['metric']}` of `{v['slot']}`{' on ' + v['device'] if v['device'] else ''}: "
                        f"{_pct(v['change'])} (limit {_pct(v['limit'])}); {v['confidence']}; runs: baseline "
                        f"`{v['baseline_run']}`, candidate `{v['candidate_run']}`.") for v in bad]
    if verdicts:
        rows = [{"slot": v["slot"], "metric": v["metric"], "device": v["device"] or "-",
                 "baseline": v["baseline"], "candidate": v["candidate"], "change": _pct(v["change"]),
                 "CI": "-" if v["ci_low"] is None else f"[{_pct(v['ci_low'])}, {_pct(v['ci_high'])}]",
                 "pairs": v["pairs"], "limit": _pct(v["limit"]), "verdict": "REGRESSION" if v["regression"] else "ok",
                 "baseline run": v["baseline_run"][:8], "candidate run": v["candidate_run"][:8]} for v in verdicts]
        blocks += [Heading("Every comparison"),
                   Para("Latency: interleaved A/B pairs on one device; `change` is the median pair ratio minus one, "
                        "`CI` its bootstrap interval; a regression is above the limit with the whole interval above "
                        "half the limit. Perplexity: relative change against the tolerance."),
                   Table(rows, ["slot", "metric", "device", "baseline", "candidate", "change", "CI", "pairs",
                                "limit", "verdict", "baseline run", "candidate run"],
                         formats={"baseline": fmt.measured, "candidate": fmt.measured}, css="verdicts")]
    slots = record.get("slots", {})
    if slots:
        rows = []
        for slot, e in sorted(slots.items()):
            row = {"slot": slot, "trial": e["trial_id"][:8], "run": e["run_id"][:8], **e["metrics"]}
            for lbl, d in e["devices"].items():
                for k in ("prefill_ms", "decode_ms_per_tok"):
                    if d.get(k) is not None:
                        row[f"{lbl} {k}"] = d[k]
            rows.append(row)
        cols = ["slot", "trial", "run"] + sorted({k for r in rows for k in r} - {"slot", "trial", "run"})
        blocks += [Heading("Tonight's suite"),
                   Para("Each trial's metrics as the suite measured them (device medians from the sweep's cached "
                        "bench stage; the A/B above measured again)."),
                   Table(rows, cols, formats={c: fmt.measured for c in cols if "_ms" in c}, css="suite")]
    return blocks


def night_report(run_id: str, tracking_uri: str, out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``night.md`` and ``night.html`` of one night run; returns their paths."""
    record, run = load_night(run_id, tracking_uri)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    blocks = night_blocks(record, run, tracking_uri)
    html = out / "night.html"
    html.write_text(to_html(blocks, f"Nightly {record['suite']}", base=out))
    md = out / "night.md"
    md.write_text(to_markdown(blocks))
    return md, html


# ---------------------------------------------------------------- history

def load_history(suite: str, tracking_uri: str, alias: str = "baseline") -> tuple[list, dict, str | None]:
    """Night runs oldest first, ``{run id: version}`` of the accepted nights, the run id the alias holds."""
    client = _client(tracking_uri)
    exp = client.get_experiment_by_name(f"{suite}.nightly")
    if exp is None:
        raise ValueError(f"no nightly runs of suite {suite!r} in the MLflow store {tracking_uri}")
    runs = search_all(client, exp.experiment_id, f"tags.{ROLE} = '{ROLE_NIGHT}'", "attributes.start_time ASC")
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", f"nightly.{suite}")
    accepted, current = {}, None
    try:
        model = client.get_registered_model(name)
        for mv in client.search_model_versions(f"name='{name}'"):
            accepted[mv.run_id] = mv.version
        for a, version in (model.aliases or {}).items():
            current = client.get_model_version(name, version).run_id if a == alias else current
    except Exception:  # no night accepted yet
        pass
    return runs, accepted, current


def _metric_keys(runs: list) -> list[str]:
    keys = sorted({k for r in runs for k in r.data.metrics if "/" in k and not k.endswith(("_ci_low", "_ci_high"))})
    return keys


def _history_plot(runs: list, keys: list[str], accepted: dict, current: str | None, path: Path) -> bool:
    if not runs or not keys:
        return False
    plt = _pyplot()
    keys = keys[:MAX_PANELS]
    cols = min(3, len(keys))
    rows = -(-len(keys) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.0 * rows), dpi=DPI, squeeze=False)
    xs = list(range(len(runs)))
    labels = [time.strftime("%m-%d %H:%M", time.gmtime(r.info.start_time / 1000)) for r in runs]
    for ax, key in zip(axes.flat, keys):
        pts = [(i, r.data.metrics[key]) for i, r in enumerate(runs) if key in r.data.metrics]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "-o", color="#1f77b4", ms=4, lw=1.2, label="night")
        acc = [(i, r.data.metrics[key]) for i, r in enumerate(runs) if key in r.data.metrics
               and r.info.run_id in accepted]
        if acc:
            ax.plot([p[0] for p in acc], [p[1] for p in acc], "*", color="#2ca02c", ms=13, label="accepted")
        reg = [(i, r.data.metrics[key]) for i, r in enumerate(runs) if key in r.data.metrics
               and r.data.tags.get("nightly.verdict") == "regression"]
        if reg:
            ax.plot([p[0] for p in reg], [p[1] for p in reg], "x", color="#d62728", ms=10, mew=2, label="regression")
        for i, r in enumerate(runs):
            if r.info.run_id == current:
                ax.axvline(i, color="#2ca02c", ls="--", lw=1, label="baseline now")
        slot, metric = key.split("/", 1)
        ax.set_title(f"{slot}\n{metric}", fontsize=8)
        ax.set_xticks(xs)
        ax.set_xticklabels(labels, rotation=45, ha="right", fontsize=6)
        ax.tick_params(axis="y", labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    handles, names = [], []
    for ax in axes.flat:
        for h, n in zip(*ax.get_legend_handles_labels()):
            if n not in names:
                handles.append(h)
                names.append(n)
    fig.legend(handles, names, loc="upper right", fontsize=8)
    fig.tight_layout(rect=(0, 0, 0.93, 1))
    fig.savefig(path)
    plt.close(fig)
    return True


def history_report(suite: str, tracking_uri: str, out_dir: str | Path, alias: str = "baseline") -> tuple[Path, Path]:
    """Write ``history.md`` and ``history.html``: one row per night, one plot panel per metric."""
    runs, accepted, current = load_history(suite, tracking_uri, alias)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    keys = _metric_keys(runs)
    blocks: list = [Heading(f"Nightly history: {suite}", 1),
                    Para(f"{len(runs)} night(s), {len(accepted)} accepted as baseline; MLflow `{tracking_uri}`; "
                         f"generated {time.strftime('%Y-%m-%d %H:%M:%S')}.")]
    if _history_plot(runs, keys, accepted, current, out / "history.png"):
        blocks += [Heading("Metrics across nights"),
                   Para("One panel per metric of each suite slot. Green stars: nights accepted as baseline; dashed "
                        "line: the baseline now; red crosses: nights with a regression. `ab/...ratio`: the A/B "
                        "median ratio against the baseline of that night (1 = as fast)."
                        + (f" The first {MAX_PANELS} metrics are drawn." if len(keys) > MAX_PANELS else "")),
                   Image("history.png", "metrics across nights")]
    rows = []
    for r in reversed(runs):
        t = r.data.tags
        rows.append({"night": time.strftime("%Y-%m-%d %H:%M", time.gmtime(r.info.start_time / 1000)),
                     "run": _link(tracking_uri, r.info.experiment_id, r.info.run_id),
                     "verdict": t.get("nightly.verdict", r.info.status.lower()),
                     "regressions": int(r.data.metrics.get("regressions", 0)),
                     "baseline": (f"v{accepted[r.info.run_id]}" + (" (now)" if r.info.run_id == current else ""))
                     if r.info.run_id in accepted else "",
                     "compared with": t.get("nightly.baseline_run", "")[:8] or "-",
                     "code": t.get("git_commit", "")[:12], "wall s": r.data.metrics.get("wall_s")})
    blocks += [Heading("Nights"), Table(rows, ["night", "run", "verdict", "regressions", "baseline", "compared with",
                                               "code", "wall s"], formats={"wall s": fmt.duration}, css="nights")]
    html = out / "history.html"
    html.write_text(to_html(blocks, f"Nightly history: {suite}", base=out))
    md = out / "history.md"
    md.write_text(to_markdown(blocks))
    return md, html
