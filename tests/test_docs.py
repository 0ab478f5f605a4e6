"""The README and docs/ stay true: every relative link (file and #anchor) resolves, and every `farm ...`
command shown in a README code block names a real subcommand chain whose `--help` exits 0 and whose flags
that subcommand has (in this process; the installed `farm` entry point is run once)."""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^(```|~~~)")
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def prose(text: str) -> str:
    """The page without fenced code blocks and inline code, where link syntax is not a link."""
    out, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line.strip()):
            fenced = not fenced
            continue
        if not fenced:
            out.append(re.sub(r"`+[^`]*`+", "", line))
    return "\n".join(out)


def code_blocks(text: str) -> list[str]:
    blocks, cur, fenced = [], [], False
    for line in text.splitlines():
        if FENCE.match(line.strip()):
            if fenced:
                blocks.append("\n".join(cur))
                cur = []
            fenced = not fenced
            continue
        if fenced:
            cur.append(line)
    return blocks


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, markup and punctuation dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())  # a link keeps its text
    text = "".join(c for c in text.lower() if c in " -_" or unicodedata.category(c)[0] in "LN")
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    fenced = False
    for line in page.read_text().splitlines():
        if FENCE.match(line.strip()):
            fenced = not fenced
        if fenced or not re.match(r"#{1,6} ", line):
            continue
        base = slug(line.lstrip("#"))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def relative_links(page: Path) -> list[str]:
    return [t for t in LINK.findall(prose(page.read_text()))
            if not re.match(r"[a-z][a-z0-9+.-]*:", t)]  # http:, https:, mailto: ... are not ours


def test_the_slug_rule_matches_githubs():
    assert slug(" The headline table: whole corpus") == "the-headline-table-whole-corpus"
    assert slug(" On a GPU (`--device cuda`)") == "on-a-gpu---device-cuda"
    assert slug(" Zero-shot tasks (lm-eval)") == "zero-shot-tasks-lm-eval"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(page):
    links = relative_links(page)
    bad = []
    for target in links:
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            bad.append(f"{target}: no such file {dest}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{target}: no heading with anchor #{anchor} in {dest.relative_to(REPO)}")
    assert not bad, f"{page.relative_to(REPO)}: " + "; ".join(bad)


def test_the_readme_links_to_every_docs_page_and_stays_short():
    readme = (REPO / "README.md").read_text()
    linked = {Path(t.partition("#")[0]).name for t in relative_links(REPO / "README.md")}
    assert {p.name for p in (REPO / "docs").glob("*.md")} <= linked
    assert len(readme.splitlines()) <= 150


def farm_commands(text: str) -> list[list[str]]:
    """`farm ...` command lines of the code blocks: continuations joined, comments and env settings dropped."""
    out = []
    for block in code_blocks(text):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            try:
                words = shlex.split(line, comments=True)
            except ValueError:
                continue
            while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):
                words = words[1:]
            if words[:1] == ["farm"]:
                out.append(words[1:])
    return out


def _subparsers(p: argparse.ArgumentParser) -> dict:
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            return a.choices
    return {}


def chain_of(words: list[str]) -> tuple[list[str], argparse.ArgumentParser]:
    """The longest prefix of ``words`` that names nested subcommands, and the parser it ends at
    (`farm models verify NAME` -> ["models"]: `verify` is an argument of `models`, not a subcommand)."""
    from farm.cli import build_parser

    parser, chain = build_parser(), []
    for w in words:
        sub = _subparsers(parser)
        if w not in sub:
            break
        parser, chain = sub[w], chain + [w]
    return chain, parser


README_COMMANDS = farm_commands((REPO / "README.md").read_text())


def test_the_readme_shows_the_five_commands():
    assert {c[0] for c in README_COMMANDS} >= {"quantize", "eval", "sweep", "status", "report"}


@pytest.mark.parametrize("words", README_COMMANDS, ids=lambda w: " ".join(["farm", *w])[:60])
def test_every_readme_farm_command_is_real(words):
    chain, parser = chain_of(words)
    assert chain, f"farm {' '.join(words)}: {words[0]!r} is not a farm subcommand"
    known = {s for a in parser._actions for s in a.option_strings}
    flags = {w.split("=", 1)[0] for w in words[len(chain):] if w.startswith("--")}
    assert flags <= known, f"farm {' '.join(chain)} has no {sorted(flags - known)}"
    for w in words[len(chain):]:
        if w.endswith((".yaml", ".yml")):
            assert (REPO / w).exists(), f"farm {' '.join(words)}: {w} is not in the repository"
    from farm.cli import build_parser

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as done:
        build_parser().parse_args(chain + ["--help"])
    assert done.value.code == 0
    assert out.getvalue().startswith(f"usage: farm {' '.join(chain)}")


def test_the_farm_entry_point_answers_help():
    farm = Path(sys.executable).parent / "farm"
    cmd = [str(farm)] if farm.exists() else [sys.executable, "-m", "farm.cli"]
    r = subprocess.run(cmd + ["sweep", "--help"], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 0 and r.stdout.startswith("usage: farm sweep"), r.stderr
