"""reports with device metrics: the summary in the paper's shape, the Pareto view, the device table, failed
trials, provenance and number formatting, from a real sqlite MLflow store written through farm's Tracker
(tests/report_store.py sets every number, so each cell is checked against it). The run links are checked
against a real ``mlflow server`` on 127.0.0.1 serving the same store."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from reports import fmt, sweep_report
from reports.device_metrics import Interval, device_results, metric_key
from reports.pareto import frontier
from tests import report_store as rs


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("devrep")
    uri, sweep = rs.build_store(root)
    path = sweep_report("devrep", uri, root / "out")
    return root, uri, sweep, path.read_text()


def md_table(text: str, heading: str, nth: int = 0) -> list[list[str]]:
    """The ``nth`` Markdown table under ``## heading`` as rows of raw cell texts (header first)."""
    part = text.split(f"## {heading}\n")[1].split("\n## ")[0]
    tables, cur = [], []
    for ln in part.splitlines() + [""]:
        if ln.startswith("|"):
            cur.append(ln)
        elif cur:
            tables.append(cur)
            cur = []
    lines = tables[nth]
    split = [[c.strip() for c in ln.strip().strip("|").replace("\\|", "\x00").split("|")] for ln in lines]
    return [[c.replace("\x00", "|") for c in row] for row in split[:1] + split[2:]]


def test_numbers_read_as_people_write_them():
    assert [fmt.duration(s) for s in (0.0002, 0.04, 3.04, 9.96, 12.5, 59.4, 284.3, 3599.6, 7325)] == \
        ["0 s", "0 s", "3 s", "10 s", "13 s", "59 s", "4m44s", "1h00m", "2h02m"]
    assert [fmt.ratio(v) for v in (1, 1.0, 1.2706, 12.34567, None)] == ["1.000", "1.000", "1.271", "12.346", "-"]
    assert [fmt.measured(v) for v in (0.000412345, 20.94, 99.96, 410.0, 12345.6, 0.0)] == \
        ["0.000412", "20.9", "100", "410", "12346", "0"]
    assert [fmt.number(v) for v in (27.1534, 100.0, 1e-7, True, None, "x", 3)] == \
        ["27.15", "100", "0.0000001", "yes", "-", "x", "3"]
    assert fmt.accuracy(0.4) == "0.400"
    from reports.device_metrics import Interval

    assert fmt.interval(Interval(410.0, 389.5, 430.5)) == "410 [390, 430]" and fmt.interval(9.5) == "9.5"
    assert fmt.interval(Interval(0.832, 0.81, 0.851, is_ratio=True)) == "0.832 [0.81, 0.851]"
    assert fmt.interval(Interval(0.99, 0.95, 1.02, is_ratio=True)) == "0.99 [0.95, 1.02] ~1"  # holds 1


def test_device_metrics_are_found_by_their_names_whatever_the_device_is_called():
    dev = "aihub:Samsung Galaxy S24/8gen3"  # a ':' and a '/' inside the name
    metrics = {metric_key(dev, "prefill_ms"): 12.5, metric_key(dev, "prefill_ms_ci_low"): 12.0,
               metric_key(dev, "prefill_ms_ci_high"): 13.0, metric_key("host", "decode_tok_s"): 40.0,
               metric_key("host", "energy_mj_per_tok"): 2.5, "ppl/wiki/seq32": 20.0, "device/host/other": 1.0}
    tags = {metric_key(dev, "soc"): "SM8650", metric_key("qnn-sim", "latency_meaningful"): "false",
            metric_key("host", "latency_meaningful"): "true", "device/host/unrelated": "x"}
    out = device_results(metrics, tags)
    assert sorted(out) == sorted([dev, "host", "qnn-sim"])
    d = out[dev]
    assert (d.prefill_ms, d.prefill_ci_low, d.prefill_ci_high, d.identity) == (12.5, 12.0, 13.0, {"soc": "SM8650"})
    host = out["host"]
    assert (host.decode_tok_s, host.energy_mj_per_tok, host.latency_meaningful) == (40.0, 2.5, True)
    assert out["qnn-sim"].latency_meaningful is False and out["qnn-sim"].prefill_ms is None


def test_frontier_matches_a_sort_and_sweep_reference():
    """2-D frontier against the textbook sweep: sort by x then y, keep a point when its y is below every y
    seen at a strictly smaller x (ties in both: all kept); 200 random sets with many ties."""
    rng = random.Random(0)
    for _ in range(200):
        pts = [(rng.randint(0, 6), rng.randint(0, 6)) for _ in range(rng.randint(1, 12))]
        ref = [not [q for q in pts if q[0] <= p[0] and q[1] <= p[1] and q != p] for p in pts]  # the definition
        order = sorted(set(pts))
        keep, min_y = set(), float("inf")
        for x in sorted({p[0] for p in order}):
            ys = sorted(p[1] for p in order if p[0] == x)
            if ys[0] < min_y:
                keep.add((x, ys[0]))
                min_y = ys[0]
        assert frontier(pts) == [p in keep for p in pts] == ref, pts


def test_summary_in_the_papers_shape_with_the_best_of_each_column(store):
    _, _, _, text = store
    rows = md_table(text, "Summary")
    assert rows[0] == ["model", "scheme", "method", "trial", "ppl wiki/seq32", "vs fp", "hellaswag acc_norm",
                       "lambada acc", "galaxy-s24 prefill ms", "galaxy-s24 decode tok/s", "galaxy-s24 mJ/tok",
                       "host prefill ms", "host decode tok/s", "host prefill vs fp", "host decode vs fp"]
    # the emulator has no column; nor host energy. The session's ratios to FP follow the host's columns.
    body = {(r[1], r[2]): r for r in rows[1:]}
    assert len(rows) == 1 + 7 and set(body) == set(rs.TRUTH)  # the failed omniquant trial is not summarised
    # a device column's best is bold only when its interval overlaps no other row's: W4A8 RTN's prefill
    # (15.2 ms +-5 % against SmoothQuant's 15.8) and its ratios (+-3 %) are not told apart; decode tok/s and
    # energy carry no interval here and count as exact
    bold = {("w8a8", "mobilequant"): {4, 5, 6, 7}, ("w4a8", "rtn"): {9, 10, 12}}
    fp_host = rs.TRUTH[("fp", "none")][3]
    for key, (ppl, lam, hel, host, phone) in rs.TRUTH.items():
        def iv(v, ci, ratio=False):
            return fmt.interval(Interval(v, v * (1 - ci), v * (1 + ci), is_ratio=ratio))

        want = [fmt.number(ppl), fmt.ratio(ppl / 20.0), fmt.accuracy(hel), fmt.accuracy(lam),
                iv(phone[0], rs.CI), fmt.measured(phone[1]), fmt.measured(phone[2]),
                iv(host[0], rs.CI), fmt.measured(host[1])]
        if key != ("fp", "none"):
            want += [iv(host[0] / fp_host[0], rs.RATIO_CI, True), iv(fp_host[1] / host[1], rs.RATIO_CI, True)]
        got = body[key][4:]
        for i, (g, w) in enumerate(zip(got, want), start=4):
            assert g == (f"**{w}**" if i in bold.get(key, ()) else w), (key, rows[0][i], g, w)
    assert body[("w8a8", "mobilequant")][4:8] == ["**25.4**", "**1.270**", "**0.341**", "**0.400**"]
    assert body[("fp", "none")][5] == "1.000"  # FP is the reference, never highlighted
    assert str(rs.EMULATOR_MS) not in text and "31234" not in text and "3.123e" not in text


def test_pareto_frontier_per_device(store):
    """Frontiers derived by hand from TRUTH. Host (ratio, prefill time ratio to FP, the session's): W8A8 RTN
    and SmoothQuant are beaten by W8A8 MobileQuant. Phone (ratio, prefill ms, energy): W8A8 SmoothQuant's
    lower energy (10.5 mJ) puts it back on the frontier; W8A8 RTN stays off.

    Separability by hand: a frontier point is "not separable" when a point of no worse quality has a
    latency interval overlapping its own. Host (ratios +-3 %): W4A8 SmoothQuant (0.244) overlaps W4A8
    MobileQuant (0.248), and W4A8 RTN (0.232) overlaps SmoothQuant. Phone (ms +-5 %): the same two, and W8A8
    SmoothQuant (22.0 ms) overlaps W8A8 MobileQuant (20.9 ms)."""
    _, _, _, text = store
    rows = md_table(text, "Quality, latency and energy")
    assert rows[0] == ["device", "model", "scheme", "method", "vs fp", "prefill ms", "prefill vs fp", "mJ/tok",
                       "on frontier", "separable"]
    off = {(r[0], r[2], r[3]) for r in rows[1:] if r[8] == "no"}
    on = {(r[0], r[2], r[3]) for r in rows[1:] if r[8] == "yes"}
    assert off == {("host", "w8a8", "rtn"), ("host", "w8a8", "smoothquant"), ("galaxy-s24", "w8a8", "rtn")}
    assert len(on) == 2 * 7 - 3 and not any(r[0] == "qnn-sim" for r in rows[1:])
    shaky = {(r[0], r[2], r[3]) for r in rows[1:] if r[9] == "not separable"}
    assert shaky == {("host", *k) for k in rs.NOT_SEPARABLE} | {("galaxy-s24", *k) for k in rs.NOT_SEPARABLE} | \
        {("galaxy-s24", "w8a8", "smoothquant")}
    assert all(r[9] == "-" for r in rows[1:] if r[8] == "no")  # only frontier points are judged
    host_fp = next(r for r in rows[1:] if r[0] == "host" and r[2] == "fp")
    assert host_fp[6] == "1"  # the reference's ratio to itself, exact
    assert "![Pareto plot of quality against latency and energy](pareto.png)" in text


def test_device_table_withholds_the_emulators_times(store):
    _, _, sweep, text = store
    rows = md_table(text, "Device measurements")
    assert len(rows) == 1 + 7 * 3 + 1
    lost = [r for r in rows[1:] if r[3] == rs.LOST[0]]
    assert rows[0][9:] == ["prefill vs fp", "decode vs fp", "same graph as", "note"]
    assert [r[1:] for r in lost] == [[*rs.LOST[1], rs.LOST[0], "-", "-", "-", "-", "-", "-", "-", "-", rs.LOST[2]]]
    sim = [r for r in rows[1:] if r[3] == "qnn-sim"]
    assert len(sim) == 7 and all(r[4:11] == ["-"] * 7 and "not latency" in r[12] for r in sim)
    fp_phone = next(r for r in rows[1:] if r[1:4] == ["fp", "none", "galaxy-s24"])
    assert fp_phone[4:9] == ["410", "390", "430", "4.1", "95"]  # median, -5 %, +5 %, tok/s, mJ
    # the host's session: ratios with intervals, and the trials of the same graph named
    mq = next(r for r in rows[1:] if r[1:4] == ["w8a8", "mobilequant", "host"])
    ratio = rs.TRUTH[("w8a8", "mobilequant")][3][0] / rs.TRUTH[("fp", "none")][3][0]
    assert mq[9] == fmt.interval(Interval(ratio, ratio * 0.97, ratio * 1.03, is_ratio=True))
    shorts = {rs.key_of(t): t.short for t in sweep.trials}
    assert set(mq[11].split(", ")) == {shorts[("w8a8", m)] for m in ("rtn", "smoothquant", "omniquant")}


def test_the_report_says_how_the_device_numbers_were_measured(store):
    _, _, _, text = store
    rows = md_table(text, "How the device numbers were measured")
    assert rows[0] == ["device", "session", "trials", "loaded", "how"]
    host = [r for r in rows[1:] if r[0] == "host"]
    assert host == [["host", rs.SESSION_KEY[:8], "7", "no", rs.CONDITIONS]]  # one session for all 7
    assert {r[0] for r in rows[1:]} == {"host", "galaxy-s24"}  # the emulator's times are not latency


def test_trials_failed_and_provenance(store):
    _, _, sweep, text = store
    trials = {(r[1], r[2]): r for r in md_table(text, "Trials")[1:]}
    assert trials[("w8a8", "rtn")][5:7] == ["0 s", "13 s"] and trials[("w8a8", "mobilequant")][5:7] == \
        ["4m44s", "4m57s"]
    failed = md_table(text, "Failed trials")
    bad = next(t for t in sweep.trials if rs.key_of(t) == rs.FAILED)
    assert failed[1:] == [[bad.short, "w8a8", "omniquant", "FAILED", "exception", "1", rs.ERROR]]
    assert "loss is nan \\| step 3" in text  # escaped, so the row keeps its columns
    calib = md_table(text, "Provenance", 2)
    assert calib[1:] == [["news", rs.CORPUS_ID, "4", "32", "0", "7"]]
    devices = {r[0]: r[1:] for r in md_table(text, "Provenance", 3)[1:]}
    assert devices == {
        "host": ["Intel Xeon (test host)", "x86_64", "Linux 6.1.0-test", "onnxruntime 1.32.0", "yes", "7"],
        "galaxy-s24": ["Samsung Galaxy S24", "SM8650", "UP1A.231005.007", "qnn-net-run 2.27", "yes", "7"],
        "qnn-sim": ["QNN HTP emulator", "SM8650 (emulated)", "Linux 6.1.0-test", "onnxruntime-qnn 2.7.0",
                    "no (emulator)", "7"],
        rs.LOST[0]: ["-", "-", "-", "-", "yes", "1"]}
    versions = {r[0]: r[1] for r in md_table(text, "Provenance", 1)[1:]}
    import mlflow
    import torch

    assert versions["mlflow"] == mlflow.__version__ and versions["torch"] == torch.__version__


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_each_trial_links_to_its_run_on_an_mlflow_server(store, tmp_path):
    """A real ``mlflow server`` on 127.0.0.1 over the same sqlite store: the report built through it links
    every trial to ``<server>/#/experiments/<id>/runs/<run id>``, and each linked run, fetched from that
    server's REST API, is the trial's own run."""
    root, uri, sweep, _ = store
    port = _free_port()
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
           "HOME": str(tmp_path)}
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    server = subprocess.Popen([str(mlflow_bin), "server", "--backend-store-uri", uri, "--artifacts-destination",
                               str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=tmp_path)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                if urllib.request.urlopen(f"{base}/health", timeout=2).read() == b"OK":
                    break
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    raise AssertionError(f"mlflow server did not start: {server.stderr.read().decode()[-2000:]}")
                time.sleep(0.3)
        text = sweep_report("devrep", base, tmp_path / "out").read_text()
        rows = md_table(text, "Trials")[1:]
        assert len(rows) == len(sweep.trials) == 8
        by_short = {t.short: t for t in sweep.trials}
        for r in rows:
            short, url = r[0][1:].split("](")
            short, url = short.rstrip("]"), url.rstrip(")")
            assert url.startswith(f"{base}/#/experiments/") and "/runs/" in url
            run_id = url.rsplit("/", 1)[1]
            run = json.loads(urllib.request.urlopen(f"{base}/api/2.0/mlflow/runs/get?run_id={run_id}",
                                                    timeout=10).read())["run"]
            tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
            assert tags["trial_id"] == by_short[short].id
            assert url.split("/#/experiments/")[1].split("/")[0] == run["info"]["experiment_id"]
        html = (tmp_path / "out" / "report.html").read_text()
        assert html.count(f'<a href="{base}/#/experiments/') == len(rows) + 7 + 7 * 3 + 1 + 2 + 1
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()


def test_a_baseline_the_sweep_added_is_a_reference_not_the_columns_best(tmp_path):
    """The W8A16 trial that `baselines:` adds (tagged farm_baseline by the Tracker) beats the W8A8 trials on
    perplexity, as it should, but the bold goes to the best W8A8 trial the grid asked for, and it is not
    registered as the best W8A16 model; a W8A16 trial the grid itself asks for is a contender like any other."""
    from farm.core.vocab import BASELINE
    from farm.orchestrate.tracking import Tracker
    from farm.plan.spec import load_sweep

    ppl = {("fp", "none"): 20.0, ("w8a16", "rtn"): 20.2, ("w8a8", "rtn"): 31.0, ("w8a8", "smoothquant"): 26.0}
    for grid_has_w8a16 in (False, True):
        root = tmp_path / str(grid_has_w8a16)
        root.mkdir()
        extra = "\n  - {scheme: w8a16, method: rtn}" if grid_has_w8a16 else ""
        (root / "b.yaml").write_text(
            "name: b\nbase: {model: smollm2-135m, layers: 1, samples: 2, seqlen: 32}\n"
            "grid: {method: [rtn, smoothquant]}\ninclude:\n  - {scheme: fp}" + extra + "\n"
            "baselines: [w8a16]\n")
        sweep = load_sweep(root / "b.yaml")
        assert len(sweep.trials) == 4
        uri = f"sqlite:///{root / 'mlflow.db'}"
        tr = Tracker(uri, "b", artifact_root=root / "artifacts")
        tr.start_parent(sweep)
        tagged = {}
        for t in sweep.trials:
            rid = tr.start_trial(t, {"cpu": 1})
            tagged[(t.config["scheme"], t.config["method"])] = tr.client.get_run(rid).data.tags.get(BASELINE)
            tr.finish_trial(rid, {"metrics": {"ppl/wiki/seq32": ppl[(t.config["scheme"], t.config["method"])]},
                                  "recipe": {}})
        assert tagged == {("fp", "none"): None, ("w8a16", "rtn"): None if grid_has_w8a16 else "w8a16",
                          ("w8a8", "rtn"): None, ("w8a8", "smoothquant"): None}
        rows = md_table(sweep_report("b", uri, root / "out").read_text(), "Summary")
        body = {(r[1], r[2]): r[4] for r in rows[1:]}
        if grid_has_w8a16:
            assert body[("w8a16", "rtn")] == "**20.2**" and body[("w8a8", "smoothquant")] == "26"
        else:
            assert body[("w8a16", "rtn")] == "20.2" and body[("w8a8", "smoothquant")] == "**26**"
            assert [r[1] for r in rows[1:3]] == ["fp", "w8a16"]  # the references first
        # the registry: the best W8A8 always; a W8A16 entry only where the grid asked for W8A16
        results = {t.id: {"metrics": {"ppl/wiki/seq32": ppl[(t.config["scheme"], t.config["method"])]}}
                   for t in sweep.trials}
        reg = tr.register_best({t.id: t for t in sweep.trials}, results,
                               lambda r: ("ppl/wiki/seq32", r["metrics"]["ppl/wiki/seq32"]))
        assert [r["name"] for r in reg] == (["b.smollm2-135m.w8a16"] if grid_has_w8a16 else []) + ["b.smollm2-135m.w8a8"]
