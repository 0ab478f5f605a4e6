"""How a device job's summary is written into its trial's MLflow run.

Metrics of the trial's MLflow run (``<label>``: the sweep's device target, made safe for MLflow keys)::

    device/<label>/prefill_ms, ..._ci_low, ..._ci_high, ..._p90    median prefill latency at the export's prompt
    device/<label>/decode_tok_s, ..._ci_low, ..._ci_high           decode tokens/s (from the CI of ms/token)
    device/<label>/energy_mj_per_tok, device/<label>/power_mw       where the backend measures power
tags: device/<label>/{name,kind,model,soc,os_build,runtime,runtime_version,latency_meaningful}
("latency_meaningful" is "false" for the qnn-sim emulator: its times must never be shown as latency).
"""

from __future__ import annotations


def metrics_and_tags(summary: dict) -> tuple[dict, dict]:
    """The trial-run metrics and tags of one device job's summary (see the module docstring)."""
    from devicelab.protocol import Measurement

    p = f"device/{summary['label']}"
    metrics, tags = {}, {}
    for d in summary.get("records", []):
        rec = Measurement.from_dict(d)
        dev = rec.device
        tags.update({f"{p}/name": dev.name, f"{p}/kind": dev.kind, f"{p}/model": dev.model, f"{p}/soc": dev.soc,
                     f"{p}/os_build": dev.os_build, f"{p}/runtime": dev.runtime,
                     f"{p}/runtime_version": dev.runtime_version,
                     f"{p}/latency_meaningful": str(rec.latency_meaningful).lower()})
        if rec.workload.graph == "prefill":
            metrics.update({f"{p}/prefill_ms": rec.median_ms, f"{p}/prefill_ms_ci_low": rec.ci_low_ms,
                            f"{p}/prefill_ms_ci_high": rec.ci_high_ms, f"{p}/prefill_ms_p90": rec.p90_ms})
            tags[f"{p}/prompt_len"] = str(rec.workload.prompt_len)
        else:
            metrics[f"{p}/decode_tok_s"] = rec.tokens_per_s
            if rec.ci_high_ms and rec.ci_low_ms:  # tokens/s = 1000 / (ms per token): the bounds swap
                metrics[f"{p}/decode_tok_s_ci_low"] = 1000.0 / rec.ci_high_ms
                metrics[f"{p}/decode_tok_s_ci_high"] = 1000.0 / rec.ci_low_ms
        if rec.energy_mj_per_token is not None:
            metrics[f"{p}/energy_mj_per_tok"] = rec.energy_mj_per_token
        if rec.power_mw is not None:
            metrics[f"{p}/power_mw"] = rec.power_mw
    if summary.get("failed"):
        tags[f"{p}/lost"] = "; ".join(f"{f['device']['name']}: {f['error']}" for f in summary["failed"])[:4900]
    if not summary.get("ok", False):
        tags[f"{p}/error"] = summary.get("error") or "every device of the target was lost"
    return {k: float(v) for k, v in metrics.items() if v is not None}, tags
