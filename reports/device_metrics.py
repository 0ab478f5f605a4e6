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
report shows the version beside the runtime and the error in the device table. Other keys under
``device/`` are ignored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

# the names farm writes (farm.core.vocab, the one farm module a report imports: docs/architecture.md)
from farm.core.vocab import (DECODE_TOK_S, DEVICE_PREFIX, ENERGY_MJ_PER_TOK, ERROR, IDENTITY_TAGS,
                             LATENCY_MEANINGFUL, PREFILL_CI_HIGH, PREFILL_CI_LOW, PREFILL_MS, device_key)

PREFIX = DEVICE_PREFIX
METRICS = (PREFILL_MS, PREFILL_CI_LOW, PREFILL_CI_HIGH, DECODE_TOK_S, ENERGY_MJ_PER_TOK)  # the ones shown

# the device name may hold "/" or ":" ("aihub:Galaxy S24"), so the known suffix anchors the split
_METRIC = re.compile(rf"^{re.escape(PREFIX)}(?P<device>.+)/(?P<name>{'|'.join(METRICS)})$")
_TAG = re.compile(rf"^{re.escape(PREFIX)}(?P<device>.+)/(?P<name>{'|'.join(IDENTITY_TAGS + (LATENCY_MEANINGFUL, ERROR))})$")


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
    energy_mj_per_tok: float | None = None
    latency_meaningful: bool = True
    identity: dict = field(default_factory=dict)  # IDENTITY_TAGS that were tagged
    error: str = ""  # why the device stage could not measure this target


_FIELD = {PREFILL_MS: "prefill_ms", PREFILL_CI_LOW: "prefill_ci_low", PREFILL_CI_HIGH: "prefill_ci_high",
          DECODE_TOK_S: "decode_tok_s", ENERGY_MJ_PER_TOK: "energy_mj_per_tok"}


def device_results(metrics: dict, tags: dict) -> dict[str, DeviceResult]:
    """The per-device results in one run's ``metrics`` and ``tags``, by device name."""
    out: dict[str, DeviceResult] = {}
    for k, v in metrics.items():
        m = _METRIC.match(k)
        if m:
            r = out.setdefault(m["device"], DeviceResult(m["device"]))
            setattr(r, _FIELD[m["name"]], float(v))
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
