"""Calibration and evaluation text: real, deterministic, disjoint."""

import hashlib
import re

import numpy as np
import pytest

from quant import data, load_model


@pytest.fixture(scope="module")
def tok():
    return load_model("smollm2-135m", num_layers=1).tokenizer


def test_corpora_are_real_and_sized():
    wiki, news = data.corpus_text("wiki"), data.corpus_text("news")
    assert wiki.count("\n\n") + 1 == 104  # articles of 100+ words in the shipped dump
    assert news.count("\n\n") + 1 == 300
    assert 450_000 < len(wiki.split()) < 500_000 and 55_000 < len(news.split()) < 65_000
    assert wiki.startswith("= Anarchism =\nAnarchism is a political philosophy")
    assert "[[" not in wiki and "{{" not in wiki and "'''" not in wiki  # markup is gone


def test_cleaning_is_deterministic_without_cache():
    a = data._build_wiki()
    assert a == data._build_wiki() == data.corpus_text("wiki")
    assert data.corpus_id("wiki") == "wiki:" + hashlib.sha256(a.encode()).hexdigest()[:16]


def _shingles(text, n=13):
    words = re.findall(r"\w+", text.lower())
    return {" ".join(words[i:i + n]) for i in range(len(words) - n + 1)}


def test_calibration_and_evaluation_text_never_overlap():
    shared = _shingles(data.corpus_text("wiki")) & _shingles(data.corpus_text("news"))
    assert shared == set()  # no 13-word span in common (the usual decontamination test)


def test_calibration_windows_are_seeded_and_from_the_news_stream(tok):
    a = data.calibration_windows(tok, 8, 128, seed=1)
    assert a.shape == (8, 128)
    assert data.calibration_windows(tok, 8, 128, seed=1).equal(a)
    assert not data.calibration_windows(tok, 8, 128, seed=2).equal(a)
    stream = data.token_stream(tok, "news")
    joined = stream.tobytes()
    assert all(row.numpy().tobytes() in joined for row in a)  # every window is a slice of the news stream


def test_evaluation_windows_tile_the_stream(tok):
    stream = data.token_stream(tok, "wiki")
    w = data.eval_windows(tok, 512)
    assert w.shape == (stream.size // 512, 512)
    assert np.array_equal(w.numpy().reshape(-1), stream[: w.numel()])  # consecutive, non-overlapping
    assert data.eval_windows(tok, 512, limit=3).equal(w[:3])


def test_bos_windows(tok):
    g = load_model("gemma3-270m", num_layers=1)
    w = data.eval_windows(g.tokenizer, 64, limit=2, add_bos=True)
    assert w.shape == (2, 64) and (w[:, 0] == g.tokenizer.bos_token_id).all()


def test_custom_corpus_file(tok, tmp_path):
    f = tmp_path / "mine.txt"
    f.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    w = data.eval_windows(tok, 32, corpus=str(f))
    assert w.shape[1] == 32 and w.shape[0] > 10


def test_bad_corpora(tok, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(data.CorpusError, match="empty.txt is empty"):
        data.eval_windows(tok, 64, corpus=str(empty))
    with pytest.raises(data.CorpusError, match="neither a known corpus"):
        data.calibration_windows(tok, 4, 64, corpus=str(tmp_path / "missing.txt"))
    short = tmp_path / "short.txt"
    short.write_text("only a few words here")
    with pytest.raises(data.CorpusError, match="fewer than seqlen 64"):
        data.calibration_windows(tok, 4, 64, corpus=str(short))
    with pytest.raises(ValueError, match="at least 1"):
        data.calibration_windows(tok, 0, 64)
