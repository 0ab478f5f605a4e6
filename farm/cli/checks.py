"""Checks the command line makes before it touches a tracking store, a port or the machine's CPUs, so that a
wrong address or an impossible number is one line naming the flag instead of a hang, a traceback or a
file created where nothing should be written.

* a tracking URI has a scheme MLflow stores use; an http(s) server must accept a TCP connection within a
  few seconds (``http://127.0.0.1:9/`` otherwise hangs for minutes in MLflow's retries), and a read-only
  command gives a server that accepts but does not answer 5 s a request, no retries (a sweep keeps
  MLflow's retries: it logs for hours);
* a read-only command (status, report, gc) never creates a store: a sqlite file or a file-store
  folder that does not exist is refused, not made;
* ``farm ui``'s host must resolve and its port be free before the server starts;
* thread counts are at most the CPUs this process may run on.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlsplit

from .errors import UsageError

STORE_SCHEMES = ("sqlite", "file", "http", "https", "postgresql", "mysql", "mssql", "databricks", "databricks-uc",
                 "uc")
CONNECT_TIMEOUT_S = 3.0
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def local_store_path(uri: str) -> Path | None:
    """The file (sqlite) or folder (file store) of a local tracking URI; None for a server or in-memory."""
    if uri.startswith("sqlite:"):
        rest = uri[len("sqlite:"):]
        if not rest.startswith("///"):
            return None  # sqlite:// is in memory
        return Path(rest[3:]) if rest[3:] else None
    if uri.startswith("file:"):
        return Path(urlsplit(uri).path)
    if "://" not in uri:
        return Path(uri)
    return None


def check_store(uri: str, *, read_only: bool, flag: str = "--tracking-uri") -> None:
    """Refuse a tracking URI MLflow cannot use, a server that does not answer, or (``read_only``) a local
    store that does not exist yet."""
    if "://" in uri or uri.startswith(("sqlite:", "file:")):
        scheme = uri.split(":", 1)[0].lower()
        if scheme.split("+", 1)[0] not in STORE_SCHEMES:
            raise UsageError(f"{flag} {uri!r}: {scheme!r} is not a tracking store scheme; use sqlite:///FILE, "
                             "file:///FOLDER, http(s)://HOST:PORT or a database URL (postgresql://, mysql://)")
        if scheme in ("http", "https"):
            _check_server(uri, flag)
            if read_only:  # a server that accepts but does not reply: MLflow's defaults retry for minutes
                os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
                os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    if read_only:
        path = local_store_path(uri)
        if path is not None and not path.exists():
            raise UsageError(f"no MLflow store at {path}: nothing has been tracked there yet (a read-only command "
                             "does not create one; run `farm sweep FILE` first, or give the right --data / "
                             "--tracking-uri)")


def _check_server(uri: str, flag: str) -> None:
    parts = urlsplit(uri)
    if not parts.hostname:
        raise UsageError(f"{flag} {uri!r} names no host")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise UsageError(f"{flag} {uri!r}: the port is not a number in 1-65535") from None
    try:
        with socket.create_connection((parts.hostname, port), timeout=CONNECT_TIMEOUT_S):
            pass
    except socket.timeout:
        raise UsageError(f"MLflow tracking server {uri} did not answer within {CONNECT_TIMEOUT_S:g} s") from None
    except OSError as e:
        raise UsageError(f"MLflow tracking server {uri} is unreachable ({e.strerror or e})") from None


def check_listen(host: str, port: int) -> str | None:
    """Refuse a port outside 1-65535, a host that does not resolve, or an address already in use; returns
    a warning for an address other than loopback (the MLflow UI has no authentication)."""
    if not 1 <= port <= 65535:
        raise UsageError(f"--port {port} is not a TCP port (1-65535)")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise UsageError(f"--host {host!r} does not resolve to an address of this machine "
                         f"({getattr(e, 'strerror', None) or e})") from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind(addr)
        except OSError as e:
            raise UsageError(f"cannot serve on {host}:{port}: {e.strerror or e}"
                             f"{' (another server holds the port; pick another with --port)' if e.errno == 98 else ''}") \
                from None
    if host not in LOOPBACK:
        return (f"warning: --host {host} serves the MLflow UI beyond this machine, and it has no authentication: "
                "anyone who can reach the port can read, change and delete every run")
    return None


def cpu_limit() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def check_threads(n: int | None, flag: str = "--threads") -> None:
    if n is not None and n > cpu_limit():
        raise UsageError(f"{flag} {n} is more than this machine's {cpu_limit()} CPUs (the limit): more threads "
                         "than cores only thrash")
