"""The device pool and its command line: resolving names and kinds, the errors for bad input, one
benchmark per device across processes (real flock between real processes), and a device lost mid-run
retried on another device of its kind.

The lost device is a protocol-level stand-in: the real host backend (real onnxruntime runs) wrapped so
that its second workload raises DeviceLost, as the adb backend does when a phone drops off the bus. The
adb engineer's tests do the same through a real adb server and an adb device stand-in.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from devicelab import inventory
from devicelab.backends.host import HostDevice
from devicelab.exported import ExportError
from devicelab.inventory import DeviceEntry, Inventory, InventoryError
from devicelab.pool import DeviceBusy, Pool, PoolError, device_lock
from devicelab.protocol import DeviceLost, Health, Workload
from farm.cli import main as farm_main
from tests.devicelab_fixtures import copy_export, make_tiny_export
from tests.farm_env import REPO, farm_cmd, free_port


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    return make_tiny_export(tmp_path_factory.mktemp("pool") / "exp")


def _inv(tmp_path: Path, entries: list[DeviceEntry]) -> Inventory:
    return Inventory(entries, tmp_path / "devices.yaml", tmp_path / "locks")


class LosesOnSecondWorkload(HostDevice):
    """Host backend stand-in for a phone that drops off mid-run (see the module docstring)."""

    def __init__(self, name: str):
        super().__init__(name)
        self.runs = 0

    def run(self, prepared, workload):
        self.runs += 1
        if self.runs == 2:
            raise DeviceLost(f"{self.name}: device offline (adb: device '{self.name}' not found)")
        return super().run(prepared, workload)


class Offline(HostDevice):
    def health(self) -> Health:
        return Health(online=False, detail="unauthorized: accept the USB debugging prompt")


def test_lost_device_is_a_failed_record_and_the_rest_runs_on_another_of_its_kind(export, tmp_path):
    entries = [DeviceEntry("phone-a", "adb", {"serial": "A"}), DeviceEntry("phone-b", "adb", {"serial": "B"})]
    a, b = LosesOnSecondWorkload("phone-a"), HostDevice("phone-b")
    events = []
    pool = Pool(_inv(tmp_path, entries), devices={"phone-a": a, "phone-b": b}, on_event=events.append)
    wl = [Workload(graph="prefill", warmup=1, repeats=4), Workload(graph="decode", tokens=4, warmup=1, repeats=4)]
    res = pool.bench(export, "adb", wl)
    assert res.ok and res.wanted == 2
    # the prefill measured on phone-a is kept; decode was lost there and measured on phone-b
    assert [(r.device.name, r.workload.graph, r.status) for r in res.records] == [
        ("phone-a", "prefill", "ok"), ("phone-b", "decode", "ok")]
    assert len(res.failed) == 1
    f = res.failed[0]
    assert (f.status, f.device.name, f.workload.graph) == ("failed", "phone-a", "decode")
    assert "device lost" in f.error and "phone-a" in f.error and f.samples_ms == []
    assert any("retrying on another adb device" in e for e in events)


def test_every_device_lost_keeps_what_was_measured(export, tmp_path):
    entries = [DeviceEntry("phone-a", "adb", {"serial": "A"})]
    pool = Pool(_inv(tmp_path, entries), devices={"phone-a": LosesOnSecondWorkload("phone-a")})
    res = pool.bench(export, "phone-a", [Workload(graph="prefill", repeats=3), Workload(graph="decode", repeats=3)])
    assert not res.ok and len(res.records) == 1 and len(res.failed) == 1


def test_unknown_names_and_kinds_are_clear_errors(export, tmp_path):
    entries = [DeviceEntry("host", "host"), DeviceEntry("s24-a", "adb", {"serial": "X"})]
    pool = Pool(_inv(tmp_path, entries), devices={"s24-a": Offline("s24-a")})
    with pytest.raises(PoolError, match=r"unknown device 'pixel9'.*devices: host, s24-a; or a kind: adb, host"):
        pool.resolve("pixel9")
    with pytest.raises(PoolError, match=r"no aihub device is configured.*kinds with devices: adb, host"):
        pool.resolve("aihub")
    # a kind whose every device is unhealthy: say why, and which kinds can take the work
    with pytest.raises(PoolError, match=r"no available device for 'adb' \(s24-a: unauthorized.*\); "
                                        r"kinds with an available device: host"):
        pool.bench(export, "adb", [Workload()])


def test_an_export_of_an_unknown_exporter_version_is_refused_naming_the_file(export, tmp_path, capsys):
    bad = copy_export(export, tmp_path / "v99", exporter_version=99)
    pool = Pool(_inv(tmp_path, [DeviceEntry("host", "host")]))
    with pytest.raises(ExportError, match=r"export.json: exporter_version 99 is not one this devicelab reads"):
        pool.bench(bad, "host", [Workload(repeats=2)])
    assert farm_main(["bench", str(bad), "--device", "host", "--devices", str(_devices_file(tmp_path))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("farm bench: error:") and "exporter_version 99" in err[0]


def _devices_file(tmp_path: Path, text: str = "") -> Path:
    p = tmp_path / "devices.yaml"
    p.write_text(textwrap.dedent(text or f"""\
        host: {{threads: 1}}
        qnn_sim: {{enabled: false}}
        lock_dir: {tmp_path / 'locks'}
        """))
    return p


def test_farm_bench_prints_the_record_and_json(export, tmp_path, capsys):
    devices = _devices_file(tmp_path)
    assert farm_main(["bench", str(export), "--device", "host", "--repeats", "5", "--warmup", "1",
                      "--devices", str(devices), "--json"]) == 0
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["workload"]["graph"] for r in out] == ["prefill", "decode"]
    for r in out:
        assert r["status"] == "ok" and len(r["samples_ms"]) == 5 and r["device"]["name"] == "host"
        assert r["ci_low_ms"] <= r["median_ms"] <= r["ci_high_ms"]
    assert farm_main(["bench", str(export), "--device", "host", "--graph", "prefill", "--repeats", "3",
                      "--devices", str(devices)]) == 0
    text = capsys.readouterr().out
    assert "latency  median" in text and "95% CI of the median" in text and "onnxruntime" in text
    assert farm_main(["bench", str(export), "--device", "nope", "--devices", str(devices)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("farm bench: error: unknown device 'nope' (" + str(devices) + "); devices: host; or a kind: host")
    assert farm_main(["bench", str(export), "--device", "host", "--repeats", "0", "--devices", str(devices)]) == 2
    assert "--repeats must be at least 1" in capsys.readouterr().err


def test_the_farm_command_answers_bad_input_with_one_line_and_status_2(export, tmp_path):
    devices = _devices_file(tmp_path)
    for args, words in ((["--device", "pixel9"], "unknown device 'pixel9'"),
                        (["--device", "aihub"], "no aihub device is configured"),
                        (["--device", "host", "--warmup", "-1"], "--warmup must be 0 or more")):
        proc = subprocess.run(farm_cmd("bench", str(export), "--devices", str(devices), *args), cwd=REPO,
                              capture_output=True, text=True, timeout=120)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("farm bench: error:"), proc.stderr
        assert words in lines[0] and proc.stdout == ""


def test_farm_devices_lists_the_pool_with_health(tmp_path, capsys):
    devices = _devices_file(tmp_path)
    assert farm_main(["devices", "--devices", str(devices), "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["name"], r["kind"], r["online"]) for r in rows] == [("host", "host", True)]
    assert rows[0]["free_storage_bytes"] > 0 and rows[0]["battery_pct"] is None
    assert farm_main(["devices", "--devices", str(devices)]) == 0
    head = capsys.readouterr().out.splitlines()[0].split()
    assert head == ["name", "kind", "online", "battery", "temp", "charging", "free", "detail"]


def test_devices_file_errors_name_the_file_and_key(tmp_path, monkeypatch):
    p = _devices_file(tmp_path, "phones:\n  - {name: s24, runtime_dir: /opt/qnn}\n")
    with pytest.raises(InventoryError, match=r"devices.yaml: phones\[0\].serial: required"):
        inventory.load(p, discover=False)
    p = _devices_file(tmp_path, "phones:\n  - {serial: R5C, battery: 3}\n")
    with pytest.raises(InventoryError, match=r"phones\[0\].battery: unknown key; known keys here: name, serial"):
        inventory.load(p, discover=False)
    p = _devices_file(tmp_path, "host: {threads: two}\n")
    with pytest.raises(InventoryError, match=r"host.threads: must be int, got 'two'"):
        inventory.load(p, discover=False)
    p = _devices_file(tmp_path, "phones:\n  - {serial: R5C, name: host}\n")
    with pytest.raises(InventoryError, match=r"device name 'host' is used twice"):
        inventory.load(p, discover=False)
    monkeypatch.setenv("MQFARM_DEVICES", str(tmp_path / "missing.yaml"))
    with pytest.raises(InventoryError, match=r"missing.yaml \(from \$MQFARM_DEVICES\) does not exist"):
        inventory.load()
    # a full file: phones, AI Hub devices (kinds and names as the pool sees them)
    p = _devices_file(tmp_path, """\
        qnn_sim: {enabled: false}
        phones:
          - {name: s24-a, serial: R5CX1, soc: SM8650, runtime_dir: /opt/qnn, allow_charging: true}
          - {serial: "192.168.1.20:5555"}
        aihub: {devices: ["Samsung Galaxy S24 (Family)"], job_timeout_s: 600}
        """)
    inv = inventory.load(p, discover=False)
    assert [(e.name, e.kind) for e in inv.entries] == [
        ("host", "host"), ("s24-a", "adb"), ("192.168.1.20:5555", "adb"),
        ("aihub:Samsung Galaxy S24 (Family)", "aihub")]
    assert inv.get("s24-a").options == {"serial": "R5CX1", "soc": "SM8650", "runtime_dir": "/opt/qnn",
                                        "allow_charging": True}
    assert inv.get("aihub:Samsung Galaxy S24 (Family)").options == {"device": "Samsung Galaxy S24 (Family)",
                                                                   "job_timeout_s": 600}


def test_discovery_without_an_adb_server_is_empty_not_an_error(monkeypatch):
    monkeypatch.setenv("ANDROID_ADB_SERVER_PORT", str(free_port()))  # nothing listens there
    t0 = time.monotonic()
    assert inventory.discover_adb() == []
    assert time.monotonic() - t0 < 5


HOLDER = """
import json, os, sys, time
from pathlib import Path
from devicelab.pool import device_lock
lock_dir, name, out, hold, sync = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]), Path(sys.argv[5])
(sync / f"ready-{os.getpid()}").touch()
while not (sync / "go").exists():  # start together, so that one of two really meets the other's lock
    time.sleep(0.005)
with device_lock(Path(lock_dir), name) as waited:
    t0 = time.time()
    time.sleep(hold)
    t1 = time.time()
with open(out, "a") as f:
    f.write(json.dumps({"name": name, "start": t0, "end": t1, "waited": waited}) + "\\n")
"""


def test_one_benchmark_per_device_across_processes(tmp_path):
    locks, out = tmp_path / "locks", tmp_path / "holds.jsonl"
    script = tmp_path / "holder.py"
    script.write_text(HOLDER)

    sync = tmp_path / "sync"
    sync.mkdir()

    def spawn(name):
        return subprocess.Popen([sys.executable, str(script), str(locks), name, str(out), "0.6", str(sync)], cwd=REPO)

    procs = [spawn("aihub:Samsung Galaxy S24 (Family)"), spawn("aihub:Samsung Galaxy S24 (Family)"),
             spawn("s24-b")]
    t0 = time.monotonic()
    while len(list(sync.glob("ready-*"))) < 3 and time.monotonic() - t0 < 60:
        time.sleep(0.01)
    (sync / "go").touch()
    assert [p.wait(timeout=60) for p in procs] == [0, 0, 0]
    holds = [json.loads(line) for line in out.read_text().splitlines()]
    same = sorted((h for h in holds if h["name"].startswith("aihub")), key=lambda h: h["start"])
    assert len(same) == 2
    assert same[0]["end"] <= same[1]["start"]  # never two at once on one device
    assert max(h["waited"] for h in same) >= 0.3  # the second really waited for the first
    other = next(h for h in holds if h["name"] == "s24-b")
    assert other["waited"] < 0.3  # another device is not blocked by them
    # in-process: a held device times out with an error naming it
    with device_lock(locks, "s24-b"):
        proc = subprocess.run([sys.executable, "-c", "import sys; from pathlib import Path; "
                               "from devicelab.pool import device_lock\n"
                               "with device_lock(Path(sys.argv[1]), 's24-b', timeout=0.3): pass", str(locks)],
                              cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "DeviceBusy: device 's24-b' is busy with another benchmark" in proc.stderr
    with pytest.raises(DeviceBusy):
        with device_lock(locks, "x", timeout=0):
            with device_lock(locks, "x", timeout=0.1):
                pass


class RecordsOrder(HostDevice):
    """The host backend, noting which export each run measured (to check the interleaving)."""

    def __init__(self, name: str):
        super().__init__(name)
        self.order = []

    def run(self, prepared, workload):
        self.order.append((prepared.export.index["model"], workload.repeats, workload.warmup))
        return super().run(prepared, workload)


def test_variants_on_one_device_are_interleaved_not_back_to_back(export, tmp_path, capsys):
    slow = make_tiny_export(tmp_path / "slow", slow=True)
    dev = RecordsOrder("host")
    pool = Pool(_inv(tmp_path, [DeviceEntry("host", "host")]), devices={"host": dev})
    recs = pool.compare({"fast": export, "slow": slow}, "host", Workload(graph="prefill", repeats=12, warmup=2),
                        rounds=4)
    # 4 rounds of fast, slow; 3 timed runs each; the warm-up only in the first round
    first = [("tiny-qdq", 3, 2), ("tiny-qdq-slow", 3, 2)]
    assert dev.order == first + [("tiny-qdq", 3, 0), ("tiny-qdq-slow", 3, 0)] * 3
    assert [len(r.samples_ms) for r in recs.values()] == [12, 12]
    for label, rec in recs.items():
        assert rec.extra["variant"] == label and rec.workload.repeats == 12
        assert rec.median_ms == float(np.median(rec.samples_ms)) and rec.ci_low_ms <= rec.median_ms <= rec.ci_high_ms
        assert rec.extra["prefill_tok_s"] == pytest.approx(16 / (rec.median_ms / 1000))
    assert recs["slow"].median_ms > 3 * recs["fast"].median_ms
    # the command line: two exports are a comparison, with the ratio to the first
    devices = _devices_file(tmp_path)
    assert farm_main(["bench", str(export), str(slow), "--device", "host", "--graph", "prefill", "--repeats", "4",
                      "--rounds", "2", "--devices", str(devices)]) == 0
    text = capsys.readouterr().out
    assert "variant  exp" in text and "variant  slow" in text and "vs exp: median x" in text
