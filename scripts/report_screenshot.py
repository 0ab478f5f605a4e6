"""The documentation's picture of a report: docs/img/demo-report.png, taken by headless chromium.

The report is the demo sweep's when runs/farm/mlflow.db holds one (after `bash scripts/main.sh` or
`farm sweep sweeps/demo.yaml`); otherwise the synthetic sweep of tests/report_store.py (W8A8/W4A8, three
methods, two devices and the emulator), built in a scratch store, and the script says so. The PNG is
reduced to a 256-colour palette to stay small (a report is text, flat colours and a few plots).

    python scripts/report_screenshot.py [--out docs/img/demo-report.png] [--width 1300] [--height 1500]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def demo_store() -> str | None:
    db = REPO / "runs" / "farm" / "mlflow.db"
    if not db.exists():
        return None
    from mlflow import MlflowClient

    uri = f"sqlite:///{db}"
    return uri if MlflowClient(uri).get_experiment_by_name("demo") is not None else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(REPO / "docs" / "img" / "demo-report.png"))
    ap.add_argument("--width", type=int, default=1300)
    ap.add_argument("--height", type=int, default=1500)
    args = ap.parse_args()

    from PIL import Image

    from reports import sweep_report
    from reports.browser import screenshot

    with tempfile.TemporaryDirectory(prefix="report-shot-") as tmp:
        uri = demo_store()
        if uri:
            sweep, source = "demo", f"the demo sweep in {uri}"
        else:
            from tests.report_store import build_store

            uri, _ = build_store(Path(tmp) / "store")
            sweep, source = "devrep", "the synthetic sweep of tests/report_store.py (no demo sweep in runs/farm)"
        sweep_report(sweep, uri, Path(tmp) / "report")
        raw = screenshot(Path(tmp) / "report" / "report.html", Path(tmp) / "shot.png", args.width, args.height)
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.open(raw).convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(
            out, optimize=True)
    print(f"{out}: {out.stat().st_size / 1024:.0f} KiB, report of {source}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
