"""`farm nightly` night after night, with real parts: a real local Ray runs the suite through the sweep
machinery, a real sqlite MLflow store holds the trials, the nights and the baseline alias (registered
model ``nightly.<suite>``), and the real host backend (onnxruntime CPU, pinned) measures the interleaved
A/B latency comparisons.

The suite is one SmolLM2 decoder layer, RTN W8A8 through tests.nightly_helpers (plus the FP trial), two
calibration windows of 32 tokens; its export step is the tiny QDQ export, narrow or wide. A slower
candidate is slower through its model (the wide export: several times the work per token); a less
accurate one has noise added to its weights. Both change a hyper-parameter only, so the trial id changes
and the slot stays, as after a code change.

The tests run in any order: each starts from a store restored from a snapshot (after the first night, or
after a noisy night on top of it), made once per module by a fixture and never changed by a test.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import sqlite3
import subprocess
import textwrap
from pathlib import Path

import pytest
from mlflow import MlflowClient

from farm.orchestrate.nightly import DEFAULT_PAIRS, registered_name, run_nightly
from farm.orchestrate.sweep import Options
from tests.farm_env import REPO, contained_env, farm_cmd
from tests.nightly_helpers import nightly_exporter

SUITE = "nightsuite"
SLOT = "smollm2-135m.L1.w8a8.nightly"
PPL = "ppl/wiki/seq32"


def _suite(root: Path, noise: float = 0.0, wide: bool = False) -> Path:
    p = root / f"{SUITE}.yaml"
    p.write_text(textwrap.dedent(f"""\
        name: {SUITE}
        base: {{model: smollm2-135m, layers: 1, samples: 2, seqlen: 32, method: nightly}}
        plugins: {{methods: {{nightly: "tests.nightly_helpers:nightly_method"}}}}
        methods: {{nightly: {{noise: {noise}, wide: {str(wide).lower()}}}}}
        grid: {{scheme: [w8a8]}}
        include: [{{scheme: fp}}]
        eval: {{perplexity: {{limit: 2}}}}
        resources: {{cpu: 1}}
        register_best: false
        devices:
          - {{device: host, repeats: 5, warmup: 1, tokens: 4}}
        """))
    return p


class Lab:
    """A contained folder with Ray connected, the devices file, and snapshots of the data folder.

    A snapshot is restored in place (the same absolute paths, which the MLflow store records for its
    artifacts): the sqlite file through sqlite's backup API, so that connections MLflow keeps open see the
    restored database; the other files copied, large ones hard-linked to the snapshot (the stage cache
    writes a file once and never changes it), and hard links inside the folder kept as hard links."""

    def __init__(self, root: Path):
        self.root, self.data, self.devices = root, root / "data", root / "devices.yaml"
        self.snapshots: dict[str, Path] = {}

    def snapshot(self, name: str) -> None:
        dst = self.root / "snapshots" / name
        _clone(self.data, dst)
        self.snapshots[name] = dst

    def restore(self, name: str) -> None:
        src = self.snapshots[name]
        self.data.mkdir(exist_ok=True)
        for child in self.data.iterdir():
            if child.name != "mlflow.db":
                shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
        _clone(src, self.data)


def _clone(src: Path, dst: Path) -> None:
    seen: dict[tuple, Path] = {}
    for dirpath, _, files in os.walk(src):
        out = dst / Path(dirpath).relative_to(src)
        out.mkdir(parents=True, exist_ok=True)
        for name in files:
            f, g = Path(dirpath) / name, out / name
            if name == "mlflow.db":
                with sqlite3.connect(f) as a, sqlite3.connect(g) as b:
                    a.backup(b)
                continue
            st = f.stat()
            key = (st.st_dev, st.st_ino)
            if key in seen:
                os.link(seen[key], g)
            elif st.st_size >= 1 << 20:
                os.link(f, g)
            else:
                shutil.copy2(f, g)
            seen.setdefault(key, g)


@pytest.fixture(scope="module")
def lab():
    import ray

    from farm.orchestrate import scheduler

    with contained_env() as root:
        lab = Lab(root)
        lab.devices.write_text(f"host: {{threads: 1}}\nlock_dir: {root / 'locks'}\n")
        assert scheduler.connect(num_cpus=2)
        try:
            yield lab
        finally:
            ray.shutdown()


@pytest.fixture(scope="module")
def first_night(lab):
    """The first night on an empty store (it sets the baseline); the store after it is the snapshot
    "baseline"."""
    out = _night(lab)
    assert out[0] == 0, out[1]  # every test after it needs the baseline this night sets
    lab.snapshot("baseline")
    return out


@pytest.fixture(scope="module")
def noisy_night(lab, first_night):
    """A less accurate candidate after the first night (a regression); the store after it is the snapshot
    "regression" (its quantized model is in the stage cache from then on)."""
    lab.restore("baseline")
    out = _night(lab, noise=0.5)
    assert out[0] == 1, out[1]
    lab.snapshot("regression")
    return out


@pytest.fixture
def after_baseline(lab, first_night) -> Lab:
    lab.restore("baseline")
    return lab


@pytest.fixture
def after_regression(lab, noisy_night) -> Lab:
    lab.restore("regression")
    return lab


def _night(lab: Lab, **kw) -> tuple[int, str, dict]:
    """One night in this process: (exit status, everything it printed, the night record from MLflow)."""
    suite = _suite(lab.root, kw.pop("noise", 0.0), kw.pop("wide", False))
    err, out = io.StringIO(), io.StringIO()
    environ = dict(os.environ)
    with contextlib.redirect_stdout(out):
        status = run_nightly(str(suite), Options(data_dir=lab.data, live=False, exporter=nightly_exporter),
                             devices_file=str(lab.devices), out=err, **kw)
    assert "MQFARM_DEVICES" not in set(os.environ) - set(environ)  # the devices file is an argument, not the process's
    text = err.getvalue() + out.getvalue()
    c = _client(lab.data)
    exp = c.get_experiment_by_name(f"{SUITE}.nightly")
    run = c.search_runs([exp.experiment_id], "tags.farm_role = 'night'", order_by=["attributes.start_time DESC"],
                        max_results=1)[0]
    record = json.loads(Path(c.download_artifacts(run.info.run_id, "night.json", str(lab.root))).read_text())
    return status, text, record


def _client(data: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{data / 'mlflow.db'}")


def _alias(data: Path):
    return _client(data).get_model_version_by_alias(registered_name(SUITE), "baseline")


def _by_metric(record: dict) -> dict:
    return {(v["slot"], v["metric"]): v for v in record["verdicts"]}


@pytest.mark.slow
def test_first_night_sets_the_baseline_and_says_so(first_night, after_baseline):
    data = after_baseline.data
    status, text, rec = first_night
    assert status == 0, text
    assert "no baseline yet (alias 'baseline' of registered model nightly.nightsuite)" in text
    assert f"night run {rec['run_id']} is now the baseline" in text and "BASELINE SET" in text
    mv = _alias(data)
    assert mv.run_id == rec["run_id"] and int(mv.version) == 1
    assert rec["verdict"] == "baseline" and rec["verdicts"] == [] and rec["accepted"]
    # both slots, the quantized one with its export pinned outside the stage cache (hard links)
    assert set(rec["slots"]) == {SLOT, "smollm2-135m.L1.fp.none"}
    host = rec["slots"][SLOT]["devices"]["host"]
    pinned, export = Path(host["pinned"]), Path(host["export"])
    assert pinned.is_relative_to(data / "nightly" / SUITE / "baselines" / rec["run_id"])
    assert (pinned / "prefill.onnx").read_bytes() == (export / "prefill.onnx").read_bytes()
    assert (pinned / "prefill.onnx").stat().st_ino == (export / "prefill.onnx").stat().st_ino
    # the suite's numbers in the night run, under <slot>/<metric>, equal to the trial run's
    trial = _client(data).get_run(rec["slots"][SLOT]["run_id"]).data.metrics
    night = _client(data).get_run(rec["run_id"]).data.metrics
    assert night[f"{SLOT}/{PPL}"] == trial[PPL] > 1
    assert night[f"{SLOT}/device/host/prefill_ms"] == trial["device/host/prefill_ms"]
    reports = data / "reports" / f"{SUITE}.nightly"
    assert (reports / "history.html").exists() and len(list(reports.glob("night-*/night.html"))) == 1


def test_unchanged_candidate_passes(after_baseline):
    root, data = after_baseline.root, after_baseline.data
    first = _alias(data).run_id
    status, text, rec = _night(after_baseline)
    assert status == 0, text
    assert rec["verdict"] == "pass" and rec["baseline"]["run_id"] == first and not rec["accepted"]
    v = _by_metric(rec)
    # nothing re-ran: the same trial runs as the baseline night's, the same perplexities exactly
    base = json.loads(Path(_client(data).download_artifacts(first, "night.json", str(root))).read_text())
    assert {s: e["run_id"] for s, e in rec["slots"].items()} == {s: e["run_id"] for s, e in base["slots"].items()}
    assert v[(SLOT, PPL)]["change"] == 0.0 and v[("smollm2-135m.L1.fp.none", PPL)]["change"] == 0.0
    for metric in ("device/host/prefill_ms", "device/host/decode_ms_per_tok"):
        lat = v[(SLOT, metric)]
        assert not lat["regression"] and lat["pairs"] == DEFAULT_PAIRS and lat["device"] == "host"
        assert lat["ci_low"] <= lat["change"] <= lat["ci_high"]
        assert abs(lat["change"]) < 0.25  # the same graph: the median pair ratio stays near 1
    assert _alias(data).run_id == first  # a passing night does not move the baseline


def test_slower_candidate_is_flagged_naming_the_latency_metric_and_device(after_baseline):
    data = after_baseline.data
    status, text, rec = _night(after_baseline, wide=True)
    assert status == 1, text
    v = _by_metric(rec)
    lat = v[(SLOT, "device/host/prefill_ms")]
    assert lat["regression"] and lat["change"] > 0.5 and lat["ci_low"] > 0.05  # several times the work
    assert lat["candidate"] > lat["baseline"]
    assert not v[(SLOT, PPL)]["regression"] and v[(SLOT, PPL)]["change"] == 0.0  # same weights, same ppl
    line = next(ln for ln in text.splitlines() if ln.startswith("  REGRESSION: device/host/prefill_ms"))
    assert f"of {SLOT} on host" in line and "CI of the median ratio" in line
    assert f"baseline run {lat['baseline_run']}" in line and f"candidate run {lat['candidate_run']}" in line
    assert lat["candidate_run"] != lat["baseline_run"] and "REGRESSION" in text
    html = next((data / "reports" / f"{SUITE}.nightly").glob(f"night-*-{rec['run_id'][:8]}/night.md")).read_text()
    assert "# Nightly nightsuite: REGRESSION" in html and "`device/host/prefill_ms` of `" + SLOT in html


def test_less_accurate_candidate_is_flagged_naming_the_perplexity_metric(noisy_night, after_regression):
    status, text, rec = noisy_night
    assert status == 1, text
    assert rec["baseline"]["run_id"] == _alias(after_regression.data).run_id  # the first night's
    v = _by_metric(rec)
    acc = v[(SLOT, PPL)]
    assert acc["regression"] and acc["change"] > 0.01
    assert acc["candidate"] == pytest.approx(acc["baseline"] * (1 + acc["change"]))
    assert f"REGRESSION: {PPL} of {SLOT}" in text
    assert not v[("smollm2-135m.L1.fp.none", PPL)]["regression"]  # the FP trial did not change


def test_accept_moves_the_alias(after_regression):
    data = after_regression.data
    before = _alias(data)
    status, text, rec = _night(after_regression, noise=0.5, accept=True)
    assert status == 1, text  # still a regression against the old baseline; accepted anyway
    after = _alias(data)
    assert after.run_id == rec["run_id"] != before.run_id and int(after.version) == int(before.version) + 1
    assert f"alias 'baseline' now points at night run {rec['run_id']} (was {before.run_id})" in text
    status, text, rec2 = _night(after_regression, noise=0.5)
    assert status == 0, text  # the noisy model is the baseline now
    assert rec2["baseline"]["run_id"] == rec["run_id"]
    history = (data / "reports" / f"{SUITE}.nightly" / "history.md").read_text()
    assert history.count("| v1 |") == 1 and history.count("| v2 (now) |") == 1
    assert "history.png" in history


def test_a_pool_with_nothing_available_exits_2(after_baseline):
    """Through the real CLI: the only device of the asked kind is an AI Hub device without credentials."""
    root, data = after_baseline.root, after_baseline.data
    devices = root / "aihub-only.yaml"
    devices.write_text(f"aihub: {{devices: ['Samsung Galaxy S24 (Family)']}}\nlock_dir: {root / 'locks'}\n")
    c = _client(data)
    nights = len(c.search_runs([c.get_experiment_by_name(f"{SUITE}.nightly").experiment_id]))
    proc = subprocess.run(farm_cmd("nightly", str(_suite(root)), "--device", "aihub", "--devices", str(devices),
                                   "--data", str(data)), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("farm nightly: could not run: no available device for 'aihub'")
    assert "aihub:Samsung Galaxy S24 (Family)" in line
    assert len(c.search_runs([c.get_experiment_by_name(f"{SUITE}.nightly").experiment_id])) == nights  # no night


def test_latency_decision_is_material_and_significant():
    """farm.orchestrate.regression on constructed pairs: exact ratios, the bootstrap CI around them, the two conditions."""
    from farm.orchestrate.regression import accuracy_decision, latency_decision

    base = [10.0, 12.0, 11.0, 10.5, 13.0, 10.2, 11.5, 12.5]
    same = latency_decision(base, base)
    assert same == {"ratio": 1.0, "ci_low": 1.0, "ci_high": 1.0, "pairs": 8, "regression": False}
    slow = latency_decision(base, [b * 1.10 for b in base])
    assert slow["ratio"] == pytest.approx(1.10) and slow["ci_low"] == pytest.approx(1.10) and slow["regression"]
    small = latency_decision(base, [b * 1.03 for b in base])  # certain, but under the 5% threshold
    assert small["ci_low"] > 1.0 and not small["regression"]
    # material and above 1 for sure, but not surely above half the threshold: 1.12 and 1.01 alternating
    unsure = latency_decision(base, [b * f for b, f in zip(base, [1.12, 1.01] * 4)])
    assert unsure["ratio"] == pytest.approx(1.065) and 1.0 < unsure["ci_low"] < 1.025 and not unsure["regression"]
    surely = latency_decision(base, [b * f for b, f in zip(base, [1.07, 1.06] * 4)])
    assert surely["ratio"] == pytest.approx(1.065) and surely["ci_low"] > 1.025 and surely["regression"]
    noisy = latency_decision(base, [b * f for b, f in zip(base, [1.3, 0.8, 1.25, 0.85, 1.2, 0.95, 1.3, 0.8])])
    assert noisy["ratio"] > 1.05 and noisy["ci_low"] < 1.0 and not noisy["regression"]  # material, not significant
    assert accuracy_decision(20.0, 20.1) == {"change": pytest.approx(0.005), "regression": False}
    assert accuracy_decision(20.0, 20.4)["regression"] and accuracy_decision(20.0, float("nan"))["regression"]
    with pytest.raises(ValueError, match="as many baseline as candidate"):
        latency_decision(base, base[:3])


def test_bad_arguments_exit_2_naming_the_flag(lab):
    root, data, devices = lab.root, lab.root / "bad-arguments", lab.devices
    for kw, words in (({"pairs": 1}, "--pairs must be at least 2"), ({"threshold": 5.0}, "--threshold is a fraction"),
                      ({"alias": "v3"}, "--baseline 'v3' is not an MLflow alias")):
        err = io.StringIO()
        assert run_nightly(str(_suite(root)), Options(data_dir=data, live=False), devices_file=str(devices),
                           out=err, **kw) == 2
        assert err.getvalue().startswith(f"farm nightly: could not run: {words}")
    err = io.StringIO()
    assert run_nightly(str(root / "nope.yaml"), Options(data_dir=data), out=err) == 2
    assert "suite file " + str(root / "nope.yaml") + " does not exist" in err.getvalue()


def test_history_page_in_a_real_browser(after_regression):
    """history.html in Debian's headless chromium (reports.browser): one table row per night run in MLflow with
    its verdict, and the plot an embedded PNG of real size (a missing chromium fails: scripts/setup.sh
    installs it)."""
    import base64
    import re
    import struct

    from reports.browser import dump_dom

    data = after_regression.data
    status, text, _ = _night(after_regression)  # the unchanged model again: a pass after the regression
    assert status == 0, text
    c = _client(data)
    runs = c.search_runs([c.get_experiment_by_name(f"{SUITE}.nightly").experiment_id], "tags.farm_role = 'night'",
                         order_by=["attributes.start_time DESC"])
    dom = dump_dom(data / "reports" / f"{SUITE}.nightly" / "history.html")
    table = dom.split('<table class="nights">', 1)[1].split("</table>", 1)[0]
    rows = re.findall(r"<tr>(.*?)</tr>", table.split("<tbody>", 1)[1], re.S)
    cells = [re.findall(r"<td[^>]*>(.*?)</td>", r, re.S) for r in rows]
    assert [(r[1], r[2]) for r in cells] == [(run.info.run_id[:8], run.data.tags["nightly.verdict"]) for run in runs]
    assert [r[2] for r in cells] == ["pass", "regression", "baseline"]
    src = re.search(r'<img src="data:image/png;base64,([^"]+)"', dom).group(1)
    png = base64.b64decode(src)
    width, height = struct.unpack(">II", png[16:24])  # the IHDR chunk
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and width > 500 and height > 300


def test_a_baseline_export_gone_exits_2_and_records_a_failed_night(after_regression):
    data = after_regression.data
    mv = _alias(data)
    base = json.loads(Path(_client(data).download_artifacts(mv.run_id, "night.json",
                                                            str(after_regression.root / "b"))).read_text())
    pinned = Path(base["slots"][SLOT]["devices"]["host"]["pinned"])
    moved = pinned.with_name("moved-away")
    pinned.rename(moved)
    try:
        status, text, rec = _night(after_regression, noise=0.5)
    finally:
        moved.rename(pinned)
    assert status == 2, text
    assert f"farm nightly: could not run: the baseline export of {SLOT} on host is gone ({pinned})" in text
    run = _client(data).get_run(rec["run_id"])
    assert run.info.status == "FAILED" and run.data.tags["nightly.verdict"] == "error"
    assert str(pinned) in run.data.tags["nightly.error"] and rec["verdict"] == "error"
    assert _alias(data).run_id == mv.run_id  # nothing moved


def test_a_nights_verdict_moves_only_forward():
    from farm.orchestrate.nightly import NightState

    for path in (["baseline"], ["pass"], ["regression"], ["error"], ["pass", "error"], ["baseline", "error"]):
        state = NightState()
        assert not state.final
        for step in path:
            state.to(step)
        assert state.value == path[-1] and state.final
    for path, bad in ((["pass"], "regression"), (["regression"], "pass"), (["error"], "pass"), ([], "pending"),
                      (["baseline"], "pass")):
        state = NightState()
        for step in path:
            state.to(step)
        with pytest.raises(RuntimeError, match=f"cannot go from {state.value} to {bad}"):
            state.to(bad)

