"""Which arithmetic made each trial: the numerics version farm records on every trial run (param
``numerics``, tag ``numerics_version``; ``quant.NUMERICS_VERSION`` when the trial ran). Numbers made by
different versions are not comparable, so a report that holds several flags the trials of every version
but the newest, and the trials that carry none (made before versions existed).

Read from MLflow only: this package never imports ``quant``.
"""

from __future__ import annotations

from .render import Heading, Para, Table
from .runs import TrialRun


def version_of(t: TrialRun) -> int | None:
    """The trial's numerics version, or None when its run carries none."""
    for v in (t.params.get("numerics"), t.tags.get("numerics_version")):
        if v in (None, "", "None"):
            continue
        try:
            return int(v)
        except (TypeError, ValueError):
            continue
    return None


def flagged(trials: list[TrialRun]) -> tuple[int | None, list[TrialRun]]:
    """The newest numerics version among ``trials`` and the trials made by any other (or by none)."""
    versions = {version_of(t) for t in trials}
    newest = max((v for v in versions if v is not None), default=None)
    if len(versions) <= 1:
        return newest, []
    return newest, [t for t in trials if version_of(t) != newest]


def numerics_blocks(trials: list[TrialRun]) -> list:
    """A warning and a table when the trials come from more than one numerics version; nothing otherwise."""
    newest, other = flagged(trials)
    if not other:
        return []
    label = {None: "none (before numerics versions)"}
    rows = [{"trial": t.short, "scheme": t.params.get("scheme", ""), "method": t.params.get("method", ""),
             "numerics": label.get(version_of(t), version_of(t)), "status": t.status} for t in other]
    return [Heading("Numerics versions differ"),
            Para(f"**Not comparable:** {len(other)} of {len(trials)} trials were made with another numerics version "
                 f"than the newest here ({newest}); their numbers come from other arithmetic. Run the sweep again "
                 "with the current code to replace them."),
            Table(rows, ["trial", "scheme", "method", "numerics", "status"], css="numerics")]
