"""The one timing path for onnxruntime on a CPU: the host backend and ``bench/host_latency.py`` both time
with :func:`time_runs` on a session from :func:`cpu_session`, so their numbers are comparable.

Why pinned: on a shared machine the scheduler migrates a benchmark between cores and intra-op thread
pools spin against other work; one intra-op thread on a fixed core gave the stablest timings here
(two threads made int8 slower and added spikes on this project's 2-core machine). Pinning uses ``os.sched_setaffinity`` where the
platform and the container allow it, and says which cores it got (an empty list: not pinned).
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable


def time_runs(run: Callable[[], object], warmup: int, repeats: int) -> list[float]:
    """Call ``run`` ``warmup`` times untimed, then ``repeats`` times, each timed with ``perf_counter_ns``
    around the call alone; returns the repeats' wall times in milliseconds, in run order."""
    if warmup < 0 or repeats < 1:
        raise ValueError(f"need warmup >= 0 and repeats >= 1, got warmup={warmup}, repeats={repeats}")
    for _ in range(warmup):
        run()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter_ns()
        run()
        out.append((time.perf_counter_ns() - t0) / 1e6)
    return out


def allowed_cores() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS, Windows: no affinity API
        return []


def pin_cores(n: int) -> list[int]:
    """Pin this process to the first ``n`` cores it may use; returns them ([] where pinning is refused)."""
    cores = allowed_cores()[:max(1, n)]
    if not cores:
        return []
    try:
        os.sched_setaffinity(0, cores)
    except OSError:  # a container or a policy that forbids it: run unpinned and say so
        return []
    return cores


@contextmanager
def pinned(n: int):
    """:func:`pin_cores` for the duration of a block; the previous affinity comes back afterwards (a
    long-lived process, such as a Ray worker, must not stay on one core after a benchmark)."""
    before = allowed_cores()
    cores = pin_cores(n)
    try:
        yield cores
    finally:
        if cores and before:
            try:
                os.sched_setaffinity(0, before)
            except OSError:
                pass


def cpu_session_options(threads: int = 1):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = max(1, int(threads))
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3  # errors only: warnings would drown the benchmark's own output
    return so


def cpu_session(model: str | Path, threads: int = 1, pin: bool = True):
    """An onnxruntime CPU session with ``threads`` intra-op threads, one inter-op thread and sequential
    execution; with ``pin`` the process is first pinned to the first ``threads`` cores (kept pinned:
    use :func:`pinned` around the timing instead where the process lives on). Returns (session, cores)."""
    import onnxruntime as ort

    cores = pin_cores(threads) if pin else []
    sess = ort.InferenceSession(str(model), cpu_session_options(threads), providers=["CPUExecutionProvider"])
    return sess, cores
