"""Files the library writes and reads back: JSON that names its file on error, sha256 manifests of a
folder, and file modes that follow the user's umask.

A manifest is ``{"version": 1, "files": {relative path: {"bytes": n, "sha256": hex}}}`` over every file of
a folder but itself. Every check compares every file's size, and the sha256 of every file under
``SMALL_FILE_BYTES`` (encodings, recipe, config, tokenizer: milliseconds), so a same-size edit of a scale
is caught by every load; hashing the large files too (the weights) is the full check, run when asked for
or for every load when ``MQFARM_VERIFY=full`` is set, the same switch as for the embedded models' cache
(``quant.zoo``).

A folder is written whole (:func:`atomic_folder`): into a hidden sibling, then swapped into place, and an
existing folder is replaced only when this tool wrote it (:func:`check_replaceable`).
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path

MANIFEST_VERSION = 1
SMALL_FILE_BYTES = 64 << 20  # hashed on every check: all but the weights
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


# ---------------------------------------------------------------- writing a folder whole

# A folder the tool may replace carries one of these, in the tool's own format: anything else at --out is
# the user's, and --overwrite must never delete it.
OWN_MARKERS = ("manifest.json", "export.json", "compile.json")


def _is_ours(folder: Path) -> str | None:
    """The marker file that shows ``folder`` was written by this tool, or None."""
    for marker in OWN_MARKERS:
        p = folder / marker
        if not p.is_file() or p.is_symlink():
            continue
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue
        if not isinstance(data, dict):
            continue
        if marker == "manifest.json" and data.get("version") == MANIFEST_VERSION and isinstance(data.get("files"), dict):
            return marker
        if marker == "export.json" and str(data.get("exporter", "")).startswith("mqfarm"):
            return marker
        if marker == "compile.json" and "target" in data:
            return marker
    return None


def _writable_parent(out: Path, what: str) -> None:
    """Refuse an ``out`` whose nearest existing ancestor is a file or cannot be written in."""
    parent = out.parent
    while not parent.exists() and not parent.is_symlink() and parent != parent.parent:
        parent = parent.parent
    if parent.is_symlink() and not parent.exists():
        raise FileCheckError(f"{what} {out} is under {parent}, a symbolic link to nothing")
    if not parent.is_dir():
        raise FileCheckError(f"{what} {out} is under {parent}, which is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise FileCheckError(f"{what} {out} cannot be written: no write permission in {parent}")


def check_replaceable(out: str | Path, overwrite: bool, what: str = "output folder") -> None:
    """Refuse, before any work, an ``out`` that the tool may not (re)write: a symbolic link, a file, a folder
    that exists without ``overwrite``, a folder that is not empty and was not written by this tool (no
    manifest, ``export.json`` or ``compile.json`` of ours: a user's folder is never deleted), or one under a file or
    in a folder without write permission. Raises FileCheckError naming the path."""
    out = Path(out)
    if out.is_symlink():
        raise FileCheckError(f"{what} {out} is a symbolic link; give the folder it points to, or another path")
    if out.exists():
        if not out.is_dir():
            raise FileCheckError(f"{what} {out} is a file, not a folder; give another path")
        if not overwrite:
            raise FileCheckError(f"{what} {out} already exists; pass --overwrite to replace it")
        if _is_ours(out) is None and any(out.iterdir()):
            raise FileCheckError(f"{what} {out} exists and was not written by this tool (no {', '.join(OWN_MARKERS)} "
                                 "of ours in it): refusing to replace it even with --overwrite; move it away or "
                                 "give another path")
        if not os.access(out.parent, os.W_OK | os.X_OK):
            raise FileCheckError(f"{what} {out} cannot be replaced: no write permission in {out.parent}")
        return
    _writable_parent(out, what)


_RENAME_EXCHANGE = 2  # linux/fs.h


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where the system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd = -100
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


@contextmanager
def _sigint_deferred():
    """Hold Ctrl-C for the few system calls of a swap, then raise it: the swap itself is never cut in half.
    Only the main thread can install a handler; elsewhere the swap relies on its own roll-back."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    try:
        previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    except (ValueError, OSError):
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Put the finished ``tmp`` at ``out``; an existing ``out`` is swapped out whole and only then removed.
    At every instant ``out`` is the old folder or the new one, each complete (a kill between the two renames
    of the fallback leaves the old one whole at its hidden ``.old-`` name)."""
    if not out.exists():
        tmp.rename(out)
        return
    if _exchange(tmp, out):
        shutil.rmtree(tmp, ignore_errors=True)  # now the old folder
        return
    old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
    old.rmdir()
    out.rename(old)
    try:
        tmp.rename(out)
    except BaseException:
        old.rename(out)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_folder(out: str | Path, what: str = "output folder"):
    """Write a folder all at once: yields a temporary sibling to fill; on success it gets the umask's modes
    and takes the place of ``out``, on any error (Ctrl-C included) it is removed and ``out`` is untouched.

    ``out`` may already exist only as a folder this tool wrote (:func:`check_replaceable`, also the
    caller's check before any work, where the caller decides whether overwriting was asked for). An
    existing folder is replaced by swapping, so either the old or the new folder is whole at every instant."""
    out = Path(out)
    check_replaceable(out, overwrite=True, what=what)
    tmp = None
    try:
        # Ctrl-C between mkdtemp's return and the assignment would leave the temporary folder behind
        with _sigint_deferred():
            try:
                out.parent.mkdir(parents=True, exist_ok=True)
                tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
            except OSError as e:
                raise FileCheckError(f"{what} {out} cannot be written: {e.strerror or e} "
                                     f"({e.filename or out.parent})") from None
        yield tmp
        apply_umask(tmp)
        with _sigint_deferred():
            check_replaceable(out, overwrite=True, what=what)  # nothing else appeared there meanwhile
            _swap_into_place(tmp, out)
    except BaseException:
        if tmp is not None:
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
    """Check ``folder`` against its manifest: every listed file present with its size, the sha256 of those
    under ``SMALL_FILE_BYTES`` always, and with ``full`` (default: ``MQFARM_VERIFY=full``) of all of them. Files added later (an export subfolder, notes) are not
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
        if (full or size < SMALL_FILE_BYTES) and sha256_file(p) != want["sha256"]:
            raise FileCheckError(f"{p} does not match the sha256 in {folder / name}: its content was changed "
                                 "after it was written")
        total += size
    unlisted = [rel for rel in _files(folder, name) if rel not in listed]
    return {"files": len(listed), "bytes": total, "full": full, "unlisted": unlisted}
