"""Files the library writes and reads back: JSON that names its file on error, sha256 manifests of a
folder, and file modes that follow the user's umask.

A manifest is ``{"version": 1, "files": {relative path: {"bytes": n, "sha256": hex}}}`` over every file of
a folder but itself. Checking it costs a ``stat`` per file (sizes, always done) or a full read (hashes):
the full check runs when asked for, or for every load when ``MQFARM_VERIFY=full`` is set, the same switch
as for the embedded models' cache (``quant.zoo``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

MANIFEST_VERSION = 1
VERIFY_ENV = "MQFARM_VERIFY"


class FileCheckError(ValueError):
    """A file is unreadable, malformed, missing or not what its manifest says; the message names it."""


def full_check_requested() -> bool:
    """True when ``MQFARM_VERIFY=full``: every load then hashes whole files instead of checking sizes."""
    return os.environ.get(VERIFY_ENV, "").strip().lower() == "full"


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def read_json(path: str | Path, what: str = "file"):
    """Parse a JSON file; a missing, unreadable or malformed file raises FileCheckError naming it."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileCheckError(f"{what} {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise FileCheckError(f"{what} {path} cannot be read: {e}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise FileCheckError(f"{what} {path} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") \
            from None


# ---------------------------------------------------------------- modes

def umask() -> int:
    """The process umask, read without changing it (os.umask can only read by setting, which races
    with other threads creating files)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def apply_umask(root: str | Path) -> None:
    """Give ``root`` and everything under it the modes a plain ``mkdir``/``open`` would have given.

    ``tempfile.mkdtemp`` makes 0700 folders (and some writers 0600 files); results written through a
    temporary folder would otherwise be unreadable by the other users of a shared machine whatever
    their umask allows."""
    mask = umask()
    root = Path(root)
    os.chmod(root, 0o777 & ~mask)
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            os.chmod(os.path.join(dirpath, d), 0o777 & ~mask)
        for f in filenames:
            p = os.path.join(dirpath, f)
            if not os.path.islink(p):
                os.chmod(p, 0o666 & ~mask)


@contextmanager
def atomic_folder(out: str | Path):
    """Write a folder all at once: yields a temporary sibling to fill; on success it gets the umask's modes
    and is renamed to ``out`` (replacing it), on any error it is removed, so ``out`` is never half-written.
    Whether ``out`` may be replaced is the caller's check, made before any work."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        yield tmp
        apply_umask(tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---------------------------------------------------------------- manifests

def _files(folder: Path, skip: str) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for f in sorted(filenames):
            rel = os.path.relpath(os.path.join(dirpath, f), folder)
            if rel != skip:
                out.append(rel)
    return out


def write_manifest(folder: str | Path, name: str) -> dict:
    """Hash every file under ``folder`` (but the manifest) and write the manifest as ``folder/name``."""
    folder = Path(folder)
    files = {rel: {"bytes": (folder / rel).stat().st_size, "sha256": sha256_file(folder / rel)}
             for rel in _files(folder, name)}
    manifest = {"version": MANIFEST_VERSION, "files": files}
    (folder / name).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return manifest


def check_manifest(folder: str | Path, name: str, full: bool | None = None) -> dict:
    """Check ``folder`` against its manifest: every listed file present with its size, and with ``full``
    (default: ``MQFARM_VERIFY=full``) its sha256. Files added later (an export subfolder, notes) are not
    part of the identity: they are returned under ``unlisted``, not refused. Returns ``{"files": n,
    "bytes": total, "full": bool, "unlisted": [relative paths]}``; raises FileCheckError naming the first
    file at fault."""
    folder = Path(folder)
    full = full_check_requested() if full is None else full
    manifest = read_json(folder / name, "manifest")
    listed = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(listed, dict):
        raise FileCheckError(f"manifest {folder / name} has no 'files' table")
    total = 0
    for rel, want in sorted(listed.items()):
        p = folder / rel
        if not p.is_file():
            raise FileCheckError(f"{p} is missing (listed in {folder / name})")
        size = p.stat().st_size
        if size != want["bytes"]:
            raise FileCheckError(f"{p} has {size} bytes, its manifest says {want['bytes']}: the file was "
                                 "changed or truncated after it was written")
        if full and sha256_file(p) != want["sha256"]:
            raise FileCheckError(f"{p} does not match the sha256 in {folder / name}: its content was changed "
                                 "after it was written")
        total += size
    unlisted = [rel for rel in _files(folder, name) if rel not in listed]
    return {"files": len(listed), "bytes": total, "full": full, "unlisted": unlisted}
