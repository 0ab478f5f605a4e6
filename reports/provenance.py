"""Where a sweep's numbers come from: the code commit(s), the package versions, the calibration data and
every device, read from what farm and the device lab recorded in MLflow (tags ``git_commit`` and
``version.<package>``, params ``calib.*``, the trial's ``trial/recipe.json`` artifact for the calibration
corpus's content hash, tags ``device/<d>/...``).

Each table lists every distinct value with the number of trials that recorded it: one row per column is
the normal case, and a second row is the thing to notice (two commits in one sweep, a phone updated mid-way).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from farm.core.vocab import FLOAT_METHOD

from .render import Heading, Para, Table
from .runs import TrialRun
from .summary import device_identities

CALIB_KEYS = ("calib.corpus", "calib.samples", "calib.seqlen", "calib.seed")
RECIPE = "trial/recipe.json"


def _counted(values: list[tuple]) -> list[tuple]:
    counts: dict[tuple, int] = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    return sorted(counts.items(), key=lambda kv: (-kv[1], str(kv[0])))


def corpus_id(run_id: str, tracking_uri: str) -> str | None:
    """The calibration corpus's identity (name and sha256 of its text) from the run's recipe, or None
    when the run has no recipe (a float trial, a run written by hand)."""
    from mlflow import MlflowClient

    with tempfile.TemporaryDirectory(prefix="report-recipe-") as tmp:
        try:
            path = MlflowClient(tracking_uri).download_artifacts(run_id, RECIPE, tmp)
            return json.loads(Path(path).read_text()).get("calibration", {}).get("corpus_id")
        except Exception:  # missing artifact, unreadable store: the identity is then the params alone
            return None


def provenance_blocks(trials: list[TrialRun], tracking_uri: str) -> list:
    blocks: list = [Heading("Provenance")]
    commits = _counted([(t.tags.get("git_commit") or "unknown",) for t in trials])
    blocks.append(Table([{"commit": c[0], "trials": n} for c, n in commits], ["commit", "trials"], css="commits"))

    packages = sorted({k[len("version."):] for t in trials for k in t.tags if k.startswith("version.")})
    if packages:
        rows = []
        for p in packages:
            for (v,), n in _counted([(t.tags.get(f"version.{p}", "-"),) for t in trials]):
                rows.append({"package": p, "version": v, "trials": n})
        blocks.append(Table(rows, ["package", "version", "trials"], css="versions"))

    quantized = [t for t in trials if t.params.get("method") != FLOAT_METHOD and "calib.corpus" in t.params]
    if quantized:
        by: dict[tuple, list[TrialRun]] = {}
        for t in quantized:
            by.setdefault(tuple(t.params.get(k) for k in CALIB_KEYS), []).append(t)
        idents = {}  # the hash depends on the corpus alone: one recipe read per corpus
        for corpus in {t.params["calib.corpus"] for t in quantized}:
            done = [t for t in quantized if t.params["calib.corpus"] == corpus and t.status == "FINISHED"]
            idents[corpus] = next((c for t in done[:3] if (c := corpus_id(t.run_id, tracking_uri))), None)
        rows = [{**dict(zip(("corpus", "samples", "seqlen", "seed"), key)), "corpus sha256": idents[key[0]],
                 "trials": len(ts)} for key, ts in sorted(by.items(), key=lambda kv: str(kv[0]))]
        blocks += [Para("Calibration data: the windows are drawn from the corpus by (samples, seqlen, seed); the "
                        "corpus is identified by the sha256 of its text, from the trial's recipe."),
                   Table(rows, ["corpus", "corpus sha256", "samples", "seqlen", "seed", "trials"], css="calibration")]

    devices = device_identities(trials)
    if devices:
        blocks += [Para("Devices, as each reported itself (model, SoC, OS build, runtime)."),
                   Table(devices, ["device", "model", "soc", "os build", "runtime", "latency", "trials"],
                         css="device-identity")]
    return blocks
