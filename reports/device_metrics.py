"""The device measurements of a trial as they land in its MLflow run: the one place that knows their names.

Metrics, per device ``<d>`` (the pool's device name, e.g. ``host``, ``pixel8-1``):

* ``device/<d>/prefill_ms``: median prefill latency in milliseconds, with its bootstrap confidence
  interval ``device/<d>/prefill_ms_ci_low`` and ``device/<d>/prefill_ms_ci_high``;
* ``device/<d>/decode_tok_s``: decode tokens per second;
* ``device/<d>/energy_mj_per_tok``: energy per generated token in millijoules.

Tags ``device/<d>/model``, ``/soc``, ``/os_build``, ``/runtime`` identify the device, and
``device/<d>/latency_meaningful`` is ``"false"`` for a device whose times are not latency (the QNN HTP
emulator runs the NPU's arithmetic at emulation speed): reports never tabulate or plot those times.

farm's device stage (``farm/orchestrate/device_metrics.py``) also logs ``..._p90``, the decode interval, ``power_mw`` and
the tags ``name``, ``kind``, ``runtime_version``, ``error`` (the target could not be measured); the
report shows the version beside the runtime and the error in the device table.

A measurement session (every model of a device timed together, interleaved) adds the time ratios to the
model's FP32 and W8A16 baselines, ``device/<d>/<graph>_ratio_<baseline>`` with ``_ci_low`` / ``_ci_high``
(graph prefill, decode or energy; below 1: faster), and the tags ``same_graph`` (the trials whose exports
run the same ops), ``session``, ``conditions`` (how it was measured, in words) and ``loaded`` ("true":
other work ran beside it). Other keys under ``device/`` are ignored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

# the names farm writes (farm.core.vocab, the one farm module a report imports: docs/architecture.md)
from farm.core.vocab import (BASELINES, CI_HIGH, CI_LOW, CONDITIONS, DECODE_CI_HIGH, DECODE_CI_LOW, DECODE_TOK_S, DEVICE_PREFIX, ENERGY_MJ_PER_TOK,
                             ERROR, IDENTITY_TAGS, LATENCY_MEANINGFUL, LOADED, PREFILL_CI_HIGH, PREFILL_CI_LOW,
                             PREFILL_MS, RATIO_GRAPHS, SAME_GRAPH, SESSION, device_key)

PREFIX = DEVICE_PREFIX
METRICS = (PREFILL_MS, PREFILL_CI_LOW, PREFILL_CI_HIGH, DECODE_TOK_S, DECODE_CI_LOW, DECODE_CI_HIGH,
           ENERGY_MJ_PER_TOK)  # the ones shown

# the device name may hold "/" or ":" ("aihub:Galaxy S24"), so the known suffix anchors the split
_METRIC = re.compile(rf"^{re.escape(PREFIX)}(?P<device>.+)/(?P<name>{'|'.join(METRICS)})$")
_TAG = re.compile(rf"^{re.escape(PREFIX)}(?P<device>.+)/(?P<name>{'|'.join(IDENTITY_TAGS + (LATENCY_MEANINGFUL, ERROR))})$")
_RATIO = re.compile(rf"^{re.escape(PREFIX)}(?P<device>.+)/(?P<graph>{'|'.join(RATIO_GRAPHS)})_ratio_"
                    rf"(?P<base>{'|'.join(BASELINES)})(?:_(?P<part>{CI_LOW}|{CI_HIGH}))?$")
_SESSION_TAG = re.compile(rf"^{re.escape(PREFIX)}(?P<device>.+)/(?P<name>{SAME_GRAPH}|{SESSION}|{CONDITIONS}|{LOADED})$")


class Interval(float):
    """A measured value (a median, or a median ratio) that carries its confidence interval: it sorts and
    formats as the number, and ``overlaps`` says whether two such values can be told apart."""

    def __new__(cls, value: float, low: float | None = None, high: float | None = None, is_ratio: bool = False):
        obj = super().__new__(cls, value)
        obj.low = float(value) if low is None else float(low)
        obj.high = float(value) if high is None else float(high)
        obj.is_ratio = is_ratio  # a ratio to a baseline: an interval that holds 1 is "no difference"
        return obj

    def overlaps(self, other) -> bool:
        lo, hi = (other.low, other.high) if isinstance(other, Interval) else (float(other), float(other))
        return self.low <= hi and lo <= self.high

    @property
    def holds_one(self) -> bool:
        return self.low <= 1.0 <= self.high


def metric_key(device: str, name: str) -> str:
    """The MLflow metric (or tag) key of ``name`` on ``device``."""
    return device_key(device, name)


@dataclass
class DeviceResult:
    """One trial's numbers on one device (``None``: not measured)."""
    device: str
    prefill_ms: float | None = None
    prefill_ci_low: float | None = None
    prefill_ci_high: float | None = None
    decode_tok_s: float | None = None
    decode_ci_low: float | None = None
    decode_ci_high: float | None = None
    energy_mj_per_tok: float | None = None
    latency_meaningful: bool = True
    identity: dict = field(default_factory=dict)  # IDENTITY_TAGS that were tagged
    error: str = ""  # why the device stage could not measure this target
    ratios: dict = field(default_factory=dict)  # (graph, baseline) -> Interval: time ratio to the baseline
    same_graph: list = field(default_factory=list)  # short ids of the trials whose exports run the same ops
    session: str = ""  # the measurement session (one key: timed together)
    conditions: str = ""  # how it was measured, in words
    loaded: bool = False  # other work ran beside the measurement

    @property
    def prefill(self) -> Interval | float | None:
        """The median prefill latency with its interval."""
        if self.prefill_ms is None or self.prefill_ci_low is None or self.prefill_ci_high is None:
            return self.prefill_ms  # no interval recorded: the bare median
        return Interval(self.prefill_ms, self.prefill_ci_low, self.prefill_ci_high)

    @property
    def decode(self) -> Interval | float | None:
        """Decode tokens/s with its interval."""
        if self.decode_tok_s is None or self.decode_ci_low is None or self.decode_ci_high is None:
            return self.decode_tok_s
        return Interval(self.decode_tok_s, self.decode_ci_low, self.decode_ci_high)


_FIELD = {PREFILL_MS: "prefill_ms", PREFILL_CI_LOW: "prefill_ci_low", PREFILL_CI_HIGH: "prefill_ci_high",
          DECODE_TOK_S: "decode_tok_s", DECODE_CI_LOW: "decode_ci_low", DECODE_CI_HIGH: "decode_ci_high",
          ENERGY_MJ_PER_TOK: "energy_mj_per_tok"}


def device_results(metrics: dict, tags: dict) -> dict[str, DeviceResult]:
    """The per-device results in one run's ``metrics`` and ``tags``, by device name."""
    out: dict[str, DeviceResult] = {}
    parts: dict = {}  # (device, graph, base) -> {"": value, ci_low: .., ci_high: ..}
    for k, v in metrics.items():
        m = _METRIC.match(k)
        if m:
            r = out.setdefault(m["device"], DeviceResult(m["device"]))
            setattr(r, _FIELD[m["name"]], float(v))
            continue
        m = _RATIO.match(k)
        if m:
            parts.setdefault((m["device"], m["graph"], m["base"]), {})[m["part"] or ""] = float(v)
    for (device, graph, base), p in parts.items():
        if "" in p:
            r = out.setdefault(device, DeviceResult(device))
            r.ratios[(graph, base)] = Interval(p[""], p.get(CI_LOW), p.get(CI_HIGH), is_ratio=True)
    for k, v in tags.items():
        m = _SESSION_TAG.match(k)
        if m:
            r = out.setdefault(m["device"], DeviceResult(m["device"]))
            if m["name"] == SAME_GRAPH:
                r.same_graph = [x for x in str(v).split(",") if x]
            elif m["name"] == SESSION:
                r.session = str(v)
            elif m["name"] == CONDITIONS:
                r.conditions = str(v)
            else:
                r.loaded = str(v).strip().lower() == "true"
    for k, v in tags.items():
        m = _TAG.match(k)
        if not m:
            continue
        r = out.setdefault(m["device"], DeviceResult(m["device"]))
        if m["name"] == LATENCY_MEANINGFUL:
            r.latency_meaningful = str(v).strip().lower() not in ("false", "0", "no")
        elif m["name"] == ERROR:
            r.error = str(v)
        else:
            r.identity[m["name"]] = str(v)
    return out


def is_device_key(key: str) -> bool:
    return key.startswith(PREFIX)
