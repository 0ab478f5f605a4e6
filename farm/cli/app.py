"""`farm`: the command line of MobileQuant Farm.

    farm quantize --model smollm2-135m --scheme w8a8 --method rtn --calib-samples 32 --seqlen 512 --out DIR
    farm eval DIR                                   # a saved artifact
    farm eval --model smollm2-135m --scheme fp      # a model quantized in memory (or float)
    farm eval DIR --suite local                     # zero-shot tasks through lm-eval (quant.eval.harness)
    farm sensitivity DIR --by role                  # which tensors (or layers) cost the most perplexity
    farm models [list|convert NAME|verify NAME]
    farm verify DIR                                 # an artifact's files against its manifest (sha256)

Errors in user input exit with status 2 and one line naming what is wrong; nothing is half-written.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from . import deploy_cmds, device_cmds, diff_cmd, method_args, nightly_cmd, sweep_cmds
from .errors import UsageError
from .printing import print_table, report


def _add_model_args(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--model", required=required, help="embedded model name, local folder or hub id")
    p.add_argument("--layers", type=int, default=None, help="load only the first N decoder layers (quick looks)")
    p.add_argument("--scheme", default="w8a8",
                   help="fp | w8a16 | w8a8 | w4a8 | w4a8-sym | w<b>a<b>[-sym], optionally with role overrides "
                        "such as w8a8:down.in=16 (roles: quant/scheme.py)")
    p.add_argument("--method", default="rtn",
                   help="rtn | smoothquant | omniquant | lrl-block | mobilequant (hyper-parameters: flags below)")
    p.add_argument("--calib-samples", type=int, default=32, help="calibration windows")
    p.add_argument("--calib-corpus", default="news", help="calibration corpus name or text file")
    p.add_argument("--seqlen", type=int, default=None,
                   help="window length in tokens (default 512; an artifact is evaluated at its calibration window)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rotate", default="none", choices=["none", "random", "hadamard"],
                   help="fold an orthogonal rotation into the weights before the method (quant/rotation.py)")
    p.add_argument("--rotate-seed", type=int, default=0, help="seed of the rotation matrices")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (CUDA when torch sees one)")
    method_args.add(p)


def _add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--corpus", default="wiki", help="evaluation corpus name or text file")
    p.add_argument("--split", default="test", choices=["test", "validation"],
                   help="perplexity on the test split (first 75%% of the tokens; reported numbers) or the "
                        "validation split (last 25%%; for choosing hyper-parameters)")
    p.add_argument("--limit", type=int, default=None,
                   help="evaluate only the first N windows (with --suite: N documents per task)")
    p.add_argument("--batch-size", type=int, default=None, help="default 1 (perplexity), 16 (--suite)")
    p.add_argument("--suite", default=None,
                   help="zero-shot tasks through lm-eval instead of perplexity: 'local' (all mq_* tasks), or "
                        "names such as mq_lambada,hellaswag (standard lm-eval names are passed through)")
    p.add_argument("--json", action="store_true", help="print the metrics as one JSON object")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="farm", description="MobileQuant Farm: quantize, evaluate, sweep.")
    sub = parser.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="quantize a model and save the artifact folder")
    _add_model_args(q, required=True)
    q.add_argument("--out", required=True, help="artifact folder to write")
    q.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    q.add_argument("--eval", action="store_true", help="also evaluate perplexity (or --suite) after quantizing")
    _add_eval_args(q)

    e = sub.add_parser("eval", help="evaluate an artifact folder, an export folder, or a model with --model")
    e.add_argument("artifact", nargs="?", help="artifact folder written by `farm quantize`, or an export folder "
                                               "written by `farm export` (then --runtime runs its graph)")
    e.add_argument("--runtime", default=None, choices=["onnx", "qnn-htp"],
                   help="for an export folder: onnx = onnxruntime CPU (QDQ semantics), qnn-htp = the QNN HTP "
                        "emulator of onnxruntime-qnn (slow); default onnx")
    e.add_argument("--devices", default=None, help="for an export folder with --device PHONE (a phone of the pool, "
                                                   "not cpu/cuda): the devices file; the phone's logits are scored "
                                                   "against onnxruntime CPU (default $MQFARM_DEVICES or ./devices.yaml)")
    e.add_argument("--device-table", action="store_true",
                   help="for an artifact folder: simulate it as the phone runs it (its scheme plus the device overrides: "
                        "16-bit residual stream, quantized final norm and lm_head; learned ranges kept)")
    _add_model_args(e, required=False)
    _add_eval_args(e)

    s = sub.add_parser("sensitivity", help="error budget: perplexity with each role (or layer) of quantizers in float")
    s.add_argument("artifact", nargs="?", help="artifact folder written by `farm quantize`")
    _add_model_args(s, required=False)
    s.add_argument("--by", default="role", choices=["role", "layer", "kind"], help="how quantizers are grouped")
    s.add_argument("--corpus", default="wiki", help="evaluation corpus name or text file")
    s.add_argument("--limit", type=int, default=20, help="evaluation windows (each group costs one pass over them)")
    s.add_argument("--json", action="store_true", help="print the budget as one JSON object")

    m = sub.add_parser("models", help="list, convert or verify the embedded models")
    m.add_argument("action", nargs="?", default="list", choices=["list", "convert", "verify"])
    m.add_argument("name", nargs="?")
    m.add_argument("--force", action="store_true")

    v = sub.add_parser("verify", help="check an artifact folder against its manifest (every file's size and sha256)")
    v.add_argument("artifact", help="artifact folder written by `farm quantize` or a sweep")
    v.add_argument("--sizes-only", action="store_true",
                   help="check sizes only (the default hashes every file; every load checks every size and the "
                        "sha256 of the files under 64 MB, all but the weights)")

    COMMANDS.update(sweep_cmds.add_commands(sub))  # sweep, status, report, gc, ui
    COMMANDS.update(deploy_cmds.add_commands(sub))  # export, compile
    COMMANDS.update(diff_cmd.add_commands(sub))  # diff
    COMMANDS.update(device_cmds.add_commands(sub))  # devices, bench
    COMMANDS.update(nightly_cmd.add_commands(sub))  # nightly
    return parser


def _check_suite(args) -> None:
    if args.suite:  # unknown task names fail before any model is loaded
        from quant.eval import harness

        harness.resolve_suite(args.suite)


def _run_suite(lm, label: dict, args, progress: bool, extra: dict | None = None) -> None:
    from quant.eval import harness

    try:
        metrics = harness.run_suite(lm, args.suite, limit=args.limit, progress=progress,
                                    batch_size=args.batch_size or harness.DEFAULT_BATCH_SIZE)
    except harness.TaskLoadError as e:
        raise UsageError(str(e)) from e
    if args.json:
        print(json.dumps({**label, **(extra or {}), "suite": args.suite, "lmeval": metrics}, sort_keys=True))
    else:
        print_table(harness.table_rows(metrics), ["task", "metric", "value", "n"])
        where = ", ".join(f"{k}={v}" for k, v in label.items())
        print(f"\n{where}  suite {metrics['lmeval/suite_s']:.1f}s")


def _quantize_in_memory(args, progress: bool):
    from quant import CalibConfig, load_model, quantize
    from quant.methods import get_method, method_config
    from quant.scheme import get_scheme

    if not get_scheme(args.scheme).is_float:  # fail before loading anything
        get_method(args.method)
    elif args.method not in ("rtn", "none"):  # rtn is the flag's default; anything else was asked for
        raise UsageError(f"--scheme {args.scheme} is float: --method {args.method} would not run (drop --method, "
                         "or choose a quantized scheme such as w8a8)")
    if args.seqlen is not None and args.seqlen < 2:
        raise UsageError(f"--seqlen must be at least 2, got {args.seqlen}")
    hp = method_args.overrides(args)
    if args.method == "mobilequant" and "checkpoint_dir" not in hp and getattr(args, "out", None):
        hp["checkpoint_dir"] = str(Path(args.out)) + ".checkpoint"  # rerunning the command resumes
    if not get_scheme(args.scheme).is_float:
        method_config(args.method, hp)  # unknown or mistyped hyper-parameters fail before loading the model
    lm = load_model(args.model, num_layers=args.layers, device=args.device)
    seqlen = 512 if args.seqlen is None else args.seqlen  # quantize() checks it against the model's context
    res = quantize(lm, scheme=args.scheme, method=args.method, method_config=hp,
                   calib=CalibConfig(args.calib_samples, seqlen, args.seed, args.calib_corpus), progress=progress,
                   rotate={"kind": args.rotate, "seed": args.rotate_seed})
    return lm, res, seqlen


def cmd_quantize(args) -> int:
    from quant import artifact, evaluate_perplexity

    from quant.files import check_replaceable

    out = Path(args.out)
    check_replaceable(out, args.overwrite)  # before any work: only a folder this tool wrote is replaced
    _check_suite(args)
    progress = not args.json
    lm, res, seqlen = _quantize_in_memory(args, progress)
    path = artifact.save(lm.model, lm.tokenizer, out, res.recipe, overwrite=args.overwrite)
    label = {"model": args.model, "scheme": args.scheme, "method": res.recipe["method"]}
    print(f"wrote {path} (quantize {res.recipe['timing']['quantize_s']:.1f}s)", file=sys.stderr)
    if args.suite:  # --suite implies --eval
        _run_suite(lm, label, args, progress, {"artifact": str(path)})
    elif args.eval:
        ppl = evaluate_perplexity(lm, seqlen, args.corpus, args.limit, args.batch_size or 1, progress=progress,
                                  split=args.split)
        report(label, ppl, args.json, {"artifact": str(path)})
    elif args.json:
        print(json.dumps({**label, "artifact": str(path), "recipe": res.recipe}, sort_keys=True, default=str))
    return 0


def _model_for_eval(args, progress: bool):
    """The artifact folder or the ``--model`` quantized in memory: (lm, label, seqlen)."""
    from quant import artifact

    if args.artifact and args.model:
        raise UsageError("give either an artifact folder or --model, not both")
    if args.artifact:
        if getattr(args, "device_table", False):  # the artifact as the phone runs it (quant.device_table)
            from quant.device_table import to_device_table

            lm = to_device_table(args.artifact, device=args.device, progress=progress)
        else:
            lm = artifact.load(args.artifact, device=args.device)
        recipe = lm.recipe
        if args.seqlen is not None and args.seqlen < 2:
            raise UsageError(f"--seqlen must be at least 2, got {args.seqlen}")
        seqlen = args.seqlen if args.seqlen is not None else recipe.get("calibration", {}).get("seqlen", 512)
        if args.seqlen is None and seqlen != 512:  # ppl at another window length is a different metric
            print(f"evaluating at seqlen {seqlen}, the artifact's calibration window (--seqlen to change)",
                  file=sys.stderr)
        label = {"model": recipe.get("model"), "scheme": recipe.get("scheme"), "method": recipe.get("method")}
        return lm, label, seqlen
    if args.model:
        lm, res, seqlen = _quantize_in_memory(args, progress)
        return lm, {"model": args.model, "scheme": args.scheme, "method": res.recipe["method"]}, seqlen
    raise UsageError(f"farm {args.command} needs an artifact folder or --model")


def _is_phone(device) -> bool:
    """For an export folder, ``--device`` names a phone of the pool unless it is a torch device."""
    return bool(device) and device not in ("cpu", "auto") and not str(device).startswith("cuda")


def cmd_eval(args) -> int:
    from quant import evaluate_perplexity

    progress = not args.json
    if deploy_cmds.is_export(args.artifact) and _is_phone(args.device):
        from . import device_cmds

        return device_cmds.cmd_eval_device(args)
    if deploy_cmds.is_export(args.artifact):
        return deploy_cmds.eval_export(args, progress)
    if args.runtime:
        raise UsageError(f"--runtime needs an export folder (written by `farm export`); {args.artifact} has no export.json")
    _check_suite(args)
    lm, label, seqlen = _model_for_eval(args, progress)
    if args.suite:
        _run_suite(lm, label, args, progress)
        return 0
    ppl = evaluate_perplexity(lm, seqlen, args.corpus, args.limit, args.batch_size or 1, progress=progress,
                                  split=args.split)
    report(label, ppl, args.json)
    return 0


def cmd_sensitivity(args) -> int:
    from quant import data
    from quant.api import check_seqlen
    from quant.sensitivity import error_budget

    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit must be at least 1, got {args.limit}")
    lm, label, seqlen = _model_for_eval(args, progress=not args.json)
    check_seqlen(lm, seqlen)
    print(f"error budget by {args.by}: one pass over the windows per group, plus quantized and float",
          file=sys.stderr)
    windows = data.eval_windows(lm.tokenizer, seqlen, args.corpus, limit=args.limit, add_bos=lm.add_bos)

    def report(done, total, row):  # on stderr even with --json: a budget takes one evaluation per group
        print(f"[{done}/{total}] {row.group}: ppl {row.ppl:.3f}", file=sys.stderr, flush=True)

    budget = error_budget(lm.model, windows, by=args.by, progress=False, on_group=report)
    if args.json:
        print(json.dumps({**label, **budget.to_dict()}, sort_keys=True))
        return 0
    rows = [{args.by: r.group, "sites": r.quantizers, "ppl in float": f"{r.ppl:.3f}",
             "share of gap": f"{100 * r.share:.1f}%"} for r in budget.rows]
    print_table(rows, [args.by, "sites", "ppl in float", "share of gap"])
    print(f"\n{', '.join(f'{k}={v}' for k, v in label.items())}: fp {budget.fp_ppl:.3f}, quantized "
          f"{budget.quant_ppl:.3f} on {budget.windows} windows of {budget.seqlen}")
    return 0


def cmd_models(args) -> int:
    from quant import zoo

    if args.action == "list":
        rows = []
        for name, e in zoo.ZOO.items():
            cached = (zoo.model_dir(name) / zoo.MANIFEST).exists()
            rows.append({"name": name, "cached": "yes" if cached else "no", "license": e.license,
                         "description": e.description})
        print_table(rows, ["name", "cached", "license", "description"])
        print(f"\ncache: {zoo.cache_root()} (set MQFARM_CACHE to move it)")
        return 0
    if not args.name:
        raise UsageError(f"farm models {args.action} needs a model name ({', '.join(zoo.ZOO)})")
    if args.action == "convert":
        print(zoo.convert(args.name, force=args.force))
    else:
        if args.name not in zoo.ZOO:
            raise UsageError(f"unknown embedded model {args.name!r}; available: {', '.join(zoo.ZOO)}")
        print(json.dumps(zoo.verify(zoo.model_dir(args.name), full=True), indent=2))
    return 0


def cmd_verify(args) -> int:
    import time

    from quant import artifact

    t0 = time.perf_counter()
    summary = artifact.verify(args.artifact, full=not args.sizes_only)
    what = "sizes" if args.sizes_only else "sizes and sha256"
    print(f"{args.artifact}: ok, {summary['files']} files, {summary['bytes'] / 1e6:.1f} MB, {what} match the "
          f"manifest ({time.perf_counter() - t0:.2f}s)")
    for rel in summary["unlisted"]:
        print(f"  not in the manifest (added later, not checked): {rel}")
    return 0


COMMANDS = {"verify": cmd_verify, "quantize": cmd_quantize, "eval": cmd_eval, "sensitivity": cmd_sensitivity,
            "models": cmd_models}


def one_line(e: BaseException) -> str:
    """An error as the one line `farm` prints: continuation lines (YAML marks, server replies) joined."""
    text = " ".join(part.strip() for part in str(e).splitlines() if part.strip())
    return text or type(e).__name__


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:  # also while parsing or importing, before a command runs
        print("farm: interrupted", file=sys.stderr)
        return 130


def _main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    from quant.artifact import ArtifactError
    from quant.data import CorpusError
    from quant.train import TrainingDiverged
    from quant.zoo import ModelLoadError
    from devicelab.compile import CompileError
    from devicelab.protocol import DeviceError

    try:
        return COMMANDS[args.command](args)
    except (UsageError, ValueError, ArtifactError, CorpusError, ModelLoadError, OSError, CompileError,
            DeviceError) as e:  # OSError: an unwritable or missing path, named by the error itself
        print(f"farm {args.command}: error: {one_line(e)}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"farm {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"farm {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if type(e).__module__.split(".")[0] != "mlflow":  # a store that refuses: its message, one line
            raise
        print(f"farm {args.command}: error: MLflow: {one_line(e)}", file=sys.stderr)
        return 2

