"""Checks of stored encodings before they reach a model: a file edited by hand or damaged on disk is refused
with the quantizer named, instead of being evaluated, exported and compiled.

Each entry of an artifact's ``encodings.json`` (written by ``quant.artifact.encodings_of``) must hold

* ``bitwidth``, ``symmetric``, ``per_channel``: exactly the quantizer's spec under the scheme (a changed
  bitwidth would otherwise be ignored, since the simulation takes its bits from the scheme);
* ``scale``: finite and positive, one value per tensor or one per output channel;
* ``offset``: integers in ``[qmin, qmax]`` of that bitwidth (our convention ``q = round(x / scale) + offset``;
  0 for a symmetric encoding);
* ``aimet_offset``, ``min``, ``max`` where present: the values those two imply, since deployment tools read
  them (``min = (qmin - offset) * scale``, ``max = (qmax - offset) * scale``).
"""

from __future__ import annotations

import numpy as np

from .quantizer import QSpec

# min/max are float32 products written as decimals; recomputed in float64 they agree to ~1e-7 relative
_DERIVED_RTOL = 1e-5


class EncodingError(ValueError):
    """A stored encoding is malformed or inconsistent; the message names the file and the quantizer."""


def _numbers(value, field: str, where: str) -> np.ndarray:
    items = value if isinstance(value, list) else [value]
    if not items or not set(map(type, items)) <= {int, float}:  # bool, str, None, nested lists refused
        raise EncodingError(f"{where}: {field!r} is not a number or a flat list of numbers")
    return np.asarray(items, dtype=np.float64)


def check_entry(name: str, entry, spec: QSpec, channels: int | None = None,
                source: str = "encodings") -> tuple[np.ndarray, np.ndarray]:
    """Validate one quantizer's entry against its spec; returns ``(scale, offset)`` as float arrays.
    ``channels``: the output channels of a per-channel weight, when known."""
    where = f"{source}: quantizer {name}"
    if not isinstance(entry, dict):
        raise EncodingError(f"{where}: entry is {type(entry).__name__}, not an object")
    for key in ("bitwidth", "symmetric", "per_channel", "scale", "offset"):
        if key not in entry:
            raise EncodingError(f"{where}: no {key!r} key")
    bits = entry["bitwidth"]
    if isinstance(bits, bool) or not isinstance(bits, int) or bits != spec.bits:
        raise EncodingError(f"{where}: bitwidth {bits!r} does not match its scheme, which quantizes it to "
                            f"{spec.bits} bits")
    for key in ("symmetric", "per_channel"):
        if entry[key] is not getattr(spec, key):
            raise EncodingError(f"{where}: {key} {entry[key]!r} does not match its scheme ({getattr(spec, key)})")
    scale = _numbers(entry["scale"], "scale", where)
    offset = _numbers(entry["offset"], "offset", where)
    bad = np.flatnonzero(~np.isfinite(scale) | (scale <= 0))
    if bad.size:
        i = int(bad[0])
        raise EncodingError(f"{where}: scale {float(scale[i])!r}{f' (channel {i})' if scale.size > 1 else ''} is not a "
                            "finite positive number")
    if spec.per_channel:
        if channels is not None and scale.size != channels:
            raise EncodingError(f"{where}: {scale.size} scales for {channels} output channels")
    elif scale.size != 1:
        raise EncodingError(f"{where}: {scale.size} scales for a per-tensor encoding (one expected)")
    if offset.size not in (1, scale.size):
        raise EncodingError(f"{where}: {offset.size} offsets for {scale.size} scales")
    qmin, qmax = spec.qmin, spec.qmax
    bad = np.flatnonzero(~np.isfinite(offset) | (offset != np.round(offset)) | (offset < qmin) | (offset > qmax))
    if bad.size:
        i = int(bad[0])
        raise EncodingError(f"{where}: offset {float(offset[i])!r} is not an integer in [{qmin}, {qmax}], the range of "
                            f"{'signed' if spec.symmetric else 'unsigned'} {spec.bits}-bit codes")
    if spec.symmetric and np.any(offset != 0):
        raise EncodingError(f"{where}: a symmetric encoding has offset 0, this one has {float(offset[offset != 0][0])!r}")
    offset = np.broadcast_to(offset, scale.shape)
    derived = {"aimet_offset": -offset, "min": (qmin - offset) * scale, "max": (qmax - offset) * scale}
    atol = 1e-6 * float(scale.max())  # a code's millionth: far below anything an edit would mean
    for key, want in derived.items():
        if key not in entry:
            continue
        got = _numbers(entry[key], key, where)
        if got.size != want.size:
            raise EncodingError(f"{where}: {got.size} {key} values for {want.size} scales")
        off = np.flatnonzero(~(np.abs(got - want) <= atol + _DERIVED_RTOL * np.abs(want)))
        if off.size:
            i = int(off[0])
            raise EncodingError(f"{where}: {key} {float(got[i])!r} is not what its scale and offset imply "
                                f"({float(want[i])!r}): the file was edited or damaged")
    return scale, offset


def check_file(enc, source: str = "encodings") -> dict:
    """The entries of an artifact's encodings by quantizer name, after checking the file's shape."""
    if not isinstance(enc, dict):
        raise EncodingError(f"{source}: not an object with activation_encodings and param_encodings")
    out = {}
    for kind in ("activation_encodings", "param_encodings"):
        table = enc.get(kind)
        if not isinstance(table, dict):
            raise EncodingError(f"{source}: no {kind!r} table")
        out.update(table)
    return out

