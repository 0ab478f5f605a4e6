"""reports: a sweep's report built from a real sqlite MLflow store, written through farm's own Tracker
(the code path a sweep uses), so the report reads exactly the layout farm writes. The trial outcomes are
set by the test (perplexity = 20 + 100 / (samples * epochs), FP 20), so every cell is checked exactly."""

from __future__ import annotations

import struct
import subprocess
import sys
import textwrap

import pytest

from farm.plan.spec import load_sweep
from farm.orchestrate.tracking import Tracker
from reports import load_trials, sweep_report
from reports.sweep_report import varying

SWEEP = """\
name: rep
base: {model: smollm2-135m, layers: 1, seqlen: 32, scheme: w8a8}
grid:
  method: [mobilequant, lrl-block]
  samples: [2, 8]
  epochs: [1, 4]
include:
  - {scheme: fp}
  - {method: smoothquant, samples: 8}
eval: {perplexity: {limit: 2}}
"""


def _html_tables(page: str) -> list[list[list[str]]]:
    from html.parser import HTMLParser

    tables: list = []
    inside = [False]

    class P(HTMLParser):
        def handle_starttag(self, tag, attrs):
            if tag == "table":
                tables.append([])
            elif tag == "tr":
                tables[-1].append([])
            elif tag in ("td", "th"):
                tables[-1][-1].append("")
                inside[0] = True

        def handle_endtag(self, tag):
            inside[0] = inside[0] and tag not in ("td", "th")

        def handle_data(self, data):
            if inside[0]:
                tables[-1][-1][-1] += data

    P().feed(page)
    return tables


def _diverges(t) -> bool:
    return t.config["method"] == "mobilequant" and t.config["calib"]["samples"] == 2 and \
        t.config["method_config"]["epochs"] == 4


def _ppl(t) -> float:
    if t.config["method"] == "none":
        return 20.0
    if t.config["method"] == "smoothquant":
        return 25.0
    n, e = t.config["calib"]["samples"], t.config["method_config"]["epochs"]
    return 20.0 + 100.0 / (n * e) + (1.0 if t.config["method"] == "lrl-block" else 0.0)


def _steps(t) -> list[dict]:
    """Training losses for the 8-sample, 4-epoch trials: end to end 100 / step over 40 steps; block-wise
    two layers of 10 steps, layer l at (l + 1) * (11 - k) for its k-th step."""
    c = t.config
    if (c.get("calib") or {}).get("samples") != 8 or (c.get("method_config") or {}).get("epochs") != 4:
        return []
    if c["method"] == "mobilequant":
        return [{"step": s, "loss": 100.0 / s, "epoch": (s - 1) // 10} for s in range(1, 41)]
    if c["method"] == "lrl-block":
        return [{"step": 10 * ly + k, "layer": ly, "loss": (ly + 1) * (11.0 - k)} for ly in (0, 1)
                for k in range(1, 11)]
    return []


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("reports")
    (root / "rep.yaml").write_text(textwrap.dedent(SWEEP))
    sweep = load_sweep(root / "rep.yaml")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    tr = Tracker(uri, sweep.name, artifact_root=root / "artifacts")
    tr.start_parent(sweep)
    failed_once = next(t for t in sweep.trials if t.config["method"] == "lrl-block")
    rid = tr.start_trial(failed_once, {"cpu": 1})
    tr.fail_trial(rid, "RuntimeError: worker ran out of memory")
    for t in sweep.trials:
        rid = tr.start_trial(t, {"cpu": 1})
        tr.log_steps(rid, _steps(t))
        if _diverges(t):
            tr.fail_trial(rid, "TrainingDiverged: loss exploded")
        else:
            tr.finish_trial(rid, {"metrics": {"ppl/wiki/seq32": _ppl(t), "time/total_s": 3.0}})
    return root, uri, sweep, failed_once


def test_one_entry_per_trial_the_finished_run_wins(store):
    _, uri, sweep, failed_once = store
    trials = load_trials("rep", uri)
    assert sorted(t.trial_id for t in trials) == sorted(t.id for t in sweep.trials)  # 10 trials, 11 runs
    again = next(t for t in trials if t.trial_id == failed_once.id)
    assert again.status == "FINISHED" and again.executions == 2
    assert all(t.executions == 1 for t in trials if t.trial_id != failed_once.id)
    assert varying(trials) == ["scheme", "method", "method_config.epochs", "calib.samples"]
    assert [t.status for t in trials].count("FAILED") == 1
    with pytest.raises(ValueError, match="no sweep named 'other'"):
        load_trials("other", uri)


def test_columns_that_vary_together_collapse_to_one():
    from reports.sweep_report import independent

    rows = [{"method": m, "lr": lr, "min_lr": lr / 10, "n": n} for m, lr in (("a", 1.0), ("b", 2.0), ("b", 3.0))
            for n in (1, 2)]
    assert independent(["method", "lr", "min_lr", "n"], rows) == ["method", "lr", "n"]
    assert independent(["min_lr", "lr"], rows) == ["min_lr"]


def test_report_tables_hold_the_exact_ratios_and_the_plot(store):
    root, uri, _, _ = store
    path = sweep_report("rep", uri, root / "out")
    text = path.read_text()
    assert "10 trials (1 failed, 9 finished)" in text and "smollm2-135m (layers=1): 20" in text
    pivot = text.split("## Ratio to FP by method_config.epochs")[1].split("##")[0].strip().splitlines()
    assert pivot[0] == "| method | calib.samples | (no epochs) | epochs 1 | epochs 4 |"
    # (20 + 100 / (n e) [+1 for block-wise]) / 20, ratios to 3 decimals; SmoothQuant 25 / 20
    assert pivot[2:] == ["| lrl-block | 2 | - | 3.550 | 1.675 |", "| lrl-block | 8 | - | 1.675 | 1.206 |",
                         "| mobilequant | 2 | - | 3.500 | failed |", "| mobilequant | 8 | - | 1.625 | 1.156 |",
                         "| smoothquant | 8 | 1.250 | - | - |"]
    png = (root / "out" / "ppl_vs_samples.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", png[16:24]) == (924, 462)
    assert "![ratio to FP](ppl_vs_samples.png)" in text
    # the HTML page holds the same tables: the trials table (10 rows) and the pivot, row for row
    tables = _html_tables((root / "out" / "report.html").read_text())
    assert sum(len(t) == 1 + 10 and t[0][:2] == ["trial", "scheme"] for t in tables) == 1
    md_rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in pivot[:1] + pivot[2:]]
    assert md_rows in tables


def test_farm_report_cli(store):
    root, _, _, _ = store
    out = subprocess.run([sys.executable, "-m", "farm.cli", "report", str(root / "rep.yaml"), "--data", str(root),
                          "--out", str(root / "cli")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "| mobilequant | 8 | - | 1.625 | 1.156 |" in out.stdout and (root / "cli" / "report.md").exists()
    bad = subprocess.run([sys.executable, "-m", "farm.cli", "report", "nosuch", "--data", str(root)],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "no sweep named 'nosuch'" in bad.stderr


def test_training_curves_are_summarised_exactly(store):
    """``late change`` = mean of the last tenth of the steps / mean of the tenth before - 1 (block-wise:
    per layer, then the median), on the losses the fixture logged."""
    from reports.training import curve

    root, uri, _, _ = store
    text = sweep_report("rep", uri, root / "curves").read_text()
    table = text.split("## Training loss")[1].split("![")[0].strip().splitlines()
    assert table[2].endswith("| method | method_config.epochs | calib.samples | mode | steps | first loss | last loss "
                             "| late change | status |")
    cells = [[c.strip() for c in ln.strip("|").split("|")] for ln in table[4:]]
    rows = {c[2]: c for c in cells}
    assert len(cells) == 2  # only the two trials that logged losses
    e2e, block = rows["mobilequant"], rows["lrl-block"]
    last, before = sum(100 / s for s in range(37, 41)) / 4, sum(100 / s for s in range(33, 37)) / 4
    assert e2e[-6:] == ["end-to-end", "40", "100", f"{last:.4g}", f"{last / before - 1:.4g}", "FINISHED"]
    # each layer's tenth is its last step: (l+1)*1 against (l+1)*2, so -0.5 for both; last layer's = 2
    assert block[-6:] == ["block-wise", "20", "10", "2", "-0.5", "FINISHED"]
    png = (root / "curves" / "training_loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and "![training loss](training_loss.png)" in text
    assert curve([]) is None and curve([(1, 5.0)]).late_change is None
