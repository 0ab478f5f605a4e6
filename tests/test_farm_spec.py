"""Sweep files: validation errors name file, key path and line; grids expand to content-hashed trials;
a bad file starts nothing (`farm sweep` exits 2 with one line)."""

from __future__ import annotations

import json
import textwrap

import pytest

from farm.core.methods import harness_module
from farm.plan.spec import GRID_LIMIT, SpecError, load_sweep

BASE = """\
name: unit
base:
  model: smollm2-135m
  layers: 1
  samples: 2
  seqlen: 32
  method: rtn
grid:
  scheme: [fp, w8a8, w4a8]
  method: [rtn, smoothquant]
eval:
  perplexity: {limit: 2}
"""


def write(tmp_path, text: str, name: str = "sweep.yaml"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def test_grid_expands_to_normalized_content_hashed_trials(tmp_path):
    p = write(tmp_path, BASE + "methods:\n  smoothquant: {alpha: 0.7}\n")
    sweep = load_sweep(p)
    # fp ignores the method: 3 schemes x 2 methods = 6 combinations, 5 distinct trials
    assert len(sweep.trials) == 5 and sweep.duplicates == 1
    by = {(t.config["scheme"], t.config["method"]): t for t in sweep.trials}
    assert set(by) == {("fp", "none"), ("w8a8", "rtn"), ("w4a8", "rtn"), ("w8a8", "smoothquant"),
                       ("w4a8", "smoothquant")}
    fp = by[("fp", "none")].config
    assert fp["calib"] is None and fp["method_config"] == {}
    sq = by[("w8a8", "smoothquant")].config
    assert sq["method_config"]["alpha"] == 0.7
    assert sq["calib"] == {"samples": 2, "seqlen": 32, "seed": 0, "corpus": "news"}
    assert sq["eval"]["perplexity"] == {"corpus": "wiki", "seqlen": 32, "limit": 2, "batch_size": 1}
    # ids are stable across loads and change with any setting
    assert [t.id for t in load_sweep(p).trials] == [t.id for t in sweep.trials]
    other = load_sweep(write(tmp_path, BASE.replace("samples: 2", "samples: 3"), "other.yaml"))
    assert {t.id for t in other.trials} & {t.id for t in sweep.trials} == {by[("fp", "none")].id}
    assert sweep.varying == ["scheme", "method"]


def test_hyper_parameters_apply_to_the_methods_that_have_them(tmp_path):
    text = BASE.replace("grid:\n", "grid:\n  epochs: [1, 2]\n").replace(
        "method: [rtn, smoothquant]", "method: [rtn, mobilequant]")
    sweep = load_sweep(write(tmp_path, text))
    mq = [t for t in sweep.trials if t.config["method"] == "mobilequant"]
    rtn = [t for t in sweep.trials if t.config["method"] == "rtn"]
    assert sorted(t.config["method_config"]["epochs"] for t in mq) == [1, 1, 2, 2]
    assert len(rtn) == 2 and all("epochs" not in t.config["method_config"] for t in rtn)  # w8a8, w4a8


def _error(tmp_path, text: str, **kw) -> str:
    p = write(tmp_path, text)
    with pytest.raises(SpecError) as ei:
        load_sweep(p, **kw)
    msg = str(ei.value)
    assert msg.startswith(f"{p}:"), msg
    return msg


def _line_of(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(textwrap.dedent(text).splitlines(), 1) if needle in line)


@pytest.mark.parametrize("edit, needle, path, words", [
    (("grid:", "gird:"), "gird:", "gird", "unknown key 'gird'"),
    (("  samples: 2", "  sampels: 2"), "sampels", "base.sampels", "unknown key 'sampels'"),
    (("  samples: 2", "  samples: many"), "samples: many", "base.samples", "valid integer, got 'many'"),
    (("  scheme: [fp, w8a8, w4a8]", "  scheme: w8a8"), "scheme: w8a8", "grid.scheme", "valid list"),
    (("  method: [rtn, smoothquant]", "  method: [rtn, smoothquant, sqquant]"), "sqquant",
     "grid.method[2]", "unknown method 'sqquant'"),
    (("  model: smollm2-135m", "  model: no-such-model"), "no-such-model", "base.model", "unknown model"),
    (("  method: [rtn, smoothquant]", "  method: []"), "method: []", "grid.method", "empty axis"),
    (("  layers: 1", "  layers: 99"), "layers: 99", "base.layers", "has 30 layers"),
    (("  perplexity: {limit: 2}", "  perplexity: {limit: 0}"), "limit: 0", "eval.perplexity.limit",
     "greater than or equal to 1"),
])
def test_bad_files_name_file_line_and_key(tmp_path, edit, needle, path, words):
    text = BASE.replace(*edit)
    assert text != BASE
    msg = _error(tmp_path, text)
    assert f":{_line_of(text, needle)}: {path}:" in msg, msg
    assert words in msg, msg


def test_more_bad_files(tmp_path):
    no_grid = BASE.split("grid:")[0] + "eval:\n  perplexity: {limit: 2}\n"
    assert "the grid is empty" in _error(tmp_path, no_grid)
    text = BASE + "methods:\n  smoothquant: {alfa: 0.7}\n"
    msg = _error(tmp_path, text)
    assert f":{_line_of(text, 'alfa')}: methods.smoothquant.alfa:" in msg and "no hyper-parameter 'alfa'" in msg
    text = BASE.replace("  layers: 1\n", "  layers: 1\n  epochs: 3\n").replace(
        "method: [rtn, smoothquant]", "method: [rtn]")
    msg = _error(tmp_path, text)
    assert f":{_line_of(text, 'epochs')}: base.epochs:" in msg and "not known to any method" in msg
    text = BASE + "devices:\n  - {backend: host}\n"
    msg = _error(tmp_path, text)
    assert f":{_line_of(text, 'backend')}: devices[0].device: Field required" in msg  # the old schema's key
    text = BASE + "devices:\n  - host\n  - pixel-9\n"
    msg = _error(tmp_path, text)
    assert f":{_line_of(text, 'pixel-9')}: devices[1]: unknown device 'pixel-9'" in msg and "devices: host" in msg
    text = BASE.replace("  samples: 2\n", "  samples: 2\n  samples: 3\n")
    assert "duplicate key (first given on line" in _error(tmp_path, text)
    assert "not valid YAML" in _error(tmp_path, BASE.replace("scheme: [fp, w8a8, w4a8]", "scheme: [fp, w8a8"))


def test_lm_eval_suite_tasks_are_checked(tmp_path):
    text = BASE.replace("  perplexity: {limit: 2}", "  perplexity: {limit: 2}\n  suite: [mq_lambada, no_such_task]")
    if harness_module() is None:  # a quant core without lm-eval tasks: the suite itself is refused
        msg = _error(tmp_path, text)
        assert "eval.suite:" in msg and "quant.eval.harness is not available" in msg
        return
    msg = _error(tmp_path, text)
    assert f":{_line_of(text, 'suite:')}: eval.suite[1]:" in msg and "no_such_task" in msg
    ok = load_sweep(write(tmp_path, text.replace(", no_such_task", ""), "ok.yaml"))
    assert all(t.config["eval"]["suite"] == ["mq_lambada"] for t in ok.trials)


def test_a_grid_too_large_needs_yes(tmp_path):
    text = BASE.replace("grid:\n", "grid:\n  seed: [%s]\n" % ", ".join(str(i) for i in range(GRID_LIMIT)))
    msg = _error(tmp_path, text)
    assert f":{_line_of(text, 'grid:')}: grid:" in msg and "pass --yes" in msg
    assert len(load_sweep(write(tmp_path, text, "ok.yaml"), max_trials=None).trials) == 1 + 4 * GRID_LIMIT


def test_cli_bad_file_exits_2_with_one_line_and_starts_nothing(tmp_path, capsys):
    from farm.cli import main

    p = write(tmp_path, BASE.replace("grid:", "gird:"))
    data = tmp_path / "data"
    assert main(["sweep", str(p), "--data", str(data)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"farm sweep: error: {p}:8: gird: unknown key 'gird'"), err
    assert not data.exists()


def test_dry_run_prints_the_grid_and_what_is_done(tmp_path, capsys):
    from farm.cli import main
    from farm.orchestrate.sweep import save_result

    p = write(tmp_path, BASE)
    data = tmp_path / "data"
    sweep = load_sweep(p)
    done = sweep.trials[0]
    save_result(data, {"trial_id": done.id, "metrics": {"ppl/wiki/seq32": 12.5}, "timing": {"total_s": 3.0}})
    assert main(["sweep", str(p), "--data", str(data), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "5 trials (1 duplicate combinations merged), 1 done, 4 to run" in out
    lines = [ln for ln in out.splitlines() if ln[:8] in {t.short for t in sweep.trials}]
    assert len(lines) == 5
    assert "done" in next(ln for ln in lines if ln.startswith(done.short)) and "12.5" in out
    assert sum("pending" in ln for ln in lines) == 4
    assert "shared stages to run once per key: calib_tokens x1, activation_stats x1" in out
    assert not (data / "mlflow.db").exists()
    json.loads((data / "trials" / done.id / "result.json").read_text())


def test_trials_this_machine_cannot_run_are_refused_before_anything_starts(tmp_path, capsys):
    from farm.cli import main

    p = write(tmp_path, BASE + "resources: {cpu: 1, gpu: 1}\n")
    data = tmp_path / "data"
    assert main(["sweep", str(p), "--data", str(data)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "trials need CPU 1, GPU 1 but this machine has" in err[0], err
    assert not data.exists()


def test_bitwidth_is_an_alias_of_scheme(tmp_path):
    text = BASE.replace("  scheme: [fp, w8a8, w4a8]", "  bitwidth: [W8A8, 4, w4a8-sym]").replace(
        "method: [rtn, smoothquant]", "method: [rtn]")
    assert [t.config["scheme"] for t in load_sweep(write(tmp_path, text)).trials] == ["w8a8", "w4a8", "w4a8-sym"]


def test_trial_ids_survive_a_new_hyper_parameter_at_its_neutral_value(tmp_path):
    """Ids of the shipped scaling sweep, recorded at numerics version 2 (before versions, ids had no version and
    were d5610fd9, 3a4ded73, c47d1605, ad38b8ff; ``train_float`` did not exist either): a hyper-parameter added
    later (listed in its config's ``ID_NEUTRAL``) leaves finished trials valid at its neutral value and
    makes new trials otherwise. If this fails after adding a field, list the field in ``ID_NEUTRAL``; after
    a numerics version bump, record the new ids (tests/test_numerics.py)."""
    from pathlib import Path

    import quant

    sweep = load_sweep(Path(__file__).resolve().parent.parent / "sweeps" / "scaling-cpu.yaml")
    ids = {(t.config["method"], (t.config["calib"] or {}).get("samples"), t.config["method_config"].get("epochs")):
           t.id[:8] for t in sweep.trials}
    assert quant.NUMERICS_VERSION == 2  # version 1's ids: 6025cd5a, 1e4d6171, 7589d4b7, 0f6232bb
    assert ids[("mobilequant", 32, 4)] == "02844d61" and ids[("lrl-block", 8, 1)] == "7c265c60"
    assert ids[("smoothquant", 32, None)] == "1cd2f7ad" and ids[("none", None, None)] == "2bc7f592"
    p = write(tmp_path, BASE.replace("method: rtn\ngrid", "method: mobilequant\ngrid")
              .replace("method: [rtn, smoothquant]", "method: [mobilequant]"))
    plain = {t.config["scheme"]: t.id for t in load_sweep(p).trials}
    neutral = write(tmp_path, p.read_text() + "methods:\n  mobilequant: {train_float: ''}\n", "neutral.yaml")
    changed = write(tmp_path, p.read_text() + "methods:\n  mobilequant: {train_float: 16bit}\n", "changed.yaml")
    assert {t.config["scheme"]: t.id for t in load_sweep(neutral).trials} == plain
    other = {t.config["scheme"]: t for t in load_sweep(changed).trials}
    assert other["fp"].id == plain["fp"] and other["w8a8"].id != plain["w8a8"]
    assert other["w8a8"].config["method_config"]["train_float"] == "16bit"


ROT = BASE.replace("  scheme: [fp, w8a8, w4a8]\n  method: [rtn, smoothquant]\n",
                   "  scheme: [fp, w8a8]\n  method: [smoothquant]\n  rotate: [none, hadamard]\n"
                   "  rotate_seed: [0, 1]\n  split: [test, validation]\n")


def test_rotate_and_split_are_grid_axes_kept_out_of_old_ids(tmp_path):
    from farm.core.ids import quant_key
    from farm.work.stages import plan

    sweep = load_sweep(write(tmp_path, ROT))
    # fp ignores rotation (2 splits); rotate_seed means nothing unrotated: none x 2 splits + hadamard x 2 seeds
    # x 2 splits = 6 quantized trials; 16 combinations in all
    assert len(sweep.trials) == 8 and sweep.duplicates == 8
    by = {(t.config["scheme"], (t.config.get("rotate") or {}).get("kind"), (t.config.get("rotate") or {}).get("seed"),
           t.config["eval"]["perplexity"].get("split", "test")): t for t in sweep.trials}
    assert len(by) == 8 and ("fp", None, None, "validation") in by
    plain, rot0, rot1 = by[("w8a8", None, None, "test")], by[("w8a8", "hadamard", 0, "test")], \
        by[("w8a8", "hadamard", 1, "test")]
    assert "rotate" not in plain.config and "split" not in plain.config["eval"]["perplexity"]
    assert rot0.config["rotate"] == {"kind": "hadamard", "seed": 0}
    # the defaults hash as the same trial (and quantize stage key) as a file without these fields
    old = {t.config["scheme"]: t for t in load_sweep(write(tmp_path, BASE.replace(
        "method: [rtn, smoothquant]", "method: [smoothquant]"), "old.yaml")).trials}
    assert plain.id == old["w8a8"].id and quant_key(plain.config) == quant_key(old["w8a8"].config)
    assert by[("fp", None, None, "test")].id == old["fp"].id
    # rotation (and its seed) is a new quantized model; the split is only another evaluation of one
    assert len({quant_key(t.config) for t in (plain, rot0, rot1)}) == 3
    assert quant_key(by[("w8a8", "hadamard", 0, "validation")].config) == quant_key(rot0.config)
    assert by[("w8a8", "hadamard", 0, "validation")].id != rot0.id
    # the float statistics SmoothQuant starts from are those of the rotated model: their own stage key
    stats = {"plain": dict((n, k) for n, k, _ in plan(plain.config)),
             "rot0": dict((n, k) for n, k, _ in plan(rot0.config))}
    assert stats["plain"]["calib_tokens"] == stats["rot0"]["calib_tokens"]
    assert stats["plain"]["activation_stats"] != stats["rot0"]["activation_stats"]
    assert set(sweep.varying) >= {"scheme", "rotate.kind", "rotate.seed", "split"}


@pytest.mark.parametrize("edit, needle, path, words", [
    (("  rotate: [none, hadamard]", "  rotate: [none, hadamrd]"), "hadamrd", "grid.rotate[1]",
     "'none', 'random' or 'hadamard', got 'hadamrd'"),
    (("  split: [test, validation]", "  split: [test, train]"), "train", "grid.split[1]",
     "'test', 'validation' or 'all', got 'train'"),
    (("  layers: 1", "  layers: 1\n  rotate_seed: one"), "rotate_seed: one", "base.rotate_seed",
     "valid integer, got 'one'"),
])
def test_bad_rotate_or_split_names_the_field(tmp_path, edit, needle, path, words):
    text = ROT.replace(*edit)
    assert text != ROT
    msg = _error(tmp_path, text)
    assert f":{_line_of(text, needle)}: {path}:" in msg, msg
    assert words in msg, msg


def test_a_rotated_sweep_trial_is_what_quant_gives(tmp_path):
    """One real trial (1 layer, 2 windows of 32): the worker rotates, records it, and its perplexity is
    quant's for the same settings, and not that of the same trial unrotated."""
    import copy

    from quant import CalibConfig, evaluate_perplexity, load_model, quantize

    from farm.work.trial import execute_trial

    text = BASE.replace("  scheme: [fp, w8a8, w4a8]\n  method: [rtn, smoothquant]\n",
                        "  scheme: [w8a8]\n  rotate: [hadamard]\n  split: [validation]\n")
    (t,) = load_sweep(write(tmp_path, text)).trials
    out = execute_trial(t.id, t.config, tmp_path / "data", save_artifact=False)
    assert out["recipe"]["rotation"]["kind"] == "hadamard" and out["recipe"]["rotation"]["seed"] == 0
    got = out["eval"]["perplexity"]
    assert got["windows"] == 2

    plain = load_model("smollm2-135m", num_layers=1)
    rotated = copy.deepcopy(plain)
    ppl = {}
    for name, lm, rot in (("hadamard", rotated, {"kind": "hadamard", "seed": 0}), ("none", plain, None)):
        quantize(lm, "w8a8", "rtn", CalibConfig(2, 32, 0, "news"), progress=False, rotate=rot)
        ppl[name] = evaluate_perplexity(lm, 32, limit=2, progress=False, split="validation").ppl
    assert got["ppl"] == ppl["hadamard"]
    assert abs(got["ppl"] / ppl["none"] - 1) > 1e-4  # rotation changes what 8 bits round
