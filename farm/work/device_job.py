"""A sweep's device stage, the part that runs as soon as a trial is done: export the trial's model (its
artifact, or for a float trial the float model itself: the FP32 baseline) and compile it where the device
needs a compiled model (phones: a QNN context binary for their SoC). Each step is cached by content in the
stage cache (``<data>/stages/{export,compile}/<key>``) like every other stage, so a re-run or a resumed
sweep exports nothing twice.

The timing itself is not here: it happens in a measurement session (``farm.work.measure``) once the
sweep's training is done, with every export of the target timed together beside its baselines.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

from ..core.ids import config_hash
from ..core.layout import DataLayout
from ..core.node import node_info
from ..plan.devices import DeviceJob


def float_source(model: str, layers: int | None) -> dict:
    """What the exporter is given for a float trial, which has no artifact: the model to load as it is."""
    return {"float_model": model, "layers": layers}


def default_exporter(source, out_dir: Path, prefill: int, ctx: int, device_table: bool = False) -> Path:
    """``source``: an artifact folder, or :func:`float_source` for the float model (the FP32 baseline).
    ``device_table``: export the artifact as the phone runs it (its scheme + ``:device``; the HTP refuses
    the plain asymmetric per-channel weights), for targets that compile."""
    from quant.export import export_artifact, export_model

    if isinstance(source, dict):
        from quant import load_model

        lm = load_model(source["float_model"], num_layers=source.get("layers"))
        recipe = {"model": source["float_model"], "layers": source.get("layers"), "scheme": "fp", "method": "none",
                  "add_bos": lm.add_bos}
        return export_model(lm.model, lm.tokenizer, out_dir, recipe, prefill=prefill, ctx=ctx, progress=False)
    return export_artifact(source, out_dir, prefill=prefill, ctx=ctx, progress=False, device_table=device_table)


def default_compiler(export_dir: Path, target: str) -> Path:
    from devicelab.compile import compile_export

    return compile_export(export_dir, target=target, progress=False)


def _cached(data_dir: str, stage: str, inputs: dict, make: Callable[[Path], dict]) -> tuple[Path, dict]:
    """Run ``make(workdir)`` once per key (the stage cache's lock makes racing workers wait)."""
    key = config_hash({"stage": stage, **inputs})
    cache = DataLayout(data_dir).stage_cache()
    with cache.entry(stage, key) as e:
        if e.hit:
            return e.path, {**e.meta(), "hit": True}
        t0 = time.time()
        summary = make(e.workdir())
        meta = e.commit(inputs, summary=summary, seconds=round(time.time() - t0, 3))
        return e.path, {**meta, "hit": False}


def prepare_device_model(trial_id: str, source, source_key: str, job: DeviceJob, data_dir: str,
                         exporter: Callable | None = None, compiler: Callable | None = None) -> dict:
    """Export -> compile (phones) for one trial on one device target. Returns what the measurement
    session needs: the folder the device runs, the export's cache key and content hash, and its graph
    signature (``farm.work.measure.graph_signature``)."""
    from .measure import graph_signature

    t0 = time.time()
    exporter = exporter or default_exporter
    compiler = compiler or default_compiler

    # a phone compiles what the HTP runs: the device table (float models have none)
    device_table = bool(job.compile_target) and not isinstance(source, dict)

    def do_export(work: Path) -> dict:
        kw = {"device_table": True} if device_table else {}
        out = Path(exporter(source, work / "export", job.prefill, job.ctx, **kw))
        index = json.loads((out / "export.json").read_text())
        return {"folder": out.name, "content_hash": index.get("content_hash", "")}

    inputs = {"artifact": source_key, "prefill": job.prefill, "ctx": job.ctx}
    if device_table:
        inputs["device_table"] = True
    exp_path, exp_meta = _cached(data_dir, "export", inputs, do_export)
    export_folder = exp_path / exp_meta["summary"]["folder"]
    model = export_folder
    stages = {"export": {"key": exp_meta["key"], "hit": exp_meta["hit"]}}
    if job.compile_target:
        def do_compile(work: Path) -> dict:
            # an export folder whose compiled-<target>/ sits beside links to the export's files, so the
            # backend finds both the index (model id) and the context binaries
            folder = work / "export"
            folder.mkdir()
            for f in export_folder.iterdir():
                (folder / f.name).symlink_to(f.resolve())
            compiled = Path(compiler(folder, job.compile_target))
            return {"folder": "export", "compiled": compiled.name}

        cmp_path, cmp_meta = _cached(data_dir, "compile", {"export": exp_meta["key"], "target": job.compile_target},
                                     do_compile)
        model = cmp_path / cmp_meta["summary"]["folder"]
        stages["compile"] = {"key": cmp_meta["key"], "hit": cmp_meta["hit"]}
    return {"trial_id": trial_id, "target": job.target, "label": job.label, "folder": str(model),
            "export_key": exp_meta["key"], "content_hash": exp_meta["summary"]["content_hash"],
            "signature": graph_signature(export_folder), "stages": stages, "node": node_info(),
            "started_at": t0, "ended_at": time.time()}


def measure_session(job: DeviceJob, entries: list, export_keys: dict, data_dir: str) -> dict:
    """The measurement session of ``job``'s target over ``entries`` (``farm.work.measure.Entry``), cached
    in ``<data>/stages/measure/<key>``: a resumed sweep with no new export measures nothing again."""
    from .measure import run_session, session_key

    key_inputs = {"session": session_key(job.target, list(job.workloads), entries, export_keys)}

    def do_measure(work: Path) -> dict:
        out = run_session(job.target, list(job.workloads), entries, job.devices_file)
        out["node"] = node_info()
        (work / "session.json").write_text(json.dumps(out, indent=1))
        return {"device": out["device"], "entries": len(entries)}

    path, meta = _cached(data_dir, "measure", key_inputs, do_measure)
    out = json.loads((path / "session.json").read_text())
    out["stage"] = {"key": meta["key"], "hit": meta["hit"]}
    return out
