"""Markdown tables and a pivot, for reports (no pandas needed for tables this small). Cell text comes
from ``reports.fmt``."""

from __future__ import annotations

from .fmt import number


def cell(v, digits: int = 4) -> str:
    return number(v, digits)


def md_escape(text: str) -> str:
    """A cell's text made safe inside a Markdown table row (a ``|`` or a newline would split it)."""
    return text.replace("|", "\\|").replace("\n", " ")


def markdown(rows: list[dict], columns: list[str], headers: dict | None = None) -> str:
    headers = headers or {}
    out = ["| " + " | ".join(str(headers.get(c, c)) for c in columns) + " |",
           "|" + "|".join("---" for _ in columns) + "|"]
    out += ["| " + " | ".join(md_escape(cell(r.get(c))) for c in columns) + " |" for r in rows]
    return "\n".join(out)


def sort_key(v):
    """Numbers before strings before None, so mixed columns sort without errors."""
    if v is None:
        return (2, 0, "")
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return (0, v, "")
    return (1, 0, str(v))


def pivot(rows: list[dict], index: list[str], column: str, value: str) -> tuple[list[dict], list]:
    """Rows keyed by the ``index`` values, one column per distinct ``column`` value holding ``value``.
    Returns the rows (index keys plus one key per column value) and the column values in order."""
    cols = sorted({r.get(column) for r in rows}, key=lambda v: (v is not None, sort_key(v)))  # "none" first
    table: dict[tuple, dict] = {}
    for r in rows:
        key = tuple(r.get(k) for k in index)
        entry = table.setdefault(key, dict(zip(index, key)))
        entry[column, r.get(column)] = r.get(value)
    ordered = sorted(table.values(), key=lambda e: tuple(sort_key(e[k]) for k in index))
    return ordered, cols
