"""Energy from a phone's fuel gauge, over the execute phase only.

The gauge (``/sys/class/power_supply/battery/current_now``, ``voltage_now``) is not an ammeter: it
publishes a new value about once a second, each the average over the period before it, and late. So:

* **Sampling runs on the phone** (:func:`sampler_script`, a shell loop started in the same ``adb shell`` as
  the runtime) and stamps each read with the phone's clock, the clock the run's markers use; one
  ``adb shell cat`` per sample would add a round trip to each and a second clock.
* **The update period is measured**, not assumed: an update is a read whose value differs from the one
  before; the period is the median gap between updates (:func:`gauge_updates`).
* **Only the execute phase counts.** The caller gives the interval that certainly lies inside the
  execute phase (from the markers around the process and the profile's init / de-init / execute times,
  :func:`execute_window`). An update is used when the whole interval it averages lies inside it: its
  time minus one period and a lag margin (``lag_periods``, 2 by default: the gauge may report up to two
  periods late) must not precede the window's start. Process start, context load and output writes are
  never charged to the NPU.
* **At least** :data:`MIN_UPDATES` **updates** must qualify, else :class:`EnergyRefused` names the gauge
  period and the execute time it needs; a gauge that never updated, or nodes that cannot be read
  (SELinux), refuse energy the same way, and the record keeps its latency.
* **Idle baseline** before and after the run (same rule: updates whose averaging interval lies inside
  the idle windows), the excess power is execute minus idle, and its uncertainty is the standard errors
  of both means in quadrature.

Units: ``current_now`` is µA on most phones and mA on some, and negative while discharging on some (the
magnitude decides: :func:`to_ma`); ``voltage_now`` is µV (mV when below 100000).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

BATTERY = "/sys/class/power_supply/battery"
MIN_UPDATES = 10


class EnergyRefused(RuntimeError):
    """No trustworthy energy for this run; the message says why (latency is still recorded)."""


def sampler_script(out_file: str, interval_s: float = 0.01, battery: str = BATTERY) -> str:
    """A shell loop that appends ``<ns> <current_now> <voltage_now> <temp>`` lines (phone clock) until
    killed; a read that fails (SELinux) leaves the tool's message in place of the numbers."""
    return (f"( while :; do t=$(date +%s%N); v=$(cat {battery}/current_now {battery}/voltage_now {battery}/temp 2>&1 | "
            f"tr '\\n' ' '); echo \"$t $v\"; sleep {interval_s:g}; done ) > {out_file} 2>&1 &")


@dataclass
class Sample:
    t: float  # seconds, phone clock
    current: float  # as read
    voltage: float
    temp: float | None = None  # °C (the node holds tenths)


def parse_samples(text: str) -> tuple[list[Sample], list[str]]:
    """Samples and the error lines (reads that failed) of a sampler file."""
    samples, errors = [], []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 2:
            continue
        try:
            t = int(parts[0]) / 1e9
        except ValueError:
            continue
        try:
            temp = float(parts[3]) / 10.0 if len(parts) > 3 else None
            samples.append(Sample(t, float(parts[1]), float(parts[2]), temp))
        except (ValueError, IndexError):
            errors.append(" ".join(parts[1:]))
    return samples, errors


def to_ma(values: list[float], unit: str = "auto") -> tuple[list[float], str]:
    """current_now in mA (magnitudes). ``auto``: µA when the typical magnitude is 20000 or more (20 mA in µA;
    20 A in mA, which no phone draws)."""
    if unit == "auto":
        mags = sorted(abs(v) for v in values)
        unit = "uA" if mags and mags[len(mags) // 2] >= 20000 else "mA"
    if unit not in ("uA", "mA"):
        raise ValueError(f"current_unit must be auto, uA or mA, got {unit!r}")
    return [abs(v) / 1000.0 if unit == "uA" else abs(float(v)) for v in values], unit


def _volts(v: float) -> float:
    return v / 1e6 if abs(v) >= 100000 else v / 1e3


def gauge_updates(samples: list[Sample]) -> list[tuple[float, float, float]]:
    """(time, current, voltage) at each gauge update: the first read of each new value."""
    out, last = [], None
    for s in samples:
        key = (s.current, s.voltage)
        if key != last:
            out.append((s.t, s.current, s.voltage))
            last = key
    return out[1:]  # the first read is not an update we saw happen


def gauge_period(updates: list) -> float | None:
    gaps = np.diff([u[0] for u in updates])
    return float(np.median(gaps)) if len(gaps) else None


def execute_window(t_start: float, t_end: float, init_s: float, deinit_s: float, execute_s: float) -> tuple[float, float]:
    """The interval surely inside the execute phase of one process that ran from ``t_start`` to ``t_end``
    (phone clock): execute began no earlier than ``t_start + init`` and ended no later than
    ``t_end - deinit``, and lasted ``execute_s``; what else the process did (start-up, library loads,
    output writes) has an unknown place, so the sure part is ``[t_end - deinit - execute, t_start + init
    + execute]``."""
    lo, hi = t_end - deinit_s - execute_s, t_start + init_s + execute_s
    return (lo, hi) if hi > lo else (lo, lo)


def _inside(updates, window, period, lag_periods) -> list:
    lo, hi = window
    return [u for u in updates if u[0] - period * (1 + lag_periods) >= lo and u[0] <= hi]


def excess_power(samples: list[Sample], execute: tuple[float, float], idle: list[tuple[float, float]],
                 current_unit: str = "auto", lag_periods: float = 2.0, min_updates: int = MIN_UPDATES) -> dict:
    """Mean power above idle during ``execute`` (mW) with its standard error, from gauge updates whose
    averaging interval lies inside the windows; EnergyRefused when the gauge cannot support the claim."""
    if len(samples) < 3:
        raise EnergyRefused(f"only {len(samples)} gauge reads were taken")
    updates = gauge_updates(samples)
    period = gauge_period(updates)
    if period is None or period <= 0:
        raise EnergyRefused("the fuel gauge did not update during the run (current_now kept one value)")
    _, unit = to_ma([s.current for s in samples], current_unit)
    run = _inside(updates, execute, period, lag_periods)
    need_s = period * (min_updates + 1 + lag_periods)
    if len(run) < min_updates:
        raise EnergyRefused(
            f"the fuel gauge updated {len(run)} times inside the execute phase ({execute[1] - execute[0]:.2f} s "
            f"usable), fewer than {min_updates}: its period is {period:.3g} s, so an execute phase of at least "
            f"{need_s:.3g} s is needed (more inferences per block)")
    rest = [u for w in idle for u in _inside(updates, w, period, lag_periods)]
    if len(rest) < 2:
        raise EnergyRefused(f"the idle baseline holds {len(rest)} gauge updates (period {period:.3g} s); lengthen "
                            f"baseline_s to at least {period * (3 + lag_periods):.3g} s")

    def watts(us):
        ma, _ = to_ma([u[1] for u in us], unit)
        return np.array([c * _volts(u[2]) for c, u in zip(ma, us)])  # mA * V = mW

    p_run, p_idle = watts(run), watts(rest)
    se = math.sqrt(p_run.var(ddof=1) / len(p_run) + p_idle.var(ddof=1) / len(p_idle))
    return {"power_mw": float(p_run.mean() - p_idle.mean()), "power_se_mw": se, "run_mw": float(p_run.mean()),
            "idle_mw": float(p_idle.mean()), "gauge_period_s": period, "updates_used": len(run),
            "idle_updates_used": len(rest), "current_unit": unit, "reads": len(samples),
            "window_s": [round(execute[0], 6), round(execute[1], 6)]}
