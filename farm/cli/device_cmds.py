"""The `farm devices` and `farm bench` subcommands (wired into farm/cli/app.py).

    farm devices [--devices FILE] [--json]               # every device of the pool with its health
    farm bench EXPORT --device NAME|KIND [--graph prefill|decode] [--repeats N] [--warmup N] [--tokens N]
               [--json]                                   # the measurement protocol on one device
    farm bench A B --device NAME|KIND [--rounds 5]       # variants on one device, interleaved A/B/A/B

The devices file is --devices, else $MQFARM_DEVICES, else ./devices.yaml, else the defaults (host, and
qnn-sim where onnxruntime-qnn is installed); see docs/devices.md. Progress goes to stderr; the record to
stdout (one JSON object per workload with --json).
"""

from __future__ import annotations

import json
import sys

from ..work.measure import eval_windows
from .checks import check_threads
from .printing import print_table

GRAPHS = ("prefill", "decode")


class BenchError(ValueError):
    """Bad input or a refusing device: `farm` prints it as one line and exits 2 (a ValueError, which the
    command line's handler turns into that line)."""


def add_commands(sub) -> dict:
    d = sub.add_parser("devices", help="list the device pool with each device's health")
    d.add_argument("--devices", default=None, help="devices file (default $MQFARM_DEVICES or ./devices.yaml)")
    d.add_argument("--json", action="store_true", help="one JSON object per device")
    d.add_argument("--check", default=None, metavar="NAME",
                   help="preflight one phone: SoC, SDK files, battery nodes, charging, thermal, storage, runtime "
                        "version, and a tiny known graph run on it (with --export EXPORT: its compiled folder too)")
    d.add_argument("--export", default=None, help="with --check: the export the night will measure")

    b = sub.add_parser("bench", help="measure an export folder on a device (latency, tokens/s, energy)")
    b.add_argument("export", nargs="+", help="export folder (written by `farm export`); two or more are "
                   "compared on one device, interleaved A/B/A/B")
    b.add_argument("--device", required=True, help="a device name from `farm devices`, or a kind: "
                   "host, qnn-sim, adb, aihub (any available device of it)")
    b.add_argument("--graph", choices=GRAPHS + ("both",), default="both",
                   help="prefill (latency at the export's prompt length), decode (tokens/s), or both (default)")
    b.add_argument("--repeats", type=int, default=20, help="timed runs (default 20)")
    b.add_argument("--warmup", type=int, default=3, help="untimed runs first (default 3)")
    b.add_argument("--tokens", type=int, default=16, help="decode steps per timed run (default 16)")
    b.add_argument("--threads", type=int, default=None, help="host: intra-op threads (default: the devices file's)")
    b.add_argument("--allow-charging", action="store_true", help="phones: measure power while USB charges")
    b.add_argument("--rounds", type=int, default=5, help="with several exports: interleaved rounds (default 5)")
    b.add_argument("--devices", default=None, help="devices file (default $MQFARM_DEVICES or ./devices.yaml)")
    b.add_argument("--json", action="store_true", help="print each record as one JSON object")
    return {"devices": cmd_devices, "bench": cmd_bench}


def _fmt(v, unit: str = "", digits: int = 1) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    return f"{v:.{digits}f}{unit}" if isinstance(v, float) else f"{v}{unit}"


def _gib(n) -> str:
    return "-" if n is None else f"{n / 2**30:.1f} GiB"


def cmd_check(args) -> int:
    """`farm devices --check NAME`: devicelab.preflight's checks, one line each; exit 1 when one fails."""
    from devicelab import inventory, preflight
    from devicelab.pool import Pool

    inv = inventory.load(args.devices)
    entry = inv.get(args.check)
    if entry is None or entry.kind != "adb":
        raise BenchError(f"--check {args.check!r}: not a phone of the pool (phones: "
                         f"{', '.join(e.name for e in inv.entries if e.kind == 'adb') or 'none'})")
    checks = preflight.run_checks(Pool(inv).device(entry), args.export)
    for c in checks:
        if args.json:
            print(json.dumps(c.to_dict(), sort_keys=True))
        else:
            print(f"{'ok  ' if c.ok else 'FAIL'}  {c.check:<16} {c.detail}")
    return 0 if all(c.ok for c in checks) else 1


def _phone_windows(pool, args):
    """Four windows of real text when the target is a phone and the export carries its tokenizer, else None."""
    from devicelab.exported import read_export

    try:
        phones = any(e.kind == "adb" for e in pool.resolve(args.device))
    except ValueError:  # an unknown target: pool.bench names it
        return None
    exp = read_export(args.export[0])
    return eval_windows(exp, 4) if phones and (exp.root / "tokenizer").is_dir() else None


def cmd_eval_device(args) -> int:
    """`farm eval EXPORT --device NAME`: the phone's logits for real text against onnxruntime's CPU."""
    from devicelab import inventory
    from devicelab.device_eval import evaluate_on_device
    from devicelab.exported import read_export
    from devicelab.pool import Pool
    from devicelab.protocol import DeviceError

    exp = read_export(args.artifact)
    inv = inventory.load(getattr(args, "devices", None))
    entry = inv.get(args.device)
    if entry is None or entry.kind != "adb":
        raise BenchError(f"--device {args.device!r}: not a phone of the pool (phones: "
                         f"{', '.join(e.name for e in inv.entries if e.kind == 'adb') or 'none'})")
    try:
        res = evaluate_on_device(Pool(inv).device(entry), exp.root, eval_windows(exp, args.limit or 8))
    except DeviceError as e:
        raise BenchError(str(e)) from None
    if args.json:
        print(json.dumps(res, sort_keys=True))
    else:
        print(f"{res['device']}: {res['windows']} windows, top-1 agreement with onnxruntime CPU "
              f"{res['top1_agreement']:.2%} (worst window {res['worst_window_top1']:.2%}); perplexity "
              f"{res['ppl_device']:.3f} on the phone, {res['ppl_cpu']:.3f} on the CPU; mean |logit diff| "
              f"{res['mean_abs_logit_diff']:.3g}")
    return 0


def cmd_devices(args) -> int:
    from devicelab import inventory
    from devicelab.pool import Pool

    if args.check:
        return cmd_check(args)
    server = inventory.adb_server_address()
    was_running = _listening(server)
    try:
        return _list_devices(args, inventory, Pool)
    finally:  # asking a phone's health starts an adb server (adbutils does): stop the one this command started
        if not was_running and _listening(server):
            _stop_adb_server(server)


def _listening(server: tuple[str, int]) -> bool:
    import socket

    try:
        with socket.create_connection(server, timeout=0.5):
            return True
    except OSError:
        return False


def _stop_adb_server(server: tuple[str, int]) -> None:
    import adbutils

    try:
        adbutils.AdbClient(host=server[0], port=server[1], socket_timeout=5).server_kill()
    except Exception as e:  # adbutils raises its own errors; the listing itself is done
        print(f"note: the adb server this command started on {server[0]}:{server[1]} is still running "
              f"({type(e).__name__}: {e}); `adb kill-server` stops it", file=sys.stderr)
        return
    print(f"note: stopped the adb server this command started on {server[0]}:{server[1]}", file=sys.stderr)


def _list_devices(args, inventory, Pool) -> int:
    inv = inventory.load(args.devices)
    pool = Pool(inv)
    rows = []
    for e in inv.entries:
        h = pool.health(e)
        row = {"name": e.name, "kind": e.kind, "online": _fmt(h.online), "battery": _fmt(h.battery_pct, "%", 0),
               "temp": _fmt(h.temperature_c, " C"), "charging": _fmt(h.charging), "free": _gib(h.free_storage_bytes),
               "detail": h.detail}
        if args.json:
            print(json.dumps({"name": e.name, "kind": e.kind, "source": e.source, **h.to_dict()}, sort_keys=True))
        rows.append(row)
    if not args.json:
        print_table(rows, ["name", "kind", "online", "battery", "temp", "charging", "free", "detail"])
        print(f"\ndevices file: {inv.path or 'none (defaults); see docs/devices.md'}; locks in {inv.lock_dir}")
    return 0


def _check_counts(args) -> None:
    for flag in ("repeats", "tokens", "rounds"):
        if getattr(args, flag) < 1:
            raise BenchError(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    if args.warmup < 0:
        raise BenchError(f"--warmup must be 0 or more, got {args.warmup}")
    if args.threads is not None and args.threads < 1:
        raise BenchError(f"--threads must be at least 1, got {args.threads}")
    check_threads(args.threads)


def print_record(rec, file=None) -> None:
    """A measurement for people: the identity, then median / p90 / CI (and what the numbers mean)."""
    file = file or sys.stdout
    d, w = rec.device, rec.workload
    print(f"device   {d.name} ({d.kind}): {d.model}, {d.soc}; {d.runtime} {d.runtime_version}", file=file)
    print(f"         {d.os_build}", file=file)
    what = f"prefill of {w.prompt_len} tokens" if w.graph == "prefill" else f"decode, {w.tokens} steps per run"
    print(f"workload {what}; {w.warmup} warm-up + {w.repeats} timed runs; model {rec.model_id}", file=file)
    if rec.status != "ok":
        print(f"FAILED   {rec.error}", file=file)
        return
    unit = "ms" if w.graph == "prefill" else "ms/token"
    print(f"latency  median {rec.median_ms:.4g} {unit}  p90 {rec.p90_ms:.4g}  "
          f"{rec.ci_level:.0%} CI of the median [{rec.ci_low_ms:.4g}, {rec.ci_high_ms:.4g}]", file=file)
    if rec.tokens_per_s is not None:
        print(f"decode   {rec.tokens_per_s:.1f} tokens/s", file=file)
    elif "prefill_tok_s" in rec.extra:
        print(f"prefill  {rec.extra['prefill_tok_s']:.1f} tokens/s", file=file)
    if "context_load_ms" in rec.extra:
        print(f"context  loads in {rec.extra['context_load_ms']:.4g} ms (first inference "
              f"{rec.extra.get('first_inference_ms', float('nan')):.4g} ms, left out)", file=file)
    energy = rec.extra.get("energy") if isinstance(rec.extra.get("energy"), dict) else {}
    if rec.energy_mj_per_token is not None:
        se = energy.get("energy_mj_per_token_se")
        print(f"energy   {rec.energy_mj_per_token:.3g}" + (f" +- {se:.2g}" if se is not None else "") +
              f" mJ/token at {rec.power_mw:.0f} mW above idle", file=file)
    elif energy.get("refused"):
        print(f"energy   none: {energy['refused']}", file=file)
    if not rec.latency_meaningful:
        print("note     emulated device: these times are NOT latency (outputs only)", file=file)


def cmd_bench(args) -> int:
    from dataclasses import replace

    from devicelab import inventory
    from devicelab.exported import read_export
    from devicelab.pool import Pool
    from devicelab.protocol import DeviceError, Workload

    _check_counts(args)
    for path in args.export:  # a wrong or unknown-version export fails before any device is touched
        read_export(path)
    inv = inventory.load(args.devices)
    if args.threads is not None:
        inv.entries = [replace(e, options={**e.options, "threads": args.threads}) if e.kind == "host" else e
                       for e in inv.entries]
    pool = Pool(inv, on_event=lambda msg: print(msg, file=sys.stderr, flush=True))
    graphs = GRAPHS if args.graph == "both" else (args.graph,)
    workloads = [Workload(graph=g, tokens=args.tokens, warmup=args.warmup, repeats=args.repeats,
                          threads=args.threads or 1, allow_charging=args.allow_charging) for g in graphs]
    if len(args.export) > 1:
        return _compare(pool, args, workloads)
    try:  # phones read their inputs from files: real text of the evaluation corpus, not synthetic ids
        result = pool.bench(args.export[0], args.device, workloads, windows=_phone_windows(pool, args))
    except DeviceError as e:  # the device refused (storage, busy, backend missing): one line, exit 2
        raise BenchError(str(e)) from None
    for rec in result.failed + result.records:
        if args.json:
            print(json.dumps(rec.to_dict(), sort_keys=True))
        else:
            print_record(rec)
            print()
    if not result.ok:
        print(f"farm bench: error: {len(result.records)}/{result.wanted} workloads measured; every "
              f"{args.device} device tried was lost", file=sys.stderr)
        return 1
    return 0


def _compare(pool, args, workloads) -> int:
    """Several exports on one device, interleaved; the first is the baseline of the ratios."""
    from devicelab.protocol import DeviceError

    exports = {}
    for path in args.export:
        label = path.rstrip("/").rsplit("/", 1)[-1]
        exports[label if label not in exports else path] = path
    for w in workloads:
        try:
            recs = pool.compare(exports, args.device, w, rounds=args.rounds)
        except DeviceError as e:
            raise BenchError(str(e)) from None
        base = next(iter(recs.values()))
        for label, rec in recs.items():
            if args.json:
                print(json.dumps(rec.to_dict(), sort_keys=True))
                continue
            print(f"variant  {label}")
            print_record(rec)
            if rec is not base:
                print(f"vs {next(iter(recs))}: median x{rec.median_ms / base.median_ms:.3f}")
            print()
    return 0
