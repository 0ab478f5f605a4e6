"""The numerics version: which arithmetic made a number.

``NUMERICS_VERSION`` changes whenever a change to ``quant`` moves any result (a perplexity, a calibrated
range, a trained weight) on the same inputs: a rounding rule, a kernel, a default range, the order of
a fold. It is part of every recipe (``numerics_version``), of farm's trial ids and of the quantize
stage's cache key, so a result computed by older arithmetic is never taken for a current one.

``tests/test_numerics.py`` pins a small result per version; when it fails, either the change was not
meant to move numbers (fix it) or it was (bump the version here, add the new pins, say why below).

History:

1. The first numbered version (2026-11-30). Results made before it carry no version. Between the README's
   first demo table (commit 9feeed8, 2026-11-22: W8A8 RTN 48.02, SmoothQuant 31.07 on 40 windows) and
   this version, RTN moved to 48.18 and SmoothQuant to 31.09 (``docs/numerics.md`` says what moved them).
"""

NUMERICS_VERSION = 1


def mismatch(found) -> str | None:
    """Why a result made under numerics version ``found`` is not comparable to this code's; None when it is."""
    if found is None or found == "":
        return f"made before numerics versions existed (this code is version {NUMERICS_VERSION})"
    try:
        found = int(found)
    except (TypeError, ValueError):
        return f"numerics version {found!r} is not a number (this code is version {NUMERICS_VERSION})"
    if found != NUMERICS_VERSION:
        return f"made with numerics version {found} (this code is version {NUMERICS_VERSION})"
    return None
