"""The `farm sweep`, `farm status` and `farm ui` subcommands (wired into farm/cli/app.py).

    farm sweep sweeps/demo.yaml [--dry-run] [--yes] [--address ADDR] [--tracking-uri URI] [--data DIR]
    farm status sweeps/demo.yaml            # or a sweep name: what MLflow knows about it
    farm report sweeps/demo.yaml            # or a sweep name: report.md with tables and a plot from MLflow
    farm ui [--port 5000]                   # the MLflow UI on 127.0.0.1 over the sweep store
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path

from ..core.layout import DataLayout
from .checks import check_listen, check_store
from .errors import UsageError


def _add_store_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default=None,
                   help="farm data folder: MLflow store, stage cache, results (default runs/farm or $MQFARM_FARM_DIR)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: sqlite file in --data)")


def add_commands(sub) -> dict:
    s = sub.add_parser("sweep", help="run a sweep file: a grid of trials on Ray, tracked in MLflow")
    s.add_argument("file", help="sweep YAML file (see sweeps/)")
    s.add_argument("--dry-run", action="store_true", help="print the expanded grid and what is done; run nothing")
    s.add_argument("--yes", action="store_true", help="accept a grid larger than the safety limit (a --dry-run "
                   "never needs it)")
    s.add_argument("--resources", default=None, metavar="cpu=1,gpu=0",
                   help="override the sweep's per-trial resources: cpu, gpu, memory_gb, custom.<name> (e.g. to try "
                        "a GPU grid on a CPU machine); trial ids and cached results stay the same")
    s.add_argument("--address", default=None,
                   help="join this Ray cluster (e.g. auto, 10.0.0.1:6379, ray://head:10001); default: local Ray")
    s.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray instance (default: all)")
    s.add_argument("--worker-logs", action="store_true", help="show the workers' output")
    _add_store_args(s)

    st = sub.add_parser("status", help="state of a sweep's trials (file or sweep name)")
    st.add_argument("sweep", help="sweep YAML file, or the name of a sweep already in MLflow")
    _add_store_args(st)

    rp = sub.add_parser("report", help="write a sweep's report (tables, plot) from MLflow")
    rp.add_argument("sweep", help="sweep YAML file, or the name of a sweep in MLflow")
    rp.add_argument("--out", default=None, help="folder of report.md (default: DATA/reports/SWEEP)")
    rp.add_argument("--columns", default=None,
                    help="param pivoted into columns (default: method_config.epochs or iterations when it varies)")
    rp.add_argument("--x", default=None, help="the plot's x axis (default: calib.samples when it varies)")
    _add_store_args(rp)

    g = sub.add_parser("gc", help="free disk: remove cached quantized artifacts (results and MLflow runs stay)")
    g.add_argument("--dry-run", action="store_true", help="say what would be removed; remove nothing")
    g.add_argument("--all", action="store_true", help="also remove the artifacts registered as best")
    g.add_argument("--stage", action="append", default=None,
                   help="stage cache to clear (default: quantize; repeat for more, e.g. activation_stats)")
    _add_store_args(g)

    u = sub.add_parser("ui", help="serve the MLflow UI of the sweep store on 127.0.0.1")
    u.add_argument("--port", type=int, default=5000)
    u.add_argument("--host", default="127.0.0.1", help="interface to bind (loopback by default)")
    _add_store_args(u)
    return {"sweep": cmd_sweep, "status": cmd_status, "report": cmd_report, "gc": cmd_gc, "ui": cmd_ui}


def _options(args, read_only: bool = False, store_needed: bool = True):
    """The data folder and store of a command; the store checked first (checks.check_store): a read-only
    command never creates one, and an unreachable server is one line, not a hang."""
    from ..orchestrate.sweep import Options, data_dir_default

    opts = Options(data_dir=Path(args.data) if args.data else data_dir_default(), tracking_uri=args.tracking_uri)
    if args.tracking_uri or store_needed:
        check_store(opts.uri, read_only=read_only)
    return opts


def cmd_sweep(args) -> int:
    from ..orchestrate.progress import table
    from ..plan.spec import GRID_LIMIT, load_sweep
    from ..orchestrate.results import load_result
    from ..orchestrate.summary import print_summary, summary_rows
    from ..orchestrate.sweep import run_sweep

    sweep = load_sweep(args.file, max_trials=None if args.yes or args.dry_run else GRID_LIMIT)
    if args.resources:
        sweep.spec.resources = override_resources(sweep.spec.resources, args.resources)
    opts = _options(args, store_needed=False)
    if args.dry_run:
        from ..work.stages import plan

        results = {t.id: r for t in sweep.trials if (r := load_result(opts.data_dir, t.id)) is not None}
        rows, cols = summary_rows(sweep, results, {})
        print(f"sweep {sweep.name} ({sweep.file}): {len(sweep.trials)} trials"
              f"{f' ({sweep.duplicates} duplicate combinations merged)' if sweep.duplicates else ''}, "
              f"{len(results)} done, {len(sweep.trials) - len(results)} to run")
        print(table(rows, cols))
        shared = {}
        for t in sweep.trials:
            if t.id not in results:
                for name, key, _ in plan(t.config):
                    shared.setdefault(name, set()).add(key)
        r = sweep.spec.resources
        print(f"\nper trial: {r.cpu:g} CPU, {r.gpu:g} GPU; retries on worker death: {sweep.spec.retries}; "
              f"max in flight: {sweep.spec.concurrency.max_trials or 'as resources allow'}")
        if not args.address and len(results) < len(sweep.trials):
            _warn_unrunnable(r, args.num_cpus)
        if shared:
            print("shared stages to run once per key: " + ", ".join(f"{n} x{len(k)}" for n, k in shared.items()))
        if sweep.spec.devices:
            for line in device_stage_lines(sweep, getattr(args, "devices", None)):
                print(line)
        print(f"data: {opts.data_dir}   MLflow: {opts.uri}")
        if len(sweep.trials) > GRID_LIMIT and not args.yes:
            print(f"running it needs --yes: {len(sweep.trials)} trials is more than {GRID_LIMIT}")
        return 0
    opts.address, opts.num_cpus, opts.worker_logs = args.address, args.num_cpus, args.worker_logs
    outcome = run_sweep(sweep, opts)
    print_summary(outcome)
    if sweep.spec.report and not outcome.interrupted:
        _report(sweep, opts)
    if outcome.interrupted:
        return 130
    return 0 if outcome.ok else 1


def _local_gpus() -> int:
    import torch

    return torch.cuda.device_count()


def _warn_unrunnable(r, num_cpus: int | None) -> None:
    """A dry run on local Ray: say when no trial could start on this machine (they would wait forever,
    listed as pending)."""
    from .checks import cpu_limit

    cpus = num_cpus or cpu_limit()
    gpus = _local_gpus() if r.gpu else 0
    short = [f"{need:g} {what} (this machine has {have})" for need, have, what in
             ((r.cpu, cpus, "CPU"), (r.gpu, gpus, "GPU")) if need > have]
    if short:
        print(f"warning: no trial can run here: each needs {' and '.join(short)}; the pending trials would wait "
              "forever on local Ray (join a cluster with --address, or lower them with --resources)",
              file=sys.stderr)


def device_stage_lines(sweep, devices_file: str | None = None) -> list[str]:
    """What ``--dry-run`` says of the device stages: per target, the models one session will time together
    after training (each trial's export, compiled for phones, and the baselines), or why it is skipped."""
    from ..plan.devices import plan_devices

    plan = plan_devices(sweep.spec.devices, devices_file)
    roles = sweep.baseline_roles()
    n = len(sweep.trials)
    quantized = sum(1 for t in sweep.trials if t.id not in sweep.baselines and t.config["method"] != "none")
    out = []
    for job in plan.jobs:
        how = ("compiled for " + job.compile_target) if job.compile_target else "the export as is"
        where = "the whole node, after training" if job.exclusive_node else "after training"
        out.append(f"device stage {job.target}: {n} models ({quantized} quantized, baselines: "
                   f"{', '.join(roles) or 'none'}), {how}, timed together in one interleaved session ({where}; "
                   + ", ".join(f"{w['graph']} x{w['repeats']}" for w in job.workloads) + ")")
    out += [f"device stage {target}: skipped ({why})" for target, why in plan.skipped]
    return out


def override_resources(current, text: str):
    """``cpu=1,gpu=0,custom.phone:sm8650=1`` over a sweep's ``resources:``; errors name the flag and key."""
    from pydantic import ValidationError

    from ..plan.spec import Resources

    merged = current.model_dump()
    merged["custom"] = dict(merged.get("custom") or {})
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--resources: {item!r} is not KEY=VALUE (e.g. --resources cpu=1,gpu=0)")
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"--resources: {key}={value!r} is not a number") from None
        if key.startswith("custom.") and key[len("custom."):]:
            merged["custom"][key[len("custom."):]] = number
        elif key in ("cpu", "gpu", "memory_gb"):
            merged[key] = number
        else:
            raise ValueError(f"--resources: unknown key {key!r}; known: cpu, gpu, memory_gb, custom.<name>")
    try:
        return Resources.model_validate(merged)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise ValueError(f"--resources: {where}: {err['msg']}, got {err.get('input')!r}") from None


def _report(sweep, opts) -> None:
    from reports import sweep_report

    try:
        path = sweep_report(sweep.name, tracking_uri=opts.uri, out_dir=DataLayout(opts.data_dir).reports(sweep.name))
    except Exception as e:  # the trials are recorded; a report that cannot be built must not hide that
        print(f"report: not written ({type(e).__name__}: {e}); `farm report {sweep.file}` retries", file=sys.stderr)
        return
    print(f"report: {path}")


def _check_axes(sweep: str, uri: str, flags: dict) -> None:
    """A --columns / --x param that no trial has is refused (the report would silently leave its table
    out); one that does not vary between the trials is a warning."""
    asked = {flag: key for flag, key in flags.items() if key}
    if not asked:
        return
    from reports.runs import load_trials
    from reports.sweep_report import varying

    trials = load_trials(sweep, uri)
    params = sorted({k for t in trials for k in t.params})
    axes = varying(trials)
    for flag, key in asked.items():
        if key not in params:
            raise UsageError(f"{flag} {key!r}: no trial of sweep {sweep!r} has that param; params that vary: "
                             f"{', '.join(axes) or 'none'}")
        if key not in axes:
            print(f"warning: {flag} {key!r} has one value in every trial of sweep {sweep!r}: the report has no "
                  f"table or plot by it (params that vary: {', '.join(axes) or 'none'})", file=sys.stderr)


def cmd_report(args) -> int:
    from reports import sweep_report

    opts = _options(args, read_only=True)
    name = args.sweep
    if Path(args.sweep).exists() or args.sweep.endswith((".yaml", ".yml")):
        from ..plan.spec import load_sweep

        name = load_sweep(args.sweep, max_trials=None).name
    out = Path(args.out) if args.out else DataLayout(opts.data_dir).reports(name)
    _check_axes(name, opts.uri, {"--columns": args.columns, "--x": args.x})
    path = sweep_report(name, tracking_uri=opts.uri, out_dir=out, columns=args.columns, x=args.x)
    print(path.read_text())
    print(f"report: {path}", file=sys.stderr)
    return 0


def cmd_gc(args) -> int:
    from ..orchestrate.gc import collect

    opts = _options(args, read_only=True, store_needed=False)
    uri = opts.uri if (args.tracking_uri or DataLayout(opts.data_dir).mlflow_db.exists()) else None
    rep = collect(opts.data_dir, uri, tuple(args.stage or ("quantize",)), keep_best=not args.all,
                  dry_run=args.dry_run)
    verb = "would remove" if rep.dry_run else "removed"
    print(f"farm gc: {verb} {len(rep.removed)} cache entries ({rep.freed_bytes / 2**30:.2f} GiB) under "
          f"{DataLayout(opts.data_dir).stages}; kept {len(rep.kept)} registered as best")
    for p in rep.kept:
        print(f"  kept {p}")
    return 0


def cmd_status(args) -> int:
    from ..orchestrate.progress import table
    from ..plan.spec import load_sweep
    from ..orchestrate.summary import numerics_mismatch, numerics_note, sweep_status

    is_file = Path(args.sweep).exists() or args.sweep.endswith((".yaml", ".yml"))
    # a sweep file's status needs no store yet (every trial pending); a sweep name does
    opts = _options(args, read_only=True, store_needed=not is_file)
    if is_file:
        sweep = load_sweep(args.sweep, max_trials=None)
        rows, cols, counts = sweep_status(sweep, opts)
        other = counts.pop("other_numerics", {})
        extra = "  ".join(f"{k} {v}" for k, v in counts.items() if k not in ("total", "done") and v)
        print(f"sweep {sweep.name}: {counts['total']} trials, {counts['done']} done  {extra}".rstrip())
        print(table(rows, cols))
        if numerics_note(other):
            print(numerics_note(other))
        return 0
    from ..orchestrate.tracking import Tracker

    tracker = Tracker(opts.uri, args.sweep)
    if tracker.experiment(create=False) is None:
        raise ValueError(f"no sweep named {args.sweep!r} in {opts.uri} (and no such file)")
    rows, other = [], {}
    for run in reversed(tracker.trial_runs()):
        tags, metrics = run.data.tags, run.data.metrics
        ppl = [k for k in metrics if k.startswith("ppl/")]
        found = run.data.params.get("numerics")
        rows.append({"trial": tags.get("trial_id", "")[:8], "scheme": tags.get("scheme"),
                     "method": tags.get("method"), "status": run.info.status,
                     "numerics": f"{found or '-'}{' (other)' if numerics_mismatch(found) else ''}",
                     **({ppl[0]: metrics[ppl[0]]} if ppl else {})})
        if numerics_mismatch(found):
            other[found or "none"] = other.get(found or "none", 0) + 1
    cols = ["trial", "scheme", "method", "status", "numerics"] + sorted(
        {k for r in rows for k in r if k.startswith("ppl/")})
    print(f"sweep {args.sweep}: {len(rows)} trial runs in MLflow")
    print(table(rows, cols))
    if numerics_note(other):
        print(numerics_note(other))
    return 0


def ui_command(data_dir: Path, tracking_uri: str | None, host: str, port: int) -> tuple[list[str], dict]:
    """The lean MLflow server command (docs/stack.md): one worker, no job runners, no telemetry."""
    from ..orchestrate.tracking import default_uri

    data_dir = Path(data_dir)
    artifacts = DataLayout(data_dir).artifacts
    artifacts.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", tracking_uri or default_uri(data_dir),
           "--artifacts-destination", str(artifacts.resolve()), "--host", host,
           "--port", str(port), "--workers", "1"]
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    return cmd, env


def cmd_ui(args) -> int:
    warning = check_listen(args.host, args.port)  # a taken port or a bad host fails here, not in the server
    opts = _options(args)  # not read-only: the server is also where sweeps on other machines log to
    if warning:
        print(warning, file=sys.stderr)
    cmd, env = ui_command(opts.data_dir, args.tracking_uri, args.host, args.port)
    print(f"MLflow UI on http://{args.host}:{args.port} (store {args.tracking_uri or opts.uri}); Ctrl-C stops it",
          file=sys.stderr)
    def stop(signum, frame):
        raise KeyboardInterrupt

    # SIGTERM (and a SIGINT a background shell would ignore) stop the server with its workers
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    proc = subprocess.Popen(cmd, env=env)
    try:
        rc = proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        return 0
    if rc != 0:  # the server's own output is above; the exit status says it failed
        raise UsageError(f"the MLflow server exited with status {rc} (its output is above)")
    return 0
