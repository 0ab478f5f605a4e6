"""Zero-shot tasks through the real lm-eval harness: deterministic task data, lm-eval's rolling
log-likelihood equal to our perplexity on the same windows, clear errors, and `farm eval --suite`."""

import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from farm.cli import main
from quant import CalibConfig, data, load_model, quantize
from quant.eval import harness, tasks
from quant.eval.perplexity import perplexity

@pytest.fixture(autouse=True)
def one_thread():
    """Tiny truncated models: a second intra-op thread only adds synchronisation (and on a loaded
    shared machine it makes these tests several times slower)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


SIZES = {"mq_wiki_rolling": 6, "mq_lambada": 200, "mq_hellaswag": 100, "mq_knowledge": 100}


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Every local task written once in this process: {name: (folder, docs)}."""
    root = tmp_path_factory.mktemp("tasks_a")
    out = {}
    for name in tasks.TASKS:
        folder = tasks.write_task(name, root)
        lines = (folder / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()
        out[name] = (folder, [json.loads(line) for line in lines])
    return out


def test_task_data_is_deterministic(built, tmp_path):
    assert {n: s.size for n, s in tasks.TASKS.items()} == SIZES
    # build again in a fresh interpreter with another hash seed (no dict/set-order dependence)
    code = f"from quant.eval import tasks; [tasks.write_task(n, {str(tmp_path)!r}) for n in tasks.TASKS]"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    for name, spec in tasks.TASKS.items():
        a = built[name][0]
        b = tmp_path / a.name
        assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir()) == \
            [f"{name}.jsonl", f"{name}.yaml"]
        assert _sha(a / f"{name}.jsonl") == _sha(b / f"{name}.jsonl") == spec.sha256  # pinned: any machine
        ya = (a / f"{name}.yaml").read_text().replace(str(a.resolve()), "DIR")
        yb = (b / f"{name}.yaml").read_text().replace(str(b.resolve()), "DIR")
        assert ya == yb and json.loads(ya)["metadata"]["sha256"] == spec.sha256  # same but for the folder
        assert len(built[name][1]) == SIZES[name]


def test_task_construction_rules(built):
    wiki = data.corpus_text("wiki")
    rolling = built["mq_wiki_rolling"][1]
    assert all(d["text"] in wiki and 500 <= len(d["text"].split()) <= 2500 for d in rolling)
    for d in built["mq_lambada"][1]:
        *ctx, target = d["text"].split(" ")
        assert target == d["target"] and target.isalpha() and len(target) >= 4
        assert target.lower() in d["text"][: -len(target)].lower()
    for d in built["mq_hellaswag"][1]:
        lens = [len(c.split(" ")) for c in d["choices"]]
        true = lens[d["label"]]
        assert len(set(d["choices"])) == 4 and max(abs(n - true) for n in lens) == 0  # same word count
    for d in built["mq_knowledge"][1]:
        assert len(set(d["choices"])) == 4 and d["sentence"] in wiki
        words = [w.lower() for w in tasks._WORD.findall(d["sentence"])]
        for title in d["choices"]:
            assert not any(w.startswith(k) for k in tasks._title_keys(title) for w in words)
    assert data.corpus_text("news")[:2000] not in wiki  # built from the evaluation corpus only


@pytest.fixture(scope="module")
def w8a8_lm():
    lm = load_model("smollm2-135m", num_layers=2)
    quantize(lm, "w8a8", "rtn", CalibConfig(samples=4, seqlen=64), progress=False)
    return lm


def test_lmeval_rolling_equals_our_perplexity(w8a8_lm, tmp_path):
    """Same windows, same numbers. lm-eval conditions a document's first token on its prefix token
    (the BOS), so we compare with our BOS-prefixed windows: lm-eval's rolling window for a document of
    63 tokens at max_length 64 is exactly ``[BOS] + tokens[:-1]`` predicting ``tokens``, as ours. Only
    windows whose text re-tokenizes to the same ids are used (lm-eval tokenizes text)."""
    lm, tok = w8a8_lm, w8a8_lm.tokenizer
    all_windows = data.eval_windows(tok, 64, limit=30, add_bos=True)
    keep, docs = [], []
    for i, row in enumerate(all_windows):
        ids = row[1:].tolist()
        text = tok.decode(ids)
        if text == text.strip() and tok(text, add_special_tokens=False)["input_ids"] == ids:
            keep.append(i)
            docs.append({"text": text})
    keep, docs = keep[:5], docs[:5]
    assert len(keep) == 5 and all(all_windows[keep, 0] == tok.bos_token_id)
    ours = perplexity(lm.model, all_windows[keep], progress=False)
    folder = tasks.write_custom_task(tmp_path / "equiv", "mq_test_equiv", docs, **tasks.ROLLING_CONFIG)
    res = harness.run_suite(lm, "mq_test_equiv", include_path=folder, max_length=64, progress=False)
    n_bytes = sum(len(d["text"].encode("utf-8")) for d in docs)
    n_words = sum(len(d["text"].split()) for d in docs)
    ours_total = ours.nll * ours.tokens
    assert res["lmeval/mq_test_equiv/n"] == 5 and ours.tokens == 5 * 63
    assert math.log(res["lmeval/mq_test_equiv/byte_perplexity"]) * n_bytes == pytest.approx(ours_total, rel=1e-5)
    assert math.log(res["lmeval/mq_test_equiv/word_perplexity"]) * n_words == pytest.approx(ours_total, rel=1e-5)

    # Without BOS (SmolLM2's protocol), lm-eval's token-level scorer on [w0] -> w1..w63 is our window_nll.
    plain = data.eval_windows(tok, 64, limit=3, add_bos=False)
    ours_plain = perplexity(lm.model, plain, progress=False)
    hflm = harness.make_lm(lm, batch_size=3, max_length=64)
    scored = hflm._loglikelihood_tokens([(None, row[:1].tolist(), row[1:].tolist()) for row in plain],
                                        disable_tqdm=True)
    assert -sum(ll for ll, _ in scored) == pytest.approx(ours_plain.nll * ours_plain.tokens, rel=1e-5)


def test_unknown_task_is_a_clear_error():
    with pytest.raises(ValueError) as e:
        harness.resolve_suite("mq_lambada,no_such_task_xyz")
    msg = str(e.value)
    assert "no_such_task_xyz" in msg and all(n in msg for n in tasks.TASKS) and "local" in msg
    specs, tm = harness.resolve_suite("local,hellaswag")  # standard names pass through unchanged
    assert [Path(p).stem for p in specs[:-1]] == list(tasks.TASKS) and specs[-1] == "hellaswag"
    assert "arc_challenge" in tm.all_tasks and "mmlu" in tm.all_tasks
    with pytest.raises(ValueError, match="empty task suite"):
        harness.parse_suite(" , ")
    assert set(harness.available_tasks()) == {*tasks.TASKS, "local"}


def _run(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_farm_eval_suite_cli(tmp_path, capsys):
    out = tmp_path / "w8a8"
    common = ["--suite", "mq_lambada,mq_knowledge", "--limit", "2"]
    rc, stdout, _ = _run(capsys, "quantize", "--model", "smollm2-135m", "--layers", "2", "--scheme", "w8a8",
                         "--calib-samples", "4", "--seqlen", "64", "--out", str(out), *common, "--json")
    assert rc == 0
    first = json.loads(stdout)
    assert first["scheme"] == "w8a8" and first["artifact"] == str(out)
    m = first["lmeval"]
    assert m["lmeval/mq_lambada/n"] == 2 and m["lmeval/mq_knowledge/n"] == 2
    assert m["lmeval/mq_knowledge/acc"] in (0.0, 0.5, 1.0) and m["lmeval/mq_lambada/perplexity"] > 1
    rc, stdout, _ = _run(capsys, "eval", str(out), *common)  # the saved artifact, as a table
    lines = stdout.splitlines()
    assert rc == 0 and lines[0].split() == ["task", "metric", "value", "n"]
    table = {(r.split()[0], r.split()[1]): float(r.split()[2]) for r in lines[2:] if r.strip() and "=" not in r}
    assert set(table) == {("mq_lambada", "acc"), ("mq_lambada", "perplexity"), ("mq_knowledge", "acc"),
                          ("mq_knowledge", "acc_norm")}
    for (task, metric), value in table.items():  # the artifact reproduces the in-memory model
        assert value == pytest.approx(m[f"lmeval/{task}/{metric}"], rel=1e-6, abs=1e-4)
    rc, _, err = _run(capsys, "eval", str(out), "--suite", "mq_nope")
    assert rc == 2 and "unknown lm-eval task(s): mq_nope" in err and "mq_lambada" in err


def test_the_bootstrap_runs_in_process(w8a8_lm, monkeypatch):
    """lm-eval bootstraps a perplexity's stderr in a pool of forked processes by default; forked from a
    process that runs threads (a Ray trial worker) the pool hung a sweep for good. run_suite keeps the
    bootstrap in-process (same estimator, same seeds) and leaves DISABLE_MULTIPROC as it found it."""
    import multiprocessing

    def refuse(*a, **k):
        raise AssertionError("lm-eval forked a multiprocessing.Pool")

    monkeypatch.setattr(multiprocessing, "Pool", refuse)
    monkeypatch.delenv("DISABLE_MULTIPROC", raising=False)
    res = harness.run_suite(w8a8_lm, "mq_lambada", limit=3, max_length=64, progress=False, bootstrap_iters=100)
    assert res["lmeval/mq_lambada/n"] == 3
    assert math.isfinite(res["lmeval/mq_lambada/perplexity_stderr"]) and res["lmeval/mq_lambada/perplexity_stderr"] > 0
    assert "DISABLE_MULTIPROC" not in os.environ
