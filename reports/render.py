"""A report as a list of blocks, rendered to Markdown (for READMEs and terminals) and to a standalone
HTML page (for a browser or a CI artifact), so both always say the same thing."""

from __future__ import annotations

import html
import re
from dataclasses import dataclass, field

from .tables import cell, markdown


@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Para:
    text: str  # `code` spans allowed


@dataclass
class Table:
    rows: list[dict]
    columns: list
    headers: dict = field(default_factory=dict)


@dataclass
class Image:
    path: str  # relative to the report
    alt: str


def to_markdown(blocks: list) -> str:
    out = []
    for b in blocks:
        if isinstance(b, Heading):
            out.append("#" * b.level + " " + b.text)
        elif isinstance(b, Para):
            out.append(b.text)
        elif isinstance(b, Table):
            out.append(markdown(b.rows, b.columns, b.headers))
        elif isinstance(b, Image):
            out.append(f"![{b.alt}]({b.path})")
        out.append("")
    return "\n".join(out)


def _inline(text: str) -> str:
    return re.sub(r"`([^`]*)`", r"<code>\1</code>", html.escape(text, quote=False))


_STYLE = ("body{font-family:system-ui,sans-serif;max-width:72rem;margin:2rem auto;padding:0 1rem;color:#222}"
          "table{border-collapse:collapse;margin:1rem 0;font-size:.9rem}"
          "th,td{border:1px solid #ccc;padding:.25rem .6rem;text-align:left}th{background:#f3f3f3}"
          "td.n{text-align:right;font-variant-numeric:tabular-nums}code{background:#f3f3f3;padding:0 .2rem}")


def to_html(blocks: list, title: str) -> str:
    body = []
    for b in blocks:
        if isinstance(b, Heading):
            body.append(f"<h{b.level}>{_inline(b.text)}</h{b.level}>")
        elif isinstance(b, Para):
            body.append(f"<p>{_inline(b.text)}</p>")
        elif isinstance(b, Table):
            head = "".join(f"<th>{html.escape(str(b.headers.get(c, c)))}</th>" for c in b.columns)
            rows = []
            for r in b.rows:
                tds = []
                for c in b.columns:
                    v = r.get(c)
                    num = isinstance(v, (int, float)) and not isinstance(v, bool)
                    tds.append(f"<td{' class=n' if num else ''}>{html.escape(cell(v))}</td>")
                rows.append("<tr>" + "".join(tds) + "</tr>")
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>")
        elif isinstance(b, Image):
            body.append(f'<p><img src="{html.escape(b.path)}" alt="{html.escape(b.alt)}"></p>')
    return (f"<!doctype html>\n<html><head><meta charset=utf-8><title>{html.escape(title)}</title>"
            f"<style>{_STYLE}</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n")
