"""A report seen through a real browser: Debian's ``chromium``, headless, started per call with a fresh
profile, for the report tests (the rendered DOM) and the documentation's screenshot.

Nothing leaves the machine: background networking, component updates and sync are off and every host name
resolves to nothing, so a page can load ``file://`` URLs (and data URIs) only.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--host-resolver-rules=MAP * ~NOTFOUND")


class BrowserMissing(RuntimeError):
    """No chromium binary on PATH."""


def chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        raise BrowserMissing("chromium is not installed: `apt-get install -y chromium` (Debian; scripts/setup.sh "
                             "does it)")
    return path


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="report-chromium-") as profile:
        proc = subprocess.run([chromium(), *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True,
                              text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"chromium exited {proc.returncode} on {args[-1]}: {proc.stderr.strip()[-800:]}")
    return proc


def dump_dom(page: str | Path, budget_ms: int = 5000, timeout: float = 120) -> str:
    """The DOM of ``page`` after it loaded and ran its scripts (``budget_ms`` of virtual time), serialised."""
    url = Path(page).resolve().as_uri()
    return _run(["--dump-dom", f"--virtual-time-budget={budget_ms}", url], timeout).stdout


def screenshot(page: str | Path, png: str | Path, width: int = 1300, height: int = 1400,
               timeout: float = 120) -> Path:
    """A PNG of the first ``width`` x ``height`` CSS pixels of ``page``."""
    png = Path(png).resolve()
    png.parent.mkdir(parents=True, exist_ok=True)
    _run([f"--screenshot={png}", f"--window-size={width},{height}", "--hide-scrollbars",
          Path(page).resolve().as_uri()], timeout)
    if not png.exists():
        raise RuntimeError(f"chromium wrote no screenshot for {page}")
    return png
