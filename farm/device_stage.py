"""A sweep's device stage: for each finished trial and each entry of the sweep file's ``devices:``,
export the trial's artifact, compile it where the device needs a compiled model (phones: a QNN context
binary for their SoC), and benchmark it through the device pool. Each of the three steps is cached by
content in the stage cache (``<data>/stages/{export,compile,bench}/<key>``) like every other stage, so a
re-run or a resumed sweep measures nothing twice.

Each (trial, device) is one Ray task that asks for the device's resources: ``{"CPU": 1}`` plus, for a
phone, the custom resource its node advertises (``phone:<soc>``, e.g. ``ray start --resources
'{"phone:sm8650": 2}'`` on the machine the phones hang on), so it lands on that node and Ray never books
a phone twice; the pool's file lock keeps processes off a phone that another benchmark holds.

Metrics of the trial's MLflow run (``<label>``: the sweep's device target, made safe for MLflow keys)::

    device/<label>/prefill_ms, ..._ci_low, ..._ci_high, ..._p90    median prefill latency at the export's prompt
    device/<label>/decode_tok_s, ..._ci_low, ..._ci_high           decode tokens/s (from the CI of ms/token)
    device/<label>/energy_mj_per_tok, device/<label>/power_mw       where the backend measures power
tags: device/<label>/{name,kind,model,soc,os_build,runtime,runtime_version,latency_meaningful}
("latency_meaningful" is "false" for the qnn-sim emulator: its times must never be shown as latency).
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .spec import config_hash

PHONE_KINDS = ("adb",)  # kinds that run a compiled model and live on a node's USB bus


@dataclass(frozen=True)
class DeviceJob:
    """One device entry of a sweep file, resolved on the driver."""

    target: str  # device name or kind, as the sweep file says
    label: str  # the metric-safe form of target
    workloads: tuple  # Workload dicts
    prefill: int
    ctx: int
    resources: dict  # Ray resources beyond the CPU (phone:<soc>)
    compile_target: str | None  # the SoC to compile for, None when the device runs the export as is
    devices_file: str  # the inventory file the driver read ("" = defaults)


def label(target: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", target).strip("_") or "device"


def plan_jobs(specs: list, devices_file: str | None = None) -> list[DeviceJob]:
    """The sweep's ``devices:`` entries as jobs; a name or kind the inventory lacks is a PoolError here,
    on the driver, before any trial runs."""
    from devicelab import inventory
    from devicelab.pool import Pool

    inv = inventory.load(devices_file)
    pool = Pool(inv)
    jobs = []
    for spec in specs:
        entries = pool.resolve(spec.device)
        kinds = {e.kind for e in entries}
        resources = dict(spec.resources)
        compile_target = None
        if kinds & set(PHONE_KINDS):
            socs = {str(e.options.get("soc") or "SM8650").lower() for e in entries}
            if len(socs) > 1:
                raise ValueError(f"device target {spec.device!r} mixes phones of SoCs {', '.join(sorted(socs))}; "
                                 "name one phone or give each SoC its own entry")
            compile_target = socs.pop()
            if not resources:
                resources = {f"phone:{compile_target}": 1}
        workloads = tuple({"graph": g, "warmup": spec.warmup, "repeats": spec.repeats, "tokens": spec.tokens,
                           "allow_charging": spec.allow_charging} for g in spec.graphs)
        jobs.append(DeviceJob(spec.device, label(spec.device), workloads, spec.prefill, spec.ctx, resources,
                              compile_target, str(inv.path.resolve()) if inv.path else ""))
    return jobs


# ---------------------------------------------------------------- the stage, on a worker

def default_exporter(artifact_dir: str, out_dir: Path, prefill: int, ctx: int) -> Path:
    try:
        from quant.export import export_artifact
    except ImportError as e:
        raise RuntimeError(f"the device stage needs quant.export.export_artifact, which this installation "
                           f"lacks ({e})") from None
    return export_artifact(artifact_dir, out_dir, prefill=prefill, ctx=ctx, progress=False)


def default_compiler(export_dir: Path, target: str) -> Path:
    try:
        from devicelab.compile import compile_export
    except ImportError as e:
        raise RuntimeError(f"phones need a compiled model, but devicelab.compile.compile_export is not "
                           f"available here ({e})") from None
    return compile_export(export_dir, target=target, progress=False)


def _cached(data_dir: str, stage: str, inputs: dict, make: Callable[[Path], dict]) -> tuple[Path, dict]:
    """Run ``make(workdir)`` once per key (the stage cache's lock makes racing workers wait)."""
    from .cache import StageCache

    key = config_hash({"stage": stage, **inputs})
    cache = StageCache(Path(data_dir) / "stages")
    with cache.entry(stage, key) as e:
        if e.hit:
            return e.path, {**e.meta(), "hit": True}
        t0 = time.time()
        summary = make(e.workdir())
        meta = e.commit(inputs, summary=summary, seconds=round(time.time() - t0, 3))
        return e.path, {**meta, "hit": False}


def run_device_job(trial_id: str, artifact_dir: str, artifact_key: str, job: DeviceJob, data_dir: str,
                   exporter: Callable | None = None, compiler: Callable | None = None) -> dict:
    """Export -> compile (phones) -> bench for one trial on one device target; returns the summary the
    driver logs (``records``: Measurement dicts, ``failed``: records of devices lost on the way)."""
    from devicelab import inventory
    from devicelab.pool import Pool
    from devicelab.protocol import Workload

    from .trial import node_info

    t0 = time.time()
    exporter = exporter or default_exporter
    compiler = compiler or default_compiler

    def do_export(work: Path) -> dict:
        out = Path(exporter(artifact_dir, work / "export", job.prefill, job.ctx))
        index = json.loads((out / "export.json").read_text())
        return {"folder": out.name, "content_hash": index.get("content_hash", "")}

    exp_path, exp_meta = _cached(data_dir, "export", {"artifact": artifact_key, "prefill": job.prefill,
                                                      "ctx": job.ctx}, do_export)
    model = exp_path / exp_meta["summary"]["folder"]
    stages = {"export": {"key": exp_meta["key"], "hit": exp_meta["hit"]}}
    if job.compile_target:
        def do_compile(work: Path) -> dict:
            # an export folder whose compiled-<target>/ sits beside links to the export's files, so the
            # backend finds both the index (model id) and the context binaries
            folder = work / "export"
            folder.mkdir()
            for f in model.iterdir():
                (folder / f.name).symlink_to(f.resolve())
            compiled = Path(compiler(folder, job.compile_target))
            return {"folder": "export", "compiled": compiled.name}

        cmp_path, cmp_meta = _cached(data_dir, "compile", {"export": exp_meta["key"], "target": job.compile_target},
                                     do_compile)
        model = cmp_path / cmp_meta["summary"]["folder"]
        stages["compile"] = {"key": cmp_meta["key"], "hit": cmp_meta["hit"]}

    def do_bench(work: Path) -> dict:
        # the file the driver read, so that every worker sees the pool the sweep was checked against
        inv = inventory.load(job.devices_file) if job.devices_file else inventory.defaults()
        res = Pool(inv).bench(model, job.target, [Workload.from_dict(w) for w in job.workloads])
        out = {"records": [r.to_dict() for r in res.records], "failed": [r.to_dict() for r in res.failed],
               "ok": res.ok, "device": res.device}
        (work / "records.json").write_text(json.dumps(out, indent=1))
        if not res.ok:  # nothing cached: a later run measures again
            raise DeviceStageFailed(out)
        return {"device": res.device, "records": len(res.records)}

    bench_inputs = {"export": exp_meta["key"], "content_hash": exp_meta["summary"]["content_hash"],
                    "target": job.target, "workloads": list(job.workloads)}
    try:
        bench_path, bench_meta = _cached(data_dir, "bench", bench_inputs, do_bench)
        bench = json.loads((bench_path / "records.json").read_text())
        stages["bench"] = {"key": bench_meta["key"], "hit": bench_meta["hit"]}
    except DeviceStageFailed as e:
        bench = e.result
    return {"trial_id": trial_id, "target": job.target, "label": job.label, **bench, "stages": stages,
            "node": node_info(), "started_at": t0, "ended_at": time.time()}


class DeviceStageFailed(RuntimeError):
    def __init__(self, result: dict):
        super().__init__("every device of the target was lost")
        self.result = result


# ---------------------------------------------------------------- MLflow form

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


# ---------------------------------------------------------------- on the driver: Ray tasks

def _device_task(trial_id, artifact_dir, artifact_key, job, data_dir, exporter, compiler):
    return run_device_job(trial_id, artifact_dir, artifact_key, job, data_dir, exporter, compiler)


class DeviceJobs:
    """Submits one Ray task per (trial, device target) once the trial has an artifact, and turns their
    answers into ``(trial id, "device", summary)`` events; a task that raises is a summary with ``ok``
    False and the error, so one device never costs a trial its other results."""

    def __init__(self, jobs: list[DeviceJob], data_dir: str, retries: int = 2, exporter: Callable | None = None,
                 compiler: Callable | None = None):
        import ray

        from . import scheduler

        self.jobs, self.data_dir, self.retries = jobs, str(data_dir), retries
        self.exporter, self.compiler = exporter, compiler
        self.pending: dict = {}  # ObjectRef -> (trial id, job)
        self._remote = ray.remote(_device_task)
        for job in jobs:  # a phone resource no node advertises would leave the stage pending forever
            scheduler.check_feasible({"cpu": 1, "custom": job.resources})

    @property
    def active(self) -> bool:
        return bool(self.pending)

    def submit(self, trial_id: str, artifact_dir: str, artifact_key: str, only: set | None = None) -> int:
        n = 0
        for job in self.jobs:
            if only is not None and job.label not in only:
                continue
            opts = {"num_cpus": 1, "max_retries": self.retries, "retry_exceptions": False,
                    "name": f"device-{trial_id[:8]}-{job.label}"}
            if job.resources:
                opts["resources"] = dict(job.resources)
            ref = self._remote.options(**opts).remote(trial_id, artifact_dir, artifact_key, job, self.data_dir,
                                                      self.exporter, self.compiler)
            self.pending[ref] = (trial_id, job)
            n += 1
        return n

    def poll(self, timeout: float = 0.0) -> list[tuple]:
        import ray

        from .trial import format_exception

        if not self.pending:
            return []
        ready, _ = ray.wait(list(self.pending), num_returns=len(self.pending), timeout=timeout)
        out = []
        for ref in ready:
            tid, job = self.pending.pop(ref)
            try:
                summary = ray.get(ref)
            except ray.exceptions.RayTaskError as e:
                cause = getattr(e, "cause", None) or e
                msg = format_exception(cause)[0] if isinstance(cause, BaseException) else str(e)
                summary = {"trial_id": tid, "target": job.target, "label": job.label, "ok": False, "error": msg,
                           "records": [], "failed": []}
            except ray.exceptions.RayError as e:
                summary = {"trial_id": tid, "target": job.target, "label": job.label, "ok": False,
                           "error": f"{type(e).__name__}: {str(e).splitlines()[0]}", "records": [], "failed": []}
            out.append((tid, "device", summary))
        return out

    def cancel(self) -> None:
        import ray

        for ref in list(self.pending):
            try:
                ray.cancel(ref, force=True)
            except Exception:  # finished already, or Ray is going down
                pass
        self.pending.clear()
