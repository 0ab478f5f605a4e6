"""A sweep's device stage: for each finished trial and each entry of the sweep file's ``devices:``,
export the trial's artifact, compile it where the device needs a compiled model (phones: a QNN context
binary for their SoC), and benchmark it through the device pool. Each of the three steps is cached by
content in the stage cache (``<data>/stages/{export,compile,bench}/<key>``) like every other stage, so a
re-run or a resumed sweep measures nothing twice.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

from ..core.ids import config_hash
from ..core.node import node_info
from ..plan.devices import DeviceJob


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
    from ..core.cache import StageCache

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
