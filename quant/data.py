"""Real text for calibration and evaluation, from the files shipped in the ``gensim`` wheel.

* ``wiki`` (evaluation, our WikiText stand-in): the English Wikipedia dump in gensim's test data,
  cleaned with gensim's own ``extract_pages`` + ``filter_wiki`` and a fixed post-processing; 104
  articles of 100+ words.
* ``news`` (calibration): ``lee_background.cor``, 300 news articles, one per line.

* ``pydoc`` (calibration): the Python language reference's help topics that ship with CPython itself
  (``pydoc_data.topics``), 79 topics, about 65k words (111k SmolLM2 tokens) of technical English.
* ``gen:<model>[:<samples>x<tokens>][:seed<N>]`` (calibration): text written by the float model itself,
  seeded, decontaminated against the evaluation stream (``quant.calibgen``); 256 x 512 by default.
* ``a+b``: the concatenation of corpora, e.g. ``news+pydoc``.

Evaluation and calibration sources are disjoint (different documents, different genre; ``tests/test_data.py``
checks that they share no 13-word span, and no 13-token span on the token windows). Cleaned text and token streams are cached under
``$MQFARM_CACHE/corpora`` and ``$MQFARM_CACHE/tokens``; cleaning is deterministic, so the cache is only
a speed-up. Any UTF-8 text file can stand in for either corpus by passing its path.
"""

from __future__ import annotations

import bz2
import hashlib
import importlib.util
import os
import random
import re
from pathlib import Path

import numpy as np
import torch

from .zoo import cache_root

CLEANING_VERSION = 1
WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
NEWS_FILE = "lee_background.cor"
CORPORA = {"wiki": "evaluation: 104 Wikipedia articles (gensim test data)",
           "news": "calibration: 300 news articles, Lee background corpus (gensim test data)",
           "pydoc": "calibration: the Python reference's 79 help topics (CPython's pydoc_data)"}
DEFAULT_EVAL = "wiki"
DEFAULT_CALIB = "news"


class CorpusError(ValueError):
    """A corpus is missing, empty or too short for what was asked."""


def _gensim_data_dir() -> Path:
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise CorpusError("the text corpora come from the gensim wheel: run `pip install gensim==4.4.0`")
    return Path(spec.submodule_search_locations[0]) / "test" / "test_data"


_HEADING = re.compile(r"^(=+)\s*(.*?)\s*=+\s*$")
_SPACES = re.compile(r"[ \t\u00a0]+")


def _clean_article(title: str, text: str) -> str:
    lines = [f"= {title} ="]
    for raw in text.replace("'''", "").replace("''", "").splitlines():
        line = _SPACES.sub(" ", raw).strip()
        if not line or not any(c.isalpha() for c in line):
            continue
        m = _HEADING.match(line)
        if m:
            line = f"{m.group(1)} {m.group(2)} {m.group(1)}"
        lines.append(line)
    return "\n".join(lines)


def _build_wiki() -> str:
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    path = _gensim_data_dir() / WIKI_FILE
    if not path.exists():
        raise CorpusError(f"{path} is missing from the gensim wheel: reinstall gensim==4.4.0")
    articles = []
    with bz2.BZ2File(path) as f:
        for title, text, _pageid in extract_pages(f, filter_namespaces=("0",)):
            if not text or text.lstrip().lower().startswith("#redirect"):
                continue
            body = filter_wiki(text)
            if len(body.split()) >= 100:
                articles.append(_clean_article(title, body))
    return "\n\n".join(articles)


def _build_news() -> str:
    path = _gensim_data_dir() / NEWS_FILE
    if not path.exists():
        raise CorpusError(f"{path} is missing from the gensim wheel: reinstall gensim==4.4.0")
    docs = [_SPACES.sub(" ", line).strip() for line in path.read_text(encoding="utf-8").splitlines()]
    return "\n\n".join(d for d in docs if d)


def _build_pydoc() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(_SPACES.sub(" ", topics[k]).strip() for k in sorted(topics))


_BUILDERS = {"wiki": _build_wiki, "news": _build_news, "pydoc": _build_pydoc}


def _cached(name: str, build) -> str:
    cache = cache_root() / "corpora" / f"{name}.txt"
    if cache.exists():
        return cache.read_text(encoding="utf-8")
    text = build()
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(cache)
    return text


def _build_generated(corpus: str) -> str:
    from . import calibgen

    spec = calibgen.parse(corpus)
    res = calibgen.build(spec, lambda tok: token_stream(tok, DEFAULT_EVAL), lambda tok: token_stream(tok, DEFAULT_CALIB))
    if not res.text:
        raise CorpusError(f"corpus {corpus!r}: every generated sample overlapped the evaluation text")
    return res.text


def is_known(corpus: str) -> bool:
    return all(p in _BUILDERS or p.startswith("gen:") for p in corpus.split("+"))


def corpus_text(corpus: str) -> str:
    """The cleaned text of a named corpus (``wiki``, ``news``, ``pydoc``, ``gen:...``, ``a+b``) or of a
    UTF-8 text file."""
    if "+" in corpus and is_known(corpus):
        return "\n\n".join(corpus_text(p) for p in corpus.split("+"))
    if corpus in _BUILDERS:
        return _cached(f"{corpus}-v{CLEANING_VERSION}", _BUILDERS[corpus])
    if corpus.startswith("gen:"):
        from . import calibgen

        spec = calibgen.parse(corpus)
        key = f"gen-{spec.model}-{spec.samples}x{spec.tokens}-seed{spec.seed}-t{spec.temperature}-p{spec.top_p}"
        return _cached(f"{key}-v{calibgen.GEN_VERSION}", lambda: _build_generated(corpus))
    path = Path(corpus).expanduser()
    if not path.is_file():
        raise CorpusError(f"corpus {corpus!r} is neither a known corpus ({', '.join(CORPORA)}) nor an existing file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CorpusError(f"corpus file {path} is not UTF-8 text (byte {e.start}: {e.reason})") from None
    if not text.strip():
        raise CorpusError(f"corpus file {path} is empty")
    return text


def corpus_id(corpus: str) -> str:
    """A stable identity for a corpus: its name and the sha256 of its cleaned text (first 16 hex)."""
    digest = hashlib.sha256(corpus_text(corpus).encode("utf-8")).hexdigest()[:16]
    name = corpus if is_known(corpus) else Path(corpus).name
    return f"{name}:{digest}"


def _tokenizer_id(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    payload = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


def token_stream(tokenizer, corpus: str) -> np.ndarray:
    """All tokens of a corpus, without special tokens (cached per corpus text and tokenizer)."""
    key = f"{corpus_id(corpus).replace(':', '-')}-{_tokenizer_id(tokenizer)}"
    cache = cache_root() / "tokens" / f"{key}.npy"
    if cache.exists():
        return np.load(cache)
    ids = tokenizer(corpus_text(corpus), add_special_tokens=False)["input_ids"]
    arr = np.asarray(ids, dtype=np.int64)
    if arr.size == 0:
        raise CorpusError(f"corpus {corpus!r} tokenizes to nothing")
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(cache.stem + ".tmp.npy")
    np.save(tmp, arr)
    tmp.replace(cache)
    return arr


def _window_len(seqlen: int, add_bos: bool) -> int:
    if seqlen < 2:
        raise ValueError(f"seqlen must be at least 2, got {seqlen}")
    return seqlen - 1 if add_bos else seqlen


def _with_bos(windows: np.ndarray, tokenizer, add_bos: bool) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(windows))
    if add_bos:
        bos = tokenizer.bos_token_id
        if bos is None:
            raise ValueError("add_bos is set but the tokenizer has no BOS token")
        t = torch.cat([torch.full((t.shape[0], 1), bos, dtype=t.dtype), t], dim=1)
    return t


def calibration_windows(tokenizer, n: int, seqlen: int, seed: int = 0, corpus: str = DEFAULT_CALIB,
                        add_bos: bool = False) -> torch.Tensor:
    """``n`` windows of ``seqlen`` tokens at seeded random offsets of the calibration stream: (n, seqlen)."""
    if n < 1:
        raise ValueError(f"the number of calibration samples must be at least 1, got {n}")
    stream = token_stream(tokenizer, corpus)
    length = _window_len(seqlen, add_bos)
    if stream.size <= length:
        raise CorpusError(f"calibration corpus {corpus!r} has {stream.size} tokens, fewer than seqlen {seqlen}")
    if n > stream.size - length:  # more windows than distinct start positions: refused, not drawn for hours
        raise CorpusError(f"{n} calibration samples asked, but calibration corpus {corpus!r} holds only "
                          f"{stream.size - length} distinct windows of seqlen {seqlen} ({stream.size} tokens)")
    rng = random.Random(seed)
    starts = [rng.randrange(0, stream.size - length) for _ in range(n)]
    return _with_bos(np.stack([stream[s:s + length] for s in starts]), tokenizer, add_bos)


SPLITS = ("test", "validation", "all")
VALIDATION_FRACTION = 0.25


def split_bounds(n_tokens: int, split: str) -> tuple[int, int]:
    """The token range ``[lo, hi)`` of the evaluation stream that ``split`` reads.

    The split is fixed on the token stream, not on window indices, so it holds for every ``seqlen``: the
    first 75% of the tokens are the test split (the windows reported in ``docs/results.md``), the last 25%
    the validation split (where hyper-parameters are chosen). The test split's windows are the first
    windows of the whole stream, so ``limit=N`` on the test split reads the same windows as before the
    split existed (as long as N fits in it).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    cut = int(n_tokens * (1 - VALIDATION_FRACTION))
    return {"test": (0, cut), "validation": (cut, n_tokens), "all": (0, n_tokens)}[split]


def eval_windows(tokenizer, seqlen: int, corpus: str = DEFAULT_EVAL, limit: int | None = None,
                 add_bos: bool = False, split: str = "all") -> torch.Tensor:
    """Non-overlapping consecutive windows over the evaluation stream's ``split`` (remainder dropped):
    (N, seqlen). ``split``: ``test``, ``validation`` or ``all`` (see :func:`split_bounds`).

    ``limit`` keeps the first N windows, for quick looks.
    """
    full = token_stream(tokenizer, corpus)
    lo, hi = split_bounds(full.size, split)
    stream = full[lo:hi]
    length = _window_len(seqlen, add_bos)
    count = stream.size // length
    if count == 0:
        raise CorpusError(f"evaluation corpus {corpus!r} has {stream.size} tokens in its {split} split, "
                          f"fewer than seqlen {seqlen}")
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        count = min(count, limit)
    return _with_bos(stream[: count * length].reshape(count, length), tokenizer, add_bos)
