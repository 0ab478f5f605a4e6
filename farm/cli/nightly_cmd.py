"""The `farm nightly` subcommand: its flags, and the call of the nightly run (farm.orchestrate.nightly)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..orchestrate.nightly import DEFAULT_ALIAS, DEFAULT_PAIRS, DEFAULT_SUITE, run_nightly
from ..orchestrate.regression import DEFAULT_PPL_TOLERANCE, DEFAULT_THRESHOLD


def add_commands(sub) -> dict:
    n = sub.add_parser("nightly", help="the nightly regression run: suite, then A/B latency and perplexity "
                       "against the last accepted night (exit 0 pass, 1 regression, 2 could not run)")
    n.add_argument("suite", nargs="?", default=DEFAULT_SUITE, help=f"suite sweep file (default {DEFAULT_SUITE})")
    n.add_argument("--accept", action="store_true", help="make tonight the baseline (also after a regression)")
    n.add_argument("--baseline", default=DEFAULT_ALIAS, metavar="ALIAS",
                   help=f"alias of the registered model nightly.<suite> to compare with (default {DEFAULT_ALIAS})")
    n.add_argument("--device", default=None, metavar="NAME|KIND",
                   help="measure on this device (name or kind) instead of the suite's devices: entries")
    n.add_argument("--pairs", type=int, default=DEFAULT_PAIRS,
                   help=f"interleaved A/B pairs per workload (default {DEFAULT_PAIRS})")
    n.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                   help="latency: flag a median slowdown above this fraction (default 0.05)")
    n.add_argument("--ppl-tolerance", type=float, default=DEFAULT_PPL_TOLERANCE,
                   help="accuracy: flag a perplexity rise above this fraction (default 0.01)")
    n.add_argument("--htp", action=argparse.BooleanOptionalAction, default=None,
                   help="the HTP-agreement bar: the suite's W8A8 RTN trial on the QNN HTP emulator against the CPU "
                        "(default: where onnxruntime-qnn is installed)")
    n.add_argument("--devices", default=None, help="devices file (default $MQFARM_DEVICES or ./devices.yaml)")
    n.add_argument("--out", default=None, help="report folder (default DATA/reports/<suite>.nightly)")
    n.add_argument("--data", default=None,
                   help="farm data folder: MLflow store, stage cache, results (default runs/farm or $MQFARM_FARM_DIR)")
    n.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: sqlite file in --data)")
    return {"nightly": cmd_nightly}


def cmd_nightly(args) -> int:
    from ..orchestrate.sweep import Options, data_dir_default

    opts = Options(data_dir=Path(args.data) if args.data else data_dir_default(), tracking_uri=args.tracking_uri)
    return run_nightly(args.suite, opts, accept=args.accept, alias=args.baseline, device=args.device,
                       pairs=args.pairs, threshold=args.threshold, ppl_tolerance=args.ppl_tolerance,
                       devices_file=args.devices, out_dir=args.out, htp_check=args.htp)
