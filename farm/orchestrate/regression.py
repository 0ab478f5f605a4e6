"""The nightly's decisions: is a candidate slower, or less accurate, than its baseline?

Latency comes from interleaved A/B pairs on one device (baseline, candidate, baseline, candidate, ...:
``devicelab.pool.Pool.compare`` with one timed run per variant per round). Each pair i gives the ratio
r_i = candidate_ms_i / baseline_ms_i; the pair shares the device's drift (heat, clocks, the other
processes of a shared machine), so the ratio cancels most of it. The estimate is the median of the r_i and
its confidence interval a seeded percentile bootstrap of that median (``devicelab.stats``). A latency
regression is a slowdown that is both **material** (median ratio above ``1 + threshold``) and
**certain** (the whole interval above ``1 + threshold / 2``). The margin of half the threshold, rather
than 1, absorbs the small systematic differences of any A/B setup (the candidate always runs second, in
another session): on this machine an unchanged candidate's median pair ratio came out between 0.99 and
1.02, and with "interval above 1" the false alarms grew with the number of pairs (13% at 96 pairs). How
many pairs the rule needs to see a 10% slowdown, and its false alarm rate, are measured by
``bench/nightly_power.py`` (docs/nightly.md).

Accuracy is deterministic here (the same evaluation windows, the same arithmetic), so a perplexity is
compared with a relative tolerance: a regression when candidate / baseline - 1 > ``tolerance``.

Units: milliseconds in, ratios out (1.10 = 10% slower); ``threshold`` and ``tolerance`` are fractions
(0.05 = 5%).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

DEFAULT_THRESHOLD = 0.05  # latency: flag a median slowdown above 5%
DEFAULT_PPL_TOLERANCE = 0.01  # perplexity: flag a rise above 1%
DEFAULT_LEVEL = 0.95


@dataclass
class Verdict:
    """One compared metric of one slot (a trial of the suite) on one device (latency) or corpus (ppl)."""

    slot: str  # model/layers/scheme/method of the suite's trial
    metric: str  # e.g. device/host/prefill_ms, ppl/wiki/seq32
    kind: str  # latency | accuracy
    baseline: float  # the baseline's value (latency: its median over the pairs, ms)
    candidate: float
    change: float  # candidate / baseline - 1 (latency: the median pair ratio - 1)
    limit: float  # the threshold or tolerance, as a fraction
    regression: bool
    ci_low: float | None = None  # latency: the bootstrap interval of the median ratio - 1
    ci_high: float | None = None
    level: float | None = None
    pairs: int | None = None
    device: str = ""  # the device that measured both (latency)
    baseline_run: str = ""  # MLflow run ids of the two trials
    candidate_run: str = ""

    @property
    def confidence(self) -> str:
        if self.kind == "accuracy":
            return "deterministic (same windows, same arithmetic)"
        return (f"{self.level:.0%} CI of the median ratio [{self.ci_low + 1:.3f}, {self.ci_high + 1:.3f}] "
                f"over {self.pairs} interleaved A/B pairs")

    def sentence(self) -> str:
        """One line for a person: what moved, by how much, how sure, which runs."""
        where = f" on {self.device}" if self.device else ""
        word = "REGRESSION" if self.regression else "ok"
        return (f"{word}: {self.metric} of {self.slot}{where} {self.change:+.1%} (limit {self.limit:+.1%}; "
                f"{self.confidence}); baseline run {self.baseline_run}, candidate run {self.candidate_run}")

    def to_dict(self) -> dict:
        return {**asdict(self), "confidence": self.confidence}


def pair_ratios(baseline_ms: Sequence[float], candidate_ms: Sequence[float]) -> list[float]:
    """Candidate / baseline per interleaved pair (the two lists in run order, one sample per round)."""
    if len(baseline_ms) != len(candidate_ms):
        raise ValueError(f"A/B pairs need as many baseline as candidate samples, got {len(baseline_ms)} and "
                         f"{len(candidate_ms)}")
    if not baseline_ms:
        raise ValueError("no A/B pairs to compare")
    return [c / b for b, c in zip(baseline_ms, candidate_ms)]


def latency_decision(baseline_ms: Sequence[float], candidate_ms: Sequence[float],
                     threshold: float = DEFAULT_THRESHOLD, level: float = DEFAULT_LEVEL,
                     seed: int = 0) -> dict:
    """``ratio`` (median pair ratio), ``ci_low``/``ci_high`` (its bootstrap interval), ``regression``."""
    from devicelab import stats

    ratios = pair_ratios(baseline_ms, candidate_ms)
    ratio = stats.median(ratios)
    lo, hi = stats.bootstrap_median_ci(ratios, level, seed=seed)
    return {"ratio": ratio, "ci_low": lo, "ci_high": hi, "pairs": len(ratios),
            "regression": ratio > 1.0 + threshold and lo > 1.0 + threshold / 2.0}


def accuracy_decision(baseline: float, candidate: float, tolerance: float = DEFAULT_PPL_TOLERANCE) -> dict:
    """Perplexity (lower is better): ``change`` = candidate / baseline - 1, ``regression`` above tolerance.
    A non-finite candidate (a diverged model) is always a regression."""
    if not baseline > 0:
        raise ValueError(f"a baseline perplexity must be positive, got {baseline}")
    change = candidate / baseline - 1.0 if candidate == candidate else float("inf")
    return {"change": change, "regression": not change <= tolerance}
