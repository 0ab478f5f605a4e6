"""`farm quantize` / `farm eval` end to end, in-process, on a truncated model; bad input exits 2."""

import json

import pytest

from farm.cli import main


def _run(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_quantize_then_eval(tmp_path, capsys):
    out = tmp_path / "w8a8"
    rc, stdout, _ = _run(capsys, "quantize", "--model", "smollm2-135m", "--layers", "2", "--scheme", "w8a8",
                         "--method", "rtn", "--calib-samples", "4", "--seqlen", "64", "--out", str(out),
                         "--eval", "--limit", "3", "--json")
    assert rc == 0
    first = json.loads(stdout)
    assert first["perplexity"]["windows"] == 3 and first["perplexity"]["metric"] == "ppl/wiki/seq64"
    assert (out / "model.safetensors").exists() and (out / "encodings.json").exists()
    rc, stdout, _ = _run(capsys, "eval", str(out), "--limit", "3", "--json")
    again = json.loads(stdout)
    assert rc == 0 and again["scheme"] == "w8a8" and again["method"] == "rtn"
    assert again["perplexity"]["ppl"] == first["perplexity"]["ppl"]  # the artifact reproduces the run
    rc, stdout, _ = _run(capsys, "eval", str(out), "--limit", "2")
    assert rc == 0 and "ppl" in stdout.splitlines()[0] and "w8a8" in stdout.splitlines()[2]


def test_eval_float_model_in_memory(capsys):
    rc, stdout, _ = _run(capsys, "eval", "--model", "smollm2-135m", "--layers", "1", "--scheme", "fp",
                         "--seqlen", "64", "--limit", "2", "--json")
    res = json.loads(stdout)
    assert rc == 0 and res["method"] == "none" and res["perplexity"]["tokens"] == 2 * 63


@pytest.mark.parametrize("argv, message", [
    (["eval", "--model", "no-such-model", "--scheme", "fp"], "unknown model 'no-such-model'"),
    (["eval", "--model", "smollm2-135m", "--layers", "1", "--scheme", "w6a8"], "weight bits must be one of (4, 8, 16)"),
    (["eval", "--model", "smollm2-135m", "--layers", "1", "--scheme", "fp", "--seqlen", "9000"],
     "seqlen 9000 is above the context of smollm2-135m (8192 tokens)"),
    (["eval", "--model", "smollm2-135m", "--layers", "1", "--scheme", "w8a8", "--calib-corpus", "/nonexistent.txt"],
     "'/nonexistent.txt' is neither a known corpus"),
    (["eval", "--model", "smollm2-135m", "--layers", "1", "--scheme", "w8a8", "--method", "gptq"],
     "unknown method 'gptq'"),
    (["eval"], "needs an artifact folder or --model"),
    (["eval", "/nonexistent-artifact"], "artifact folder /nonexistent-artifact does not exist"),
])
def test_bad_input_is_one_clear_line(capsys, argv, message):
    rc, stdout, err = _run(capsys, *argv)
    assert rc == 2 and message in err and stdout == ""


def test_existing_output_is_refused_before_any_work(tmp_path, capsys):
    out = tmp_path / "exists"
    out.mkdir()
    rc, _, err = _run(capsys, "quantize", "--model", "no-such-model", "--scheme", "w8a8", "--out", str(out))
    assert rc == 2 and "already exists; pass --overwrite" in err  # refused before the model is even looked up
    assert list(out.iterdir()) == []


def test_empty_corpus_file_names_the_file(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    rc, _, err = _run(capsys, "quantize", "--model", "smollm2-135m", "--layers", "1", "--scheme", "w8a8",
                      "--calib-corpus", str(empty), "--out", str(tmp_path / "o"))
    assert rc == 2 and f"corpus file {empty} is empty" in err
    assert not (tmp_path / "o").exists() and [p.name for p in tmp_path.iterdir()] == ["empty.txt"]


def test_method_hyperparameters_as_flags(tmp_path, capsys):
    out = tmp_path / "sq"
    rc, stdout, _ = _run(capsys, "quantize", "--model", "smollm2-135m", "--layers", "1", "--method", "smoothquant",
                         "--alpha", "0.7", "--pairs", "original", "--calib-samples", "2", "--seqlen", "32",
                         "--out", str(out), "--json")
    assert rc == 0
    recipe = json.loads(stdout)["recipe"]
    assert recipe["method_config"] == {"alpha": 0.7, "pairs": "original", "batch_size": 4}
    assert recipe["method_info"]["pairs"] == ["qkv", "fc1"]
    rc, _, err = _run(capsys, "quantize", "--model", "smollm2-135m", "--method", "rtn", "--epochs", "3",
                      "--out", str(tmp_path / "x"))
    assert rc == 2 and "method 'rtn': unknown hyper-parameter(s) ['epochs']" in err
    assert not (tmp_path / "x").exists()


def test_mobilequant_cli_checkpoints_and_resumes(tmp_path, capsys):
    out = tmp_path / "mq"
    args = ["quantize", "--model", "smollm2-135m", "--layers", "1", "--method", "mobilequant", "--epochs", "1",
            "--calib-samples", "2", "--seqlen", "32", "--out", str(out), "--json"]
    rc, stdout, _ = _run(capsys, *args)
    info = json.loads(stdout)["recipe"]["method_info"]
    assert rc == 0 and info["steps"] == 2 and info["resumed_from_epoch"] == 0
    assert json.loads((tmp_path / "mq.checkpoint" / "meta.json").read_text())["epoch"] == 1
    rc, stdout, _ = _run(capsys, *args, "--overwrite")  # the finished checkpoint is reused, not retrained
    assert rc == 0 and json.loads(stdout)["recipe"]["method_info"]["resumed_from_epoch"] == 1
    rc, _, err = _run(capsys, *args[:-1], "--lwc-lr", "0.5", "--overwrite", "--json")
    assert rc == 2 and "config.lwc_lr: 0.01 in the checkpoint, 0.5 now" in err
