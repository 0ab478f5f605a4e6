"""Numbers for people: the one place that decides how a value reads in a report (Markdown, HTML and the
plots' labels alike).

Conventions: ratios to FP always carry three decimals (``1`` reads ``1.000``, so a column lines up and a
tie with FP is visible as such); durations read ``0 s``, ``3.2 s``, ``42 s``, ``4m44s``, ``2h05m`` (a
``0.0002 s`` stage read as ``0 s``); measured quantities (milliseconds, tokens/s, millijoules) keep three
significant digits and never switch to scientific notation; task accuracies are fractions with three
decimals; anything else keeps four significant digits. ``None`` is ``-``.
"""

from __future__ import annotations

import math


def _plain(v: float, digits: int) -> str:
    """``v`` to ``digits`` significant digits in positional notation (never ``1.2e+04``)."""
    if v == 0 or not math.isfinite(v):
        return "0" if v == 0 else str(v)
    exponent = math.floor(math.log10(abs(v)))
    decimals = max(0, digits - 1 - exponent)
    text = f"{round(v, decimals):.{decimals}f}"
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def number(v, digits: int = 4) -> str:
    """A generic value: ``None`` -> ``-``, bools -> yes/no, floats to ``digits`` significant digits."""
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return _plain(v, digits) if abs(v) < 1e9 else f"{v:.3e}"
    return str(v)


def ratio(v) -> str:
    """A ratio to FP (perplexity / FP perplexity): three decimals."""
    if not _is_number(v):
        return number(v)
    return f"{v:.3f}"


def measured(v) -> str:
    """Milliseconds, tokens/s, millijoules: three significant digits (whole numbers from 100 on)."""
    if not _is_number(v):
        return number(v)
    return _plain(float(v), 3)


def accuracy(v) -> str:
    """A task accuracy, a fraction in [0, 1]: three decimals."""
    if not _is_number(v):
        return number(v)
    return f"{v:.3f}"


def duration(seconds) -> str:
    """Seconds as people read them: ``0 s``, ``3.2 s``, ``42 s``, ``4m44s``, ``2h05m``."""
    if not _is_number(seconds):
        return number(seconds)
    s = float(seconds)
    if s < 10:
        text = f"{s:.1f}"
        return (text[:-2] if text.endswith(".0") else text) + " s"
    whole = math.floor(s + 0.5)  # half up, as people round (round() would make 12.5 s read 12 s)
    if whole < 60:
        return f"{whole} s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    minutes = math.floor(s / 60 + 0.5)
    return f"{minutes // 60}h{minutes % 60:02d}m"


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def interval(v) -> str:
    """A value with its confidence interval, ``0.832 [0.810, 0.851]`` (three significant digits, as
    :func:`measured`); ``~1`` follows a ratio whose interval holds 1: no difference the measurement could
    tell from noise."""
    if not _is_number(v):
        return number(v)
    lo, hi = getattr(v, "low", None), getattr(v, "high", None)
    if lo is None or hi is None or lo == hi == float(v):  # no interval, or an exact value
        return measured(v)
    text = f"{measured(float(v))} [{measured(lo)}, {measured(hi)}]"
    return text + (" ~1" if getattr(v, "is_ratio", False) and lo <= 1.0 <= hi else "")
