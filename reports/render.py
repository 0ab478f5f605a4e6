"""A report as a list of blocks, rendered to Markdown (for READMEs and terminals) and to a standalone
HTML page (for a browser or a CI artifact), so both always say the same thing.

The HTML page is self-contained: every image is embedded as a ``data:`` URI, so the page can be mailed,
attached to a CI run or opened from any folder. Cell text always comes from ``reports.fmt`` (a column's
formatter, else the generic one), so Markdown and HTML show the same characters; the best value of a
column (``Table.best``) is bold in Markdown and has the class ``best`` in HTML.
"""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .fmt import number
from .tables import md_escape


@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Para:
    text: str  # `code` spans allowed


@dataclass(frozen=True)
class Link:
    """A cell value that links somewhere (a trial's run in the MLflow UI)."""
    text: str
    url: str


@dataclass
class Table:
    rows: list[dict]
    columns: list
    headers: dict = field(default_factory=dict)
    formats: dict = field(default_factory=dict)  # column -> formatter (reports.fmt) for its numbers
    best: dict = field(default_factory=dict)     # column -> "min" | "max": that column's best is highlighted
    best_among: Callable[[dict], bool] | None = None  # rows eligible for "best" (default: all)
    css: str = ""                                 # class of the <table> element

    def text(self, row: dict, column) -> str:
        v = row.get(column)
        if isinstance(v, Link):
            return v.text
        if _is_number(v) and column in self.formats:
            return self.formats[column](v)
        return number(v)

    def best_rows(self) -> dict:
        """column -> ids of the rows holding the column's best value (ties all count)."""
        out = {}
        for c, sense in self.best.items():
            vals = [(i, r[c]) for i, r in enumerate(self.rows) if _is_number(r.get(c))
                    and (self.best_among is None or self.best_among(r))]
            if len(vals) < 2:  # a single value is not "best" of anything
                continue
            pick = min if sense == "min" else max
            # compare the shown text, so two cells that read the same are both highlighted
            target = self.text({c: pick(v for _, v in vals)}, c)
            out[c] = {i for i, v in vals if self.text({c: v}, c) == target}
        return out


@dataclass
class Image:
    path: str  # relative to the report's folder
    alt: str
    # an SVG of the same picture: the HTML page inlines it (its marks, error bars and labels are then part
    # of the page's DOM, readable by a browser test or a screen reader); Markdown keeps the PNG
    svg: str | None = None


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _md_table(t: Table) -> str:
    best = t.best_rows()
    out = ["| " + " | ".join(md_escape(str(t.headers.get(c, c))) for c in t.columns) + " |",
           "|" + "|".join("---" for _ in t.columns) + "|"]
    for i, r in enumerate(t.rows):
        cells = []
        for c in t.columns:
            text = md_escape(t.text(r, c))
            v = r.get(c)
            if isinstance(v, Link):
                text = f"[{text}]({v.url})"
            if i in best.get(c, ()):
                text = f"**{text}**"
            cells.append(text)
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def to_markdown(blocks: list) -> str:
    out = []
    for b in blocks:
        if isinstance(b, Heading):
            out.append("#" * b.level + " " + b.text)
        elif isinstance(b, Para):
            out.append(b.text)
        elif isinstance(b, Table):
            out.append(_md_table(b))
        elif isinstance(b, Image):
            out.append(f"![{b.alt}]({b.path})")
        out.append("")
    return "\n".join(out)


def _inline(text: str) -> str:
    return re.sub(r"`([^`]*)`", r"<code>\1</code>", html.escape(text, quote=False))


_STYLE = ("body{font-family:system-ui,sans-serif;max-width:80rem;margin:2rem auto;padding:0 1rem;color:#222}"
          "table{border-collapse:collapse;margin:1rem 0;font-size:.9rem}"
          "th,td{border:1px solid #ccc;padding:.25rem .6rem;text-align:left}th{background:#f3f3f3}"
          "td.n{text-align:right;font-variant-numeric:tabular-nums}code{background:#f3f3f3;padding:0 .2rem}"
          "td.best{font-weight:700;background:#e3f2e1}img{max-width:100%;height:auto}")


def _html_table(t: Table) -> str:
    best = t.best_rows()
    head = "".join(f"<th>{html.escape(str(t.headers.get(c, c)))}</th>" for c in t.columns)
    rows = []
    for i, r in enumerate(t.rows):
        tds = []
        for c in t.columns:
            v = r.get(c)
            classes = (["n"] if _is_number(v) else []) + (["best"] if i in best.get(c, ()) else [])
            text = html.escape(t.text(r, c))
            if isinstance(v, Link):
                text = f'<a href="{html.escape(v.url)}">{text}</a>'
            attr = f' class="{" ".join(classes)}"' if classes else ""
            tds.append(f"<td{attr}>{text}</td>")
        rows.append("<tr>" + "".join(tds) + "</tr>")
    cls = f' class="{html.escape(t.css)}"' if t.css else ""
    return f"<table{cls}><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _data_uri(path: Path) -> str:
    kind = {".png": "image/png", ".svg": "image/svg+xml", ".jpg": "image/jpeg"}.get(path.suffix.lower(),
                                                                                     "application/octet-stream")
    return f"data:{kind};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def to_html(blocks: list, title: str, base: str | Path | None = None) -> str:
    """The page; images are read from ``base`` (the report's folder) and embedded, or linked by their
    relative path when ``base`` is None."""
    body = []
    for b in blocks:
        if isinstance(b, Heading):
            body.append(f"<h{b.level}>{_inline(b.text)}</h{b.level}>")
        elif isinstance(b, Para):
            body.append(f"<p>{_inline(b.text)}</p>")
        elif isinstance(b, Table):
            body.append(_html_table(b))
        elif isinstance(b, Image) and b.svg and base is not None and (Path(base) / b.svg).is_file():
            svg = (Path(base) / b.svg).read_text()
            svg = svg[svg.index("<svg"):]  # the markup without its XML declaration and doctype
            body.append(f'<figure class="svg" role="img" aria-label="{html.escape(b.alt)}">{svg}</figure>')
        elif isinstance(b, Image):
            src = _data_uri(Path(base) / b.path) if base is not None else b.path
            body.append(f'<figure><img src="{html.escape(src)}" alt="{html.escape(b.alt)}"></figure>')
    return (f"<!doctype html>\n<html><head><meta charset=utf-8><title>{html.escape(title)}</title>"
            f"<style>{_STYLE}</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n")
