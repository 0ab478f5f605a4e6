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


@pytest.mark.parametrize("seqlen,add_bos", [(512, False), (64, True), (2048, False)])
def test_validation_and_test_windows_are_disjoint(tok, seqlen, add_bos):
    stream = data.token_stream(tok, "wiki")
    test = data.eval_windows(tok, seqlen, split="test", add_bos=add_bos)
    val = data.eval_windows(tok, seqlen, split="validation", add_bos=add_bos)
    body = slice(1, None) if add_bos else slice(None)
    cut = data.split_bounds(stream.size, "test")[1]
    assert cut == int(stream.size * 0.75)
    # every test window lies in the first 75% of the tokens, every validation window after it
    assert np.array_equal(test[:, body].numpy().reshape(-1), stream[: test[:, body].numel()])
    assert test[:, body].numel() <= cut
    assert np.array_equal(val[:, body].numpy().reshape(-1), stream[cut: cut + val[:, body].numel()])
    # and no window of one split equals a window of the other (at this seqlen, none even shares a 64-gram)
    grams = lambda w, n=64: {w[i, j:j + n].numpy().tobytes() for i in range(w.shape[0])  # noqa: E731
                             for j in range(0, w.shape[1] - n + 1, n)}
    assert grams(test[:, body]).isdisjoint(grams(val[:, body]))
    n = stream.size
    assert test.shape[0] == int(n * 0.75) // test[:, body].shape[1]
    assert val.shape[0] == (n - int(n * 0.75)) // val[:, body].shape[1]


def test_test_split_keeps_the_first_windows_and_bad_split_is_refused(tok):
    assert data.eval_windows(tok, 512, limit=40, split="test").equal(data.eval_windows(tok, 512, limit=40))
    with pytest.raises(ValueError, match="split must be one of test, validation, all"):
        data.eval_windows(tok, 512, split="valid")


def _hits(calib_stream, eval_hashes, n):
    from quant import calibgen

    return calibgen.shared_ngrams(calib_stream, eval_hashes, n)


@pytest.mark.parametrize("corpus", ["news", "pydoc"])
def test_calibration_token_windows_share_no_13_token_span_with_the_evaluation_stream(tok, corpus):
    from quant import calibgen

    ev = np.unique(calibgen.ngram_hashes(data.token_stream(tok, "wiki")))
    windows = data.calibration_windows(tok, 64, 512, seed=0, corpus=corpus)
    assert windows.shape == (64, 512)
    assert sum(_hits(w.numpy(), ev, 13) for w in windows) == 0
    # the check would see an overlap: a window with an evaluation span pasted in is caught
    planted = windows[0].numpy().copy()
    planted[100:120] = data.token_stream(tok, "wiki")[5000:5020]
    assert _hits(planted, ev, 13) == 20 - 13 + 1


def test_pydoc_corpus_is_real_english_and_recorded_by_content(tok):
    text = data.corpus_text("pydoc")
    assert len(text.split()) > 50_000 and 'The "assert" statement' in text and text.count("\n\n") >= 78
    assert data.corpus_id("pydoc").startswith("pydoc:") and len(data.corpus_id("pydoc")) == len("pydoc:") + 16
    assert data.corpus_text("news+pydoc") == data.corpus_text("news") + "\n\n" + text
    assert data.token_stream(tok, "news+pydoc").size > 180_000  # 364 windows of 512 tokens


def test_generated_calibration_text_is_seeded_and_decontaminated():
    from quant import calibgen

    lm = load_model("smollm2-135m", num_layers=2)
    spec = calibgen.GenSpec("smollm2-135m", samples=2, tokens=16, seed=5)
    assert calibgen.parse("gen:smollm2-135m:2x16:seed5") == spec
    news = lambda t: data.token_stream(t, "news")  # noqa: E731
    wiki = lambda t: data.token_stream(t, "wiki")  # noqa: E731
    starts = calibgen.start_tokens(lm.tokenizer, news(lm.tokenizer))
    a = calibgen.generate_ids(lm, spec, starts, batch=2, progress=False)
    b = calibgen.generate_ids(lm, spec, starts, batch=2, progress=False)
    assert len(a) == 2 and all(x.shape == (16,) for x in a)
    assert not np.isin(np.concatenate(a), lm.tokenizer.all_special_ids).any()
    assert all(np.array_equal(x, y) for x, y in zip(a, b))  # same seed, same text
    assert np.isin([x[0] for x in a], starts).all()  # first tokens from the calibration vocabulary
    clean = calibgen.build(spec, wiki, news, progress=False, lm=lm)
    assert clean.kept + clean.dropped == 2
    ev = np.unique(calibgen.ngram_hashes(wiki(lm.tokenizer)))
    ids = np.asarray(lm.tokenizer(clean.text, add_special_tokens=False)["input_ids"])
    assert calibgen.shared_ngrams(ids, ev) == 0
    # an evaluation stream that contains a generated span: that sample is dropped
    leaky = lambda t: np.concatenate([wiki(t), a[1][:14]])  # noqa: E731
    dirty = calibgen.build(spec, leaky, news, progress=False, lm=lm)
    assert dirty.dropped == clean.dropped + 1
    with pytest.raises(ValueError, match="neither <samples>x<tokens> nor seed"):
        calibgen.parse("gen:smollm2-135m:many")
