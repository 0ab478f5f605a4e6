"""Zero-shot tasks for lm-evaluation-harness, built deterministically from the evaluation corpus.

The paper's zero-shot data (WikiText, LAMBADA, HellaSwag, ARC, MMLU) cannot be downloaded here, so we
build tasks of the same *shape* from the real Wikipedia text of the evaluation corpus
(``quant.data.corpus_text("wiki")``: 104 articles, never the calibration corpus). Every builder uses only
that text, list order and a seeded :class:`random.Random`; nothing depends on dict/set iteration order,
hash randomisation, the tokenizer or the machine, so the JSONL files are byte-identical everywhere
(``TaskSpec.sha256`` pins them; ``tests/test_lmeval.py`` checks it).

Tasks (see each builder's docstring for the exact construction):

* ``mq_wiki_rolling``: WikiText-style rolling log-likelihood over whole articles (word/byte perplexity);
* ``mq_lambada``: LAMBADA-style last-word prediction where the word occurs in the preceding sentences
  but not earlier in its own sentence;
* ``mq_hellaswag``: HellaSwag-style choice of the true next sentence against three length-matched
  sentences from unrelated articles;
* ``mq_knowledge``: ARC/MMLU-style knowledge question: which article does a sentence come from, when
  the sentence names none of the four candidate subjects.

:func:`write_task` renders one task as an lm-eval YAML plus its JSONL under a folder keyed by task
version and data hash; :mod:`quant.eval.harness` runs them.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .. import data

CORPUS = "wiki"  # the evaluation corpus; the calibration corpus ("news") is never used here

# ----------------------------------------------------------------------------------------- text units

_STOPWORDS = frozenset("""
a an the of in on at to for from by with and or but nor as is are was were be been being it its this that
these those which who whom whose what when where why how he she they them his her their we our you your i
not no so if then than there here also into onto over under about after before between during through
such can could may might must shall should will would do does did has have had one two all any some most
more other only own same very just up out off again further once both each few many much now s t
""".split())

_ABBREV = frozenset("""mr mrs ms dr st jr sr prof gen col lt sgt capt rev hon vs etc e.g i.e al approx ca
c no nos vol vols fig figs ed eds inc ltd co corp dept univ jan feb mar apr jun jul aug sep sept oct nov
dec u.s u.k u.n d.c b.c a.d p.m a.m mt ft""".split())

_SENT_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_WORD = re.compile(r"[A-Za-z]+")
_PROPER = re.compile(r"\s[A-Z][a-z]+")  # a capitalised word after the first: a named entity
_PROSE_BAD = re.compile(r"[|{}\[\]=<>#*_~\\]|https?:|www\.| [,.;:)]|\(\s*[,;)]")  # markup and template debris


@dataclass(frozen=True)
class Article:
    index: int
    title: str
    # sections: list of paragraphs; paragraph: list of sentences (headings split sections)
    sections: tuple[tuple[tuple[str, ...], ...], ...]
    text: str


def split_sentences(paragraph: str) -> list[str]:
    """Split a paragraph on ``. ! ?`` followed by a space and a capital, except after abbreviations
    and initials (``Mr.``, ``U.S.``, ``J.``)."""
    parts = _SENT_END.split(paragraph)
    out: list[str] = []
    for part in parts:
        if out:
            last = out[-1].rsplit(" ", 1)[-1].rstrip(".!?").lower()
            if last in _ABBREV or (len(last) == 1 and last.isalpha()) or re.fullmatch(r"([a-z]\.)+[a-z]?", last):
                out[-1] = f"{out[-1]} {part}"
                continue
        out.append(part)
    return [s.strip() for s in out if s.strip()]


def _parse(index: int, text: str) -> Article:
    lines = text.split("\n")
    title = lines[0].strip("= ").strip()
    sections: list[tuple[tuple[str, ...], ...]] = []
    current: list[tuple[str, ...]] = []
    for line in lines[1:]:
        if line.startswith("="):
            if current:
                sections.append(tuple(current))
            current = []
            continue
        current.append(tuple(split_sentences(line)))
    if current:
        sections.append(tuple(current))
    return Article(index, title, tuple(sections), text)


def articles() -> list[Article]:
    """The evaluation corpus as parsed articles, in corpus order."""
    return [_parse(i, t) for i, t in enumerate(data.corpus_text(CORPUS).split("\n\n")) if t.strip()]


def _eligible(a: Article) -> bool:
    """Prose articles only: no disambiguation pages or lists."""
    return "(disambiguation)" not in a.title and not a.title.startswith("List of")


def is_prose(sentence: str, min_words: int, max_words: int) -> bool:
    """A clean prose sentence: capitalised, ends with a period after a word, no wiki debris."""
    words = sentence.split(" ")
    return (min_words <= len(words) <= max_words and sentence[0].isupper() and sentence.endswith(".")
            and bool(re.search(r"[a-z]{2}\.$", sentence)) and not _PROSE_BAD.search(sentence)
            and sentence.count("(") == sentence.count(")") and sentence.count('"') % 2 == 0
            and "  " not in sentence)


def _content_words(text: str) -> list[str]:
    return [w for w in (m.group(0).lower() for m in _WORD.finditer(text)) if w not in _STOPWORDS]


def _title_keys(title: str) -> list[str]:
    """Prefixes that identify a title's content words in a sentence (``anarchism`` -> ``anarc``)."""
    return [w[:5] for w in _content_words(title) if len(w) >= 3]


def _mentions(sentence: str, keys: list[str]) -> bool:
    words = [m.group(0).lower() for m in _WORD.finditer(sentence)]
    return any(w.startswith(k) for k in keys for w in words)


def _related(t1: str, t2: str) -> bool:
    k1, k2 = set(_title_keys(t1)), set(_title_keys(t2))
    return bool(k1 & k2)


# ----------------------------------------------------------------------------------------- builders


def build_wiki_rolling(size: int, seed: int) -> list[dict]:
    """WikiText-style documents: ``size`` whole articles (heading lines included, as WikiText's
    document-level test set) of 500 to 2,500 words, drawn with ``random.Random(seed)`` from the
    eligible articles and kept in corpus order. Scored with ``loglikelihood_rolling``."""
    pool = [a for a in articles() if _eligible(a) and 500 <= len(a.text.split()) <= 2500]
    chosen = sorted(random.Random(seed).sample(pool, size), key=lambda a: a.index)
    return [{"title": a.title, "text": a.text} for a in chosen]


def build_lambada(size: int, seed: int) -> list[dict]:
    """LAMBADA-style passages. A candidate is a target sentence (12-60 words, ending in ``word.``)
    with the prose sentences before it in the same section as context (at least 40 and at most 120
    words, at most 6 sentences). The target is the sentence's last word, which must be alphabetic, at least 4
    letters, not a stopword, occur (case-insensitively) in the context, and not occur earlier in the
    target sentence itself: it can only be predicted by looking back beyond the sentence. Passages are
    drawn with ``random.Random(seed)``, at most 10 per article. The ``text`` field follows
    ``lambada_openai``: the passage without the final period, the last space-separated word is the
    target."""
    cands: list[tuple[int, str, str]] = []
    for a in articles():
        if not _eligible(a):
            continue
        for section in a.sections:
            sents = [s for para in section for s in para]
            for i, target in enumerate(sents):
                if i == 0 or not is_prose(target, 12, 60):
                    continue
                words = target[:-1].split(" ")
                last = words[-1]
                if not re.fullmatch(r"[A-Za-z]{4,}", last) or last.lower() in _STOPWORDS:
                    continue
                if last.lower() in (w.lower() for w in _WORD.findall(" ".join(words[:-1]))):
                    continue
                ctx: list[str] = []
                for s in reversed(sents[max(0, i - 6):i]):
                    if not is_prose(s, 4, 80) or len(" ".join([s, *ctx]).split(" ")) > 120:
                        break
                    ctx.insert(0, s)
                n_ctx = len(" ".join(ctx).split(" ")) if ctx else 0
                if n_ctx < 40 or last.lower() not in (w.lower() for w in _WORD.findall(" ".join(ctx))):
                    continue
                cands.append((a.index, " ".join([*ctx, target[:-1]]), last))
    return _draw(cands, size, seed, per_article=10,
                 make=lambda c: {"text": c[1], "target": c[2]})


def _draw(cands: list, size: int, seed: int, per_article: int, make: Callable) -> list[dict]:
    rng = random.Random(seed)
    order = list(range(len(cands)))
    rng.shuffle(order)
    taken: list[int] = []
    per: dict[int, int] = {}
    for j in order:
        art = cands[j][0]
        if per.get(art, 0) < per_article:
            per[art] = per.get(art, 0) + 1
            taken.append(j)
            if len(taken) == size:
                break
    if len(taken) < size:
        raise ValueError(f"only {len(taken)} candidates for a task of size {size}")
    return [make(cands[j]) for j in sorted(taken)]


def build_hellaswag(size: int, seed: int) -> list[dict]:
    """HellaSwag-style items. Context: two consecutive prose sentences of a section (together at most
    60 words), prefixed with the article title as HellaSwag prefixes its activity label; the true
    ending is the next sentence of the same section (8-40 words). Three distractors are prose
    sentences of the same word count (else the nearest count) drawn from other articles whose titles
    share no content word with the source title. The true ending's position is seeded. Contexts are
    drawn with ``random.Random(seed)``, at most 6 per article."""
    arts = [a for a in articles() if _eligible(a)]
    by_len: dict[int, list[tuple[int, str]]] = {}
    for a in arts:
        for section in a.sections:
            for para in section:
                for s in para:
                    if is_prose(s, 8, 40):
                        by_len.setdefault(len(s.split(" ")), []).append((a.index, s))
    titles = {a.index: a.title for a in arts}
    cands: list[tuple[int, str, str, str]] = []
    for a in arts:
        for section in a.sections:
            sents = [s for para in section for s in para]
            for i in range(2, len(sents)):
                c1, c2, end = sents[i - 2], sents[i - 1], sents[i]
                if not (is_prose(c1, 6, 60) and is_prose(c2, 6, 60) and is_prose(end, 8, 40)):
                    continue
                if len(f"{c1} {c2}".split(" ")) > 60:
                    continue
                cands.append((a.index, a.title, f"{c1} {c2}", end))
    rng = random.Random(seed + 1)

    def make(c):
        art, title, ctx, end = c
        n = len(end.split(" "))
        distract: list[str] = []
        for delta in range(0, 40):
            for m in sorted({n - delta, n + delta}):
                pool = [s for (j, s) in by_len.get(m, []) if j != art and not _related(titles[j], title)
                        and s not in distract and s != end]
                rng.shuffle(pool)
                distract.extend(pool[:3 - len(distract)])
            if len(distract) == 3:
                break
        label = rng.randrange(4)
        choices = distract[:label] + [end] + distract[label:]
        return {"query": f"{title}: {ctx}", "choices": choices, "label": label}

    # draw contexts first, then build each item in sorted order so distractor draws are deterministic
    return _draw(cands, size, seed, per_article=6, make=make)


def build_knowledge(size: int, seed: int) -> list[dict]:
    """Knowledge questions (ARC/MMLU-style, scored by choice log-likelihood). The question quotes one
    prose sentence (10-40 words) of an article and asks which Wikipedia article it comes from; the
    choices are the true title and three other titles. A sentence qualifies only if it names none of
    the four subjects: no word of it starts with the first five letters of any content word of any
    choice title (``Anarchism`` excludes ``anarchist``, ``Algeria`` excludes ``Algerian``). Distractor
    titles share no content word with the true title or each other. The sentence must also name
    some entity (a capitalised word after its first word), so that it carries a fact. Answering needs knowing what the
    sentence's facts are about (an earthquake, a capital, a treaty), not finding the name. Sentences
    are drawn with ``random.Random(seed)``, at most 4 per article; the answer position is seeded."""
    arts = [a for a in articles() if _eligible(a) and _title_keys(a.title)]
    rng = random.Random(seed + 1)
    cands: list[tuple[int, str, str, list[str]]] = []
    for a in arts:
        keys = _title_keys(a.title)
        for section in a.sections:
            for para in section:
                for s in para:
                    if is_prose(s, 10, 40) and not _mentions(s, keys) and _PROPER.search(s):
                        cands.append((a.index, a.title, s, keys))

    def make(c):
        art, title, sentence, _keys = c
        others = [b for b in arts if b.index != art]
        rng.shuffle(others)
        chosen: list[str] = []
        for b in others:
            if (not any(_related(b.title, t) for t in [title, *chosen])
                    and not _mentions(sentence, _title_keys(b.title))):
                chosen.append(b.title)
                if len(chosen) == 3:
                    break
        label = rng.randrange(4)
        choices = chosen[:label] + [title] + chosen[label:]
        return {"sentence": sentence, "choices": choices, "label": label}

    return _draw(cands, size, seed, per_article=4, make=make)


# ----------------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class TaskSpec:
    name: str
    version: int
    size: int
    seed: int
    builder: Callable[[int, int], list[dict]]
    yaml: dict  # the lm-eval task config, without task/dataset fields
    sha256: str  # of the JSONL built from the packaged corpus ("" = not pinned)
    description: str


ROLLING_CONFIG = {"output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "{{text}}",
            "metric_list": [{"metric": "word_perplexity"}, {"metric": "byte_perplexity"},
                            {"metric": "bits_per_byte"}]}
_MC_METRICS = [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
               {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}]

TASKS: dict[str, TaskSpec] = {t.name: t for t in [
    TaskSpec("mq_wiki_rolling", 1, 6, 1234, build_wiki_rolling, ROLLING_CONFIG,
             "1eee1250b1b7630d2c1afc9f0e9c594bf0fad4dade5d38f042800b7e6d433c94",
             "whole articles, rolling log-likelihood (WikiText-style)"),
    TaskSpec("mq_lambada", 1, 200, 1234, build_lambada, {
        "output_type": "loglikelihood", "doc_to_text": "{{text.split(' ')[:-1]|join(' ')}}",
        "doc_to_target": "{{' '+text.split(' ')[-1]}}",
        "metric_list": [{"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
                        {"metric": "acc", "aggregation": "mean", "higher_is_better": True}]},
        "95392356bafe21e87015d614fb83f4a5b99791365d69f271010010d70c6e44a2",
        "last word needing the preceding sentences (LAMBADA-style)"),
    TaskSpec("mq_hellaswag", 2, 100, 1234, build_hellaswag, {
        "output_type": "multiple_choice", "doc_to_text": "{{query}}", "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{label}}", "metric_list": _MC_METRICS},
        "4d6347c6ab18b1aa2f68982856e1435d5a548a25787e981899e40e5ebcdd46ef",
        "true next sentence vs 3 length-matched sentences of other articles (HellaSwag-style)"),
    TaskSpec("mq_knowledge", 1, 100, 1234, build_knowledge, {
        "output_type": "multiple_choice",
        "doc_to_text": "{{sentence}}\nQuestion: Which Wikipedia article is this sentence from?\nAnswer:",
        "doc_to_choice": "{{choices}}", "doc_to_target": "{{label}}", "metric_list": _MC_METRICS},
        "effa64a14d261913d0d6451c58d65679d2cea45924a67ae1dbb0e9705243ba3e",
        "which article a sentence naming none of 4 subjects is from (knowledge, ARC-style)"),
]}

SUITES: dict[str, tuple[str, ...]] = {"local": tuple(TASKS)}


def build(name: str, size: int | None = None, seed: int | None = None) -> list[dict]:
    """The documents of a local task (default size and seed from the registry)."""
    spec = get_spec(name)
    return spec.builder(spec.size if size is None else size, spec.seed if seed is None else seed)


def get_spec(name: str) -> TaskSpec:
    if name not in TASKS:
        raise ValueError(f"unknown local task {name!r}; available: {', '.join(TASKS)}")
    return TASKS[name]


def jsonl_bytes(docs: list[dict]) -> bytes:
    return "".join(json.dumps(d, ensure_ascii=False, sort_keys=True) + "\n" for d in docs).encode("utf-8")


def _yaml_text(cfg: dict) -> str:
    # JSON is valid YAML; lm-eval reads it with its YAML loader
    return json.dumps(cfg, indent=2, ensure_ascii=False, sort_keys=True) + "\n"


def write_task(name: str, root: str | Path) -> Path:
    """Write ``<root>/<name>-v<version>-s<size>-<seed>-<corpus hash>/`` with ``<name>.jsonl`` and ``<name>.yaml``
    (reused when already there and intact); returns the folder. Raises if the data built from the
    packaged corpus differs from the pinned hash."""
    spec = get_spec(name)
    corpus_hash = data.corpus_id(CORPUS).split(":")[1]
    folder = Path(root) / f"{name}-v{spec.version}-s{spec.size}-{spec.seed}-{corpus_hash}"
    jsonl, yml = folder / f"{name}.jsonl", folder / f"{name}.yaml"
    if jsonl.exists() and yml.exists() and (json.loads(yml.read_text()).get("metadata", {}).get("sha256")
                                            == hashlib.sha256(jsonl.read_bytes()).hexdigest()):
        return folder
    blob = jsonl_bytes(build(name))
    digest = hashlib.sha256(blob).hexdigest()
    if spec.sha256 and digest != spec.sha256:
        raise RuntimeError(f"task {name} v{spec.version}: data hash {digest} differs from the pinned "
                           f"{spec.sha256}: the corpus or the builder changed (bump the version)")
    _write(folder, name, blob, {**spec.yaml, "metadata": {
        "version": float(spec.version), "size": spec.size, "seed": spec.seed, "sha256": digest,
        "corpus": data.corpus_id(CORPUS)}})
    return folder


def _write(folder: Path, name: str, blob: bytes, cfg: dict) -> None:
    jsonl = folder / f"{name}.jsonl"
    cfg = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(jsonl.resolve())}},
           "test_split": "test", **cfg}
    folder.mkdir(parents=True, exist_ok=True)
    tmp = jsonl.with_suffix(".tmp")
    tmp.write_bytes(blob)
    tmp.replace(jsonl)
    (folder / f"{name}.yaml").write_text(_yaml_text(cfg), encoding="utf-8")


def write_custom_task(folder: str | Path, name: str, docs: list[dict], **config) -> Path:
    """Write your own documents as an lm-eval task (``config``: output_type, doc_to_text, ...) into
    ``folder``; pass the folder as ``include_path`` to :func:`quant.eval.harness.run_suite`."""
    folder = Path(folder)
    blob = jsonl_bytes(docs)
    _write(folder, name, blob, {**config, "metadata": {"version": 1.0, "sha256": hashlib.sha256(blob).hexdigest()}})
    return folder

