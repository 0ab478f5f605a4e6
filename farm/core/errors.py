"""How an exception of a trial or a device job is reported: one line for the table, the traceback for the
run's artifacts."""

from __future__ import annotations

import traceback


def format_exception(exc: BaseException) -> tuple[str, str]:
    """A one-line message and the full traceback of a trial's exception."""
    msg = f"{type(exc).__name__}: {exc}".strip()
    return msg.splitlines()[0] if msg else type(exc).__name__, "".join(
        traceback.format_exception(type(exc), exc, exc.__traceback__))
