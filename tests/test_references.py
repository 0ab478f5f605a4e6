"""The repository is self-contained: no code, comment or page cites a document that is not in it.

Two kinds of citation are checked in every file git would ship (code, tests, scripts, docs): a document
named in capitals (``README.md``, ``CHANGES.md``: such a name is a project document, never an output),
and a path under ``docs/`` (``docs/reference.md#precision-table``), whose anchor must be a heading of that
page. Lower-case names such as ``report.md`` are files the code writes, not citations. Markdown links
inside README.md and docs/ are tests/test_docs.py's."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from tests.test_docs import anchors

REPO = Path(__file__).resolve().parent.parent
TEXT = {".py", ".md", ".sh", ".yaml", ".yml", ".toml", ".txt", ".cfg", ".ini", ".html", ""}
CAPS_DOC = re.compile(r"(?<![\w/.-])([A-Z][A-Z0-9_-]*\.md)\b")
DOCS_PATH = re.compile(r"(?<![\w.-])((?:\.\./)*docs/[\w./-]+?\.md)(#[\w-]+)?")


def _files() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout.split()
    return [REPO / f for f in out if Path(f).suffix in TEXT and (REPO / f).is_file()]


def dangling(text: str, where: Path, docs: set[str]) -> list[str]:
    """The citations in ``text`` (a file at ``where``) that do not resolve in the repository."""
    bad = []
    for m in CAPS_DOC.finditer(text):
        if m.group(1) not in docs:
            bad.append(m.group(1))
    for m in DOCS_PATH.finditer(text):
        rel, anchor = m.group(1), m.group(2)
        page = (REPO / rel.lstrip("./")) if not rel.startswith("..") else (where.parent / rel).resolve()
        if not page.is_file():
            bad.append(rel)
        elif anchor and anchor[1:] not in anchors(page):
            bad.append(rel + anchor)
    return bad


def _doc_names() -> set[str]:
    return {p.name for p in _files() if p.suffix == ".md"}


def test_no_file_cites_a_document_that_is_not_in_the_repository():
    docs = _doc_names()
    found = []
    for path in _files():
        if path == Path(__file__).resolve():  # its own examples of what must fail
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        for i, line in enumerate(text.splitlines(), 1):
            found += [f"{path.relative_to(REPO)}:{i}: {ref}" for ref in dangling(line, path, docs)]
    assert found == []


def test_the_check_sees_missing_documents_and_anchors():
    """The checker itself: a document outside the repository, a docs page that does not exist and an anchor
    that is no heading are each reported; what exists passes."""
    docs = _doc_names()
    here = REPO / "quant" / "scheme.py"
    outside = "MOBILE" + "QUANT.md"  # spelled apart so this file passes its own check
    assert dangling(f"the table ({outside} §1.2)", here, docs) == [outside]
    assert dangling("see docs/nosuch.md", here, docs) == ["docs/nosuch.md"]
    assert dangling("``docs/reference.md#no-such-heading``", here, docs) == ["docs/reference.md#no-such-heading"]
    assert dangling("README.md and docs/reference.md#precision-table, then report.md", here, docs) == []
