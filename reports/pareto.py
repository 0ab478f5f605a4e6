"""Pareto frontiers: the configurations no other one beats on every objective at once.

Every objective is minimised (perplexity ratio, milliseconds, millijoules; pass ``-x`` for a quantity to
maximise). A point is on the frontier when no other point is at least as good on every objective and
strictly better on one; equal points are all on it.
"""

from __future__ import annotations


def dominates(a: tuple, b: tuple) -> bool:
    return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))


def frontier(points: list[tuple]) -> list[bool]:
    """For each point (a tuple of objectives, all minimised), whether it is on the Pareto frontier."""
    return [not any(dominates(q, p) for j, q in enumerate(points) if j != i) for i, p in enumerate(points)]
