"""Markdown tables and a pivot, for reports (no pandas needed for tables this small)."""

from __future__ import annotations


def cell(v, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1e5 else f"{v:.3e}"
    return str(v)


def markdown(rows: list[dict], columns: list[str], headers: dict | None = None) -> str:
    headers = headers or {}
    out = ["| " + " | ".join(headers.get(c, c) for c in columns) + " |",
           "|" + "|".join("---" for _ in columns) + "|"]
    out += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
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
