"""How a device job's summary is written into its trial's MLflow run.

Metrics of the trial's MLflow run (``<label>``: the sweep's device target, made safe for MLflow keys)::

    device/<label>/prefill_ms, ..._ci_low, ..._ci_high, ..._p90    median prefill latency at the export's prompt
    device/<label>/decode_tok_s, ..._ci_low, ..._ci_high           decode tokens/s (from the CI of ms/token)
    device/<label>/energy_mj_per_tok, device/<label>/power_mw       where the backend measures power
tags: device/<label>/{name,kind,model,soc,os_build,runtime,runtime_version,latency_meaningful}
("latency_meaningful" is "false" for the qnn-sim emulator: its times must never be shown as latency).
"""

from __future__ import annotations

from ..core import vocab as v


def metrics_and_tags(summary: dict) -> tuple[dict, dict]:
    """The trial-run metrics and tags of one device job's summary (see the module docstring; the names are
    farm.core.vocab's, which the reports read)."""
    from devicelab.protocol import Measurement

    def key(name: str) -> str:
        return v.device_key(summary["label"], name)

    metrics, tags = {}, {}
    for d in summary.get("records", []):
        rec = Measurement.from_dict(d)
        dev = rec.device
        tags.update({key(t): getattr(dev, t) for t in v.IDENTITY_TAGS})
        tags[key(v.LATENCY_MEANINGFUL)] = str(rec.latency_meaningful).lower()
        if rec.workload.graph == "prefill":
            metrics.update({key(v.PREFILL_MS): rec.median_ms, key(v.PREFILL_CI_LOW): rec.ci_low_ms,
                            key(v.PREFILL_CI_HIGH): rec.ci_high_ms, key(v.PREFILL_P90): rec.p90_ms})
            tags[key(v.PROMPT_LEN)] = str(rec.workload.prompt_len)
        else:
            metrics[key(v.DECODE_TOK_S)] = rec.tokens_per_s
            if rec.ci_high_ms and rec.ci_low_ms:  # tokens/s = 1000 / (ms per token): the bounds swap
                metrics[key(v.DECODE_CI_LOW)] = 1000.0 / rec.ci_high_ms
                metrics[key(v.DECODE_CI_HIGH)] = 1000.0 / rec.ci_low_ms
        if rec.energy_mj_per_token is not None:
            metrics[key(v.ENERGY_MJ_PER_TOK)] = rec.energy_mj_per_token
        if rec.power_mw is not None:
            metrics[key(v.POWER_MW)] = rec.power_mw
        if rec.extra.get(v.CONTEXT_LOAD_MS) is not None:
            metrics[key(v.CONTEXT_LOAD_MS)] = rec.extra[v.CONTEXT_LOAD_MS]
    for baseline, by_graph in (summary.get("ratios") or {}).items():
        for graph, r in by_graph.items():
            metrics[key(v.ratio_name(graph, baseline))] = r["ratio"]
            for part in (v.CI_LOW, v.CI_HIGH):
                if r.get(part) is not None:
                    metrics[key(v.ratio_name(graph, baseline, part))] = r[part]
    if summary.get("ratios") is not None or summary.get("session"):
        cond = summary.get("conditions") or {}
        tags[key(v.SAME_GRAPH)] = ",".join(t[:8] for t in summary.get("same_graph", []))
        tags[key(v.SESSION)] = (summary.get("session") or {}).get("key", "")
        tags[key(v.LOADED)] = str(bool(cond.get("loaded"))).lower()
        tags[key(v.CONDITIONS)] = _conditions_sentence(summary)
        tags[key(v.REPEATS)] = ",".join(f"{r['workload']['graph']}={r['workload']['repeats']}"
                                        for r in summary.get("records", []))
        if cond.get("others_cpu") is not None:
            metrics[key(v.OTHERS_CPU)] = cond["others_cpu"]
    if summary.get("failed"):
        tags[key(v.LOST)] = "; ".join(f"{f['device']['name']}: {f['error']}" for f in summary["failed"])[:4900]
    if not summary.get("ok", False):
        tags[key(v.ERROR)] = summary.get("error") or "every device of the target was lost"
    return {k: float(x) for k, x in metrics.items() if x is not None}, tags


def _conditions_sentence(summary: dict) -> str:
    """How the numbers were taken, for the report: device, threads, repeats, session, host load."""
    cond = summary.get("conditions") or {}
    recs = summary.get("records") or []
    threads = recs[0]["workload"].get("threads") if recs else None
    sess = summary.get("session") or {}
    parts = [f"{summary.get('device') or summary.get('target')}",
             f"{threads} thread(s)" if threads else "",
             ", ".join(f"{r['workload']['graph']} {r['workload']['repeats']} interleaved rounds" for r in recs),
             f"{sess.get('models', '?')} models in one session" + (", the whole node" if sess.get("exclusive_node") else "")]
    if cond:
        other = "unknown" if cond.get("others_cpu") is None else f"{cond['others_cpu']:.2f}"
        parts.append(f"{cond.get('cpus')} CPUs, governor {cond.get('governor') or 'not exposed'}, load "
                     f"{cond.get('load_before')}->{cond.get('load_after')}, other processes {other} cores"
                     + (" (LOADED)" if cond.get("loaded") else ""))
    return "; ".join(x for x in parts if x)[:4900]
