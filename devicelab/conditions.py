"""What the host was doing while it measured: CPU count, frequency governor, load, and how much of the
CPU other processes took during the measurement window.

A host latency is only worth reading when nothing heavy ran beside it. The load average says what the
machine did over the last minute, including the measurement itself, so it cannot tell a benchmark alone
from a benchmark beside a training job. The window's own accounting can: ``/proc/stat`` counts every
core's busy time, the process's own CPU time is known, and the difference is what everyone else took.
``others_cpu`` is that difference in cores (0.0: the machine did nothing else; 1.0: one other core's
worth of work ran the whole time). A measurement is flagged as loaded when ``others_cpu`` exceeds
:data:`LOADED_OTHERS_CPU`.

Linux only for the window accounting; elsewhere the fields are ``None`` and nothing is flagged.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

# other processes' CPU use during a measurement, in cores, above which the measurement is flagged. A
# quarter core: an idle 2-core machine with a shell, an editor and a Ray raylet measured 0.02-0.08 here;
# one training process beside the bench reads about 1.0.
LOADED_OTHERS_CPU = 0.25


def _busy_jiffies() -> int | None:
    """All cores' non-idle time since boot in clock ticks (the ``cpu`` line of /proc/stat)."""
    try:
        first = Path("/proc/stat").read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return None
    if first[0] != "cpu":
        return None
    vals = [int(v) for v in first[1:]]
    # user nice system idle iowait irq softirq steal [guest guest_nice, already inside user/nice]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
    return sum(vals[:8]) - idle


def governor() -> str:
    """The CPU frequency governor(s), e.g. ``performance`` or ``powersave``; ``""`` when not exposed (VMs)."""
    found = set()
    for p in Path("/sys/devices/system/cpu").glob("cpu[0-9]*/cpufreq/scaling_governor"):
        try:
            found.add(p.read_text().strip())
        except OSError:
            continue
    return ",".join(sorted(found))


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


@dataclass
class Conditions:
    cpus: int  # cores this process may use
    governor: str
    load_before: float | None  # 1-minute load average at the start and end
    load_after: float | None
    others_cpu: float | None  # other processes' CPU use over the window, in cores
    seconds: float  # the window's length
    loaded: bool  # others_cpu above LOADED_OTHERS_CPU

    def to_dict(self) -> dict:
        return asdict(self)

    def sentence(self) -> str:
        other = "unknown" if self.others_cpu is None else f"{self.others_cpu:.2f} cores"
        gov = self.governor or "not exposed"
        flag = " (LOADED: other work ran beside the measurement)" if self.loaded else ""
        return (f"{self.cpus} CPUs, governor {gov}, load {self.load_before}->{self.load_after}, other processes "
                f"{other} over {self.seconds:.1f} s{flag}")


class Window:
    """``with Window() as w: measure()`` then ``w.conditions``: the host's conditions over the block."""

    def __enter__(self) -> "Window":
        self._t0 = time.monotonic()
        self._busy0 = _busy_jiffies()
        self._own0 = _own_cpu_s()
        self._load0 = _load()
        return self

    def __exit__(self, *exc) -> bool:
        seconds = max(time.monotonic() - self._t0, 1e-9)
        busy1, own1 = _busy_jiffies(), _own_cpu_s()
        others = None
        if self._busy0 is not None and busy1 is not None:
            hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
            total_s = (busy1 - self._busy0) / hz
            others = max(0.0, total_s - (own1 - self._own0)) / seconds
        self.conditions = Conditions(cpus=cpu_count(), governor=governor(), load_before=self._load0,
                                     load_after=_load(), others_cpu=None if others is None else round(others, 3),
                                     seconds=round(seconds, 3),
                                     loaded=others is not None and others > LOADED_OTHERS_CPU)
        return False


def _own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _load() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None
