"""Checks of an export folder's files before anything runs or compiles them: a damaged or hand-edited export is
refused with the file and the tensor named, instead of being benchmarked and compiled.

* ``export.json``'s ``files`` table (bytes and sha256 of every graph and encodings file, written by the
  exporter): every listed file present with its size (a truncated ``prefill.onnx`` would otherwise fail deep
  inside onnxruntime), and the sha256 of the small ones (the encodings);
* every AIMET entry of ``<graph>.encodings``: an integer bitwidth, a finite positive ``scale``, an integer
  ``offset`` on AIMET's grid (``offset = -zero_point``: ``[-(2^b - 1), 0]`` unsigned; a symmetric entry's
  ``0`` or ``-2^(b-1)``), and ``min``/``max`` where present equal to ``offset * scale`` and
  ``min + (2^b - 1) * scale``: the values the QNN converter reads as quantization overrides;
* the uint8 cache encodings in ``export.json`` (``kv_encoding``, each cache input/output): finite positive
  scale, integer offset.

Pure functions over JSON and file sizes; a missing encodings file is left to the consumer that needs it.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

SMALL_FILE_BYTES = 64 << 20  # hashed on every read: the encodings; the graphs' weights are sized only
_RTOL = 1e-5


class ExportCheckError(ValueError):
    """An export's file or encoding is damaged or inconsistent; the message names the file and the tensor."""


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def sha256_file(path: Path) -> str:
    """A file's sha256, read in 4 MiB chunks (exports and context binaries reach gigabytes)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def check_listed_files(root: Path, index: dict) -> None:
    listed = index.get("files")
    if not isinstance(listed, dict):
        return  # exports from before the table: nothing to compare with
    for rel, want in sorted(listed.items()):
        p = root / rel
        if not p.is_file():
            raise ExportCheckError(f"{p} is missing (listed in {root / 'export.json'})")
        if not isinstance(want, dict):
            continue
        size = p.stat().st_size
        if _number(want.get("bytes")) and size != want["bytes"]:
            raise ExportCheckError(f"{p} has {size} bytes, export.json says {want['bytes']}: the file was changed "
                                   "or truncated after it was exported")
        if size < SMALL_FILE_BYTES and isinstance(want.get("sha256"), str) and sha256_file(p) != want["sha256"]:
            raise ExportCheckError(f"{p} does not match the sha256 in {root / 'export.json'}: its content was "
                                   "changed after it was exported")


def check_aimet_entry(where: str, e) -> None:
    """One AIMET encoding entry (a dict of one channel or one tensor)."""
    if not isinstance(e, dict):
        raise ExportCheckError(f"{where}: entry is {type(e).__name__}, not an object")
    if e.get("dtype") == "float":
        return  # a float override carries no grid
    for key in ("bitwidth", "scale", "offset"):
        if key not in e:
            raise ExportCheckError(f"{where}: no {key!r} key")
    bits = e["bitwidth"]
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 32:
        raise ExportCheckError(f"{where}: bitwidth {bits!r} is not an integer number of bits")
    scale, offset = e["scale"], e["offset"]
    if not _number(scale) or not math.isfinite(scale) or scale <= 0:
        raise ExportCheckError(f"{where}: scale {scale!r} is not a finite positive number")
    if not _number(offset) or not math.isfinite(offset) or offset != round(offset):
        raise ExportCheckError(f"{where}: offset {offset!r} is not an integer")
    symmetric = str(e.get("is_symmetric", "False")) == "True"
    allowed = (0, -(2 ** (bits - 1))) if symmetric else None
    if (allowed is not None and offset not in allowed) or (allowed is None and not -(2 ** bits - 1) <= offset <= 0):
        grid = f"0 or {-(2 ** (bits - 1))}" if symmetric else f"[{-(2 ** bits - 1)}, 0]"
        raise ExportCheckError(f"{where}: offset {offset!r} is outside AIMET's {bits}-bit "
                               f"{'symmetric' if symmetric else 'unsigned'} grid ({grid}, offset = -zero point)")
    want = {"min": offset * scale}
    want["max"] = want["min"] + (2 ** bits - 1) * scale
    for key, value in want.items():
        if key in e:
            got = e[key]
            if not _number(got) or not math.isclose(got, value, rel_tol=_RTOL, abs_tol=1e-6 * scale):
                raise ExportCheckError(f"{where}: {key} {got!r} is not what its scale and offset imply ({value!r}): "
                                       "the file was edited or damaged")


def check_aimet_file(path: Path) -> None:
    try:
        enc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise ExportCheckError(f"{path} cannot be read: {e}") from None
    except json.JSONDecodeError as e:
        raise ExportCheckError(f"{path} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    if not isinstance(enc, dict):
        raise ExportCheckError(f"{path} is not in AIMET format (not an object)")
    for kind in ("activation_encodings", "param_encodings"):
        table = enc.get(kind, {})
        if not isinstance(table, dict):
            raise ExportCheckError(f"{path}: {kind!r} is not a table")
        for tensor, entries in table.items():
            entries = entries if isinstance(entries, list) else [entries]
            if not entries:
                raise ExportCheckError(f"{path}: tensor {tensor}: no encoding entries")
            for i, e in enumerate(entries):
                check_aimet_entry(f"{path}: tensor {tensor}" + (f" (channel {i})" if len(entries) > 1 else ""), e)


def check_cache_encoding(where: str, e) -> None:
    if not isinstance(e, dict):
        raise ExportCheckError(f"{where}: not an object")
    scale, offset = e.get("scale"), e.get("offset")
    if not _number(scale) or not math.isfinite(scale) or scale <= 0:
        raise ExportCheckError(f"{where}: scale {scale!r} is not a finite positive number")
    if not _number(offset) or not math.isfinite(offset) or offset != round(offset) or abs(offset) > 2 ** 16:
        raise ExportCheckError(f"{where}: offset {offset!r} is not an integer zero point")


def check_export(root: Path, index: dict) -> None:
    """Everything above for the export at ``root`` with its parsed ``export.json``."""
    root = Path(root)
    check_listed_files(root, index)
    index_path = root / "export.json"
    kv = index.get("kv_encoding")
    if isinstance(kv, dict):
        for name, e in kv.items():
            check_cache_encoding(f"{index_path}: kv_encoding {name}", e)
    graphs = index.get("graphs")
    if not isinstance(graphs, dict):
        raise ExportCheckError(f"{index_path}: no 'graphs' table")
    for gname, g in graphs.items():
        if not isinstance(g, dict):
            raise ExportCheckError(f"{index_path}: graph {gname!r} is not an object")
        for io in ("inputs", "outputs"):
            for spec in g.get(io, []) or []:
                if isinstance(spec, dict) and "encoding" in spec:
                    check_cache_encoding(f"{index_path}: {gname} {io[:-1]} {spec.get('name')}", spec["encoding"])
        enc = g.get("encodings")
        if isinstance(enc, str) and (root / enc).is_file():
            check_aimet_file(root / enc)
