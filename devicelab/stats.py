"""Summary statistics of repeated timings, and the interleaved runner that compares variants fairly.

Conventions: samples are milliseconds in run order; the median is the headline (a latency distribution
is skewed by stalls, so the mean is not), p90 the tail, and the confidence interval of the median is a
seeded percentile bootstrap, so the same samples always give the same interval.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

BOOTSTRAP_RESAMPLES = 2000


def median(samples: Sequence[float]) -> float:
    return float(np.median(np.asarray(samples, dtype=np.float64)))


def p90(samples: Sequence[float]) -> float:
    """The 90th percentile (linear interpolation between order statistics, numpy's default)."""
    return float(np.percentile(np.asarray(samples, dtype=np.float64), 90))


def bootstrap_median_ci(samples: Sequence[float], level: float = 0.95, resamples: int = BOOTSTRAP_RESAMPLES,
                        seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap confidence interval of the median at ``level`` (0 < level < 1).

    With one sample the interval is that sample: there is nothing to resample, and saying so beats NaN.
    """
    x = np.asarray(samples, dtype=np.float64)
    if x.size == 0:
        raise ValueError("no samples: a confidence interval needs at least one")
    if not 0.0 < level < 1.0:
        raise ValueError(f"ci level must be between 0 and 1, got {level}")
    if x.size == 1:
        return float(x[0]), float(x[0])
    rng = np.random.default_rng(seed)
    meds = np.median(x[rng.integers(0, x.size, size=(resamples, x.size))], axis=1)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(meds, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def summarize(samples: Sequence[float], level: float = 0.95, seed: int = 0) -> dict:
    """``median_ms``, ``p90_ms``, ``ci_low_ms``, ``ci_high_ms``, ``ci_level``: the Measurement's fields."""
    if len(samples) == 0:
        raise ValueError("no samples to summarize")
    lo, hi = bootstrap_median_ci(samples, level, seed=seed)
    return {"median_ms": median(samples), "p90_ms": p90(samples), "ci_low_ms": lo, "ci_high_ms": hi,
            "ci_level": level}


def interleaved(variants: dict[str, Callable[[], float]], rounds: int, warmup: int = 0) -> dict[str, list[float]]:
    """Run each variant once per round, in turn (A, B, A, B, ...), and collect what each call returns.

    Variants compared on one device must share its drift (thermal state, clock governor, background
    load): back-to-back blocks would charge all of the drift to whichever ran second. ``warmup`` rounds
    run the same way and are dropped. Each callable returns one sample (ms, or any number).
    """
    if not variants:
        raise ValueError("no variants to compare")
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    out: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(warmup + rounds):
        for name, run in variants.items():
            value = run()
            if r >= warmup:
                out[name].append(float(value))
    return out
