"""The ``adb`` backend's transport, state and parsers: adbutils -> the real adb server binary adbutils ships
-> a phone.

No phone can exist here, so the phone is a PROTOCOL-LEVEL STAND-IN (tests/adb_standin.py): a loopback TCP
listener speaking the device side of the adb protocol (CNXN, OPEN/OKAY/WRTE/CLSE, shell v2, sync), which
the adb server reaches with ``adb connect 127.0.0.1:PORT`` as it reaches a phone over Wi-Fi. The server
runs on a port of its own (never 5037) with HOME in a test folder and is stopped with ``adb kill-server``
on that port. The measured phone path itself (inputs, blocks, energy, outputs, refusals) is
tests/test_devicelab_phone.py.
"""

from __future__ import annotations

import json
import shutil
from contextlib import contextmanager
from pathlib import Path

import pytest

from devicelab import power
from devicelab.backends.adb import AdbDevice, AdbOptions
from devicelab.genie import parse_genie_profile
from devicelab.protocol import DeviceError, DeviceLost, Workload
from devicelab.qnn_sdk import parse_profile_csv, parse_profile_viewer
from tests.adb_standin import SANDBOX, AdbServer, Phone, PhoneStandIn
from tests.devicelab_fixtures import compiled_tiny_export, qnn_sdk_root

DATA = Path(__file__).parent / "data"
RUN = dict(graph="prefill", warmup=1, repeats=5, measure_power=False)


@pytest.fixture(scope="module")
def adb_server(tmp_path_factory):
    with AdbServer(tmp_path_factory.mktemp("adb-home")) as server:
        yield server


@pytest.fixture(scope="module")
def sdk(tmp_path_factory):
    return qnn_sdk_root(tmp_path_factory.mktemp("qairt") / "sdk")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return compiled_tiny_export(tmp_path_factory.mktemp("tiny") / "export")


@contextmanager
def phone(server: AdbServer, root: Path, runtime: Path, knobs: Phone | None = None, exports=(), ms=20.0, **options):
    options = {"runtime_dir": runtime, "baseline_s": 0.2, "pull_dir": root / "pulled", "poll_s": 0.1, **options}
    with PhoneStandIn(root / "phone", knobs) as standin:
        for e in exports:
            standin.register_export(e, ms_per_inference=ms)
        serial = server.connect(standin)
        try:
            yield standin, AdbDevice(serial, name=f"s24-{root.name}", options=AdbOptions(**options),
                                     server=("127.0.0.1", server.port), progress=lambda s: None)
        finally:
            server.client().disconnect(standin.address)


def test_profile_viewer_and_genie_parsers_read_the_sample_reports():
    """tests/data/qnn_profile_viewer.txt follows qnn-profile-viewer's layout (QNN SDK 2.22, the version the
    reference used); tests/data/genie_profile.json follows genie-t2t-run --profile (the layout Qualcomm's
    qairt gen_ai_api and ai-hub-models parse). The numbers in both are plausible ones written for this
    project."""
    pv = parse_profile_viewer((DATA / "qnn_profile_viewer.txt").read_text())
    assert pv == {"init_us": 331158, "finalize_us": 256372, "deinit_us": 15810, "execute_avg_us": 21128,
                  "execute_min_us": 20874, "execute_max_us": 22503}
    g = parse_genie_profile(json.loads((DATA / "genie_profile.json").read_text()))
    assert g == {"ttft_ms": 157.576, "tokens_per_s": 20.6121, "prompt_tokens": 128, "generated_tokens": 64}
    with pytest.raises(DeviceError, match="Execute Stats"):
        parse_profile_viewer("Init Stats:\n-----------\n    NetRun: 1 us\n")
    csv = "Time,Identifier,Message,Value,Unit\n0,init,NetRun,5,us\n1,execute,NetRun,21000,us\n2,execute,NetRun,20500,us\n"
    assert parse_profile_csv(csv) == [21000, 20500]


def _gauge(period, values_ma, volts=3.95, reads_per_period=4, t0=100.0, unit="uA", sign=-1):
    """Reads of a gauge that holds each value for one period (µA, negative: Pixel-style)."""
    out = []
    for k, v in enumerate(values_ma):
        for r in range(reads_per_period):
            cur = sign * v * (1000 if unit == "uA" else 1)
            out.append(power.Sample(t0 + (k + r / reads_per_period) * period, cur, volts * 1e6))
    return out


def test_excess_power_from_gauge_updates_units_and_refusals():
    """Pure arithmetic on a synthetic gauge: 1 s period, each update the average of the second before it;
    idle 180 mA, 1150 mA during an execute phase of [106, 126] s (so the updates at 107..126), idle after;
    excess power is (1150 - 180) x 3.95 mW exactly in either unit and sign, the period is measured, and a
    window that holds fewer than 10 updates (or a gauge that never moves) refuses energy by name."""
    rng = __import__("numpy").random.default_rng(0)
    vals = [180 + rng.uniform(-1, 1) for _ in range(7)] + [1150 + rng.uniform(-1, 1) for _ in range(20)] + \
        [180 + rng.uniform(-1, 1) for _ in range(6)]
    for unit, sign in (("uA", -1), ("mA", 1)):
        s = _gauge(1.0, vals, unit=unit, sign=sign)
        p = power.excess_power(s, (106.0, 126.0), [(100.0, 106.0), (126.0, 132.0)], lag_periods=1.0)
        assert p["current_unit"] == unit and p["gauge_period_s"] == pytest.approx(1.0)
        assert p["power_mw"] == pytest.approx(970 * 3.95, rel=0.01) and p["updates_used"] >= 10
    with pytest.raises(power.EnergyRefused, match=r"updated 5 times .* fewer than 10: its period is 1 s"):
        power.excess_power(s, (106.0, 112.0), [(100.0, 106.0), (126.0, 132.0)], lag_periods=1.0)
    with pytest.raises(power.EnergyRefused, match="did not update"):
        power.excess_power(_gauge(1.0, [180.0]), (100.0, 100.5), [(100.0, 100.5)])
    lo, hi = power.execute_window(10.0, 20.0, init_s=1.0, deinit_s=0.5, execute_s=8.0)
    assert (lo, hi) == pytest.approx((11.5, 19.0))


def test_hot_phone_waits_for_cool_down_and_low_battery_is_refused(adb_server, sdk, tmp_path):
    """A phone at 43 °C cooling 4 °C/s with a 40 °C limit waits about 0.75 s (bounded by the 0.1 s poll);
    one that cannot cool within the timeout is refused naming its temperature; 12% battery is refused."""
    with phone(adb_server, tmp_path / "a", sdk, Phone(temperature_c=43.0, cooling_c_per_s=4.0), max_temp_c=40.0) as (
            standin, dev):
        standin.heat(43.0)
        checks = dev.ready_for_run(Workload(**RUN))
    assert checks["temperature_c_start"] == pytest.approx(43.0, abs=0.3) and 0.6 <= checks["cooldown_s"] <= 3.0
    limits = dict(max_temp_c=40.0, cooldown_timeout_s=0.3)
    with phone(adb_server, tmp_path / "b", sdk, Phone(temperature_c=50.0, cooling_c_per_s=1.0), **limits) as (
            standin, dev):
        standin.heat(50.0)
        with pytest.raises(DeviceError, match=r"still 49\.\d °C after 0 s of cool-down \(limit max_temp_c 40\.0"):
            dev.ready_for_run(Workload(**RUN))
    with phone(adb_server, tmp_path / "low", sdk, Phone(battery_pct=12)) as (standin, dev):
        with pytest.raises(DeviceError, match=rf"{dev.name}: battery at 12%, below min_battery_pct 20%"):
            dev.ready_for_run(Workload(**RUN))


def test_storage_too_small_counts_outputs_and_pushes_nothing(adb_server, sdk, tiny, tmp_path):
    """Free space for the runtime and model but not for the outputs the run will write: refused with the
    bytes needed (outputs named) and free, before anything is pushed."""
    with phone(adb_server, tmp_path, sdk, Phone(free_bytes=150_000), exports=[tiny]) as (standin, dev):
        with pytest.raises(DeviceError, match=r"not enough storage: needs \d+ bytes in /data/local/tmp \(model, runtime, "
                                              r"inputs and \d+ bytes of outputs\), 149504 bytes free"):
            dev.prepare(tiny)
        assert list(standin.host_path(SANDBOX).rglob("*.bin")) == []


def test_phone_that_drops_mid_run_raises_device_lost(adb_server, sdk, tiny, tmp_path):
    """The phone leaves the network 0.5 s into the run (its port closes, as when it walks out of Wi-Fi): the
    run raises DeviceLost naming the phone, within seconds, not a hang."""
    knobs = Phone(disconnect_after_s=0.5, disconnect_match="num_inferences")
    with phone(adb_server, tmp_path, sdk, knobs, exports=[tiny], ms=50.0) as (standin, dev):
        prepared = dev.prepare(tiny)
        with pytest.raises(DeviceLost, match=rf"{dev.name}: lost while trying to prefill"):
            dev.run(prepared, Workload(**{**RUN, "repeats": 60}))
        assert standin.disconnected.is_set()


def test_discover_adb_lists_connected_phones_and_nothing_without_a_server(adb_server, sdk, tmp_path, monkeypatch):
    """discover_adb lists the phones the adb server at $ANDROID_ADB_SERVER_PORT has, with their SoC; a port
    with no server gives an empty list, not an exception (and starts nothing)."""
    from devicelab.inventory import _server_listening, discover_adb
    from tests.adb_standin import _free_port

    with phone(adb_server, tmp_path, sdk) as (standin, dev):
        monkeypatch.setenv("ANDROID_ADB_SERVER_PORT", str(adb_server.port))
        found = discover_adb()
        assert [(e.name, e.kind, e.source, e.options["serial"], e.options["soc"]) for e in found] == [
            (standin.address, "adb", "adb", standin.address, "SM8650")]
    port = _free_port()
    monkeypatch.setenv("ANDROID_ADB_SERVER_PORT", str(port))
    assert discover_adb() == []
    assert not _server_listening("127.0.0.1", port)


def test_phone_lost_mid_run_is_retried_on_a_second_phone_through_the_pool(adb_server, sdk, tiny, tmp_path):
    """Two stand-ins through the pool: the first workload is measured on phone-a; phone-a drops 0.3 s into
    the second (9 inferences), which becomes a failed record naming phone-a and is measured again on
    phone-b; the first record is kept as it was."""
    from devicelab.inventory import DeviceEntry, Inventory
    from devicelab.pool import Pool

    first, second = Workload(**RUN), Workload(**{**RUN, "warmup": 1, "repeats": 8})
    knobs_a = Phone(disconnect_after_s=0.3, disconnect_match=r"--num_inferences=9\b")
    with phone(adb_server, tmp_path / "a", sdk, knobs_a, exports=[tiny], ms=60.0) as (sa, a), \
            phone(adb_server, tmp_path / "b", sdk, Phone(seed=1), exports=[tiny]) as (sb, b):
        entries = [DeviceEntry("phone-a", "adb", {"serial": a.serial}), DeviceEntry("phone-b", "adb", {"serial": b.serial})]
        a.name = a.phone.name = "phone-a"
        b.name = b.phone.name = "phone-b"
        events = []
        pool = Pool(Inventory(entries, None, tmp_path / "locks"), devices={"phone-a": a, "phone-b": b},
                    on_event=events.append)
        res = pool.bench(tiny, "adb", [first, second])
        assert sa.disconnected.is_set() and not sb.disconnected.is_set()
    assert res.ok and res.device == "phone-b"
    assert [(r.device.name, r.workload.repeats, r.status, len(r.samples_ms)) for r in res.records] == [
        ("phone-a", 5, "ok", 5), ("phone-b", 8, "ok", 8)]
    assert all(r.extra["tokens_per_sample"] == 16 for r in res.records)  # the compiled prompt length
    (lost,) = res.failed
    assert (lost.status, lost.device.name, lost.device.soc, lost.workload.repeats) == ("failed", "phone-a", "SM8650", 8)
    assert lost.error.startswith("device lost: phone-a: lost while trying to prefill")
    assert any("retrying on another adb device" in e for e in events)


def test_genie_decode_tokens_per_second(adb_server, tmp_path):
    """The test genie-t2t-run: decode samples are 1000 / the token-generation-rate of each --profile JSON
    (read back from the phone's sandbox), tokens/s their median, TTFT kept per run; Genie runs are not
    split into execute phases, so energy is refused with that reason."""
    rt = tmp_path / "genie-rt"
    rt.mkdir()
    shutil.copy(DATA / "adb_runtime" / "genie-t2t-run", rt)
    (rt / "libGenie.so").write_bytes(b"\x7fELF stand-in for libGenie.so")
    model = tmp_path / "compiled-genie"
    model.mkdir()
    (model / "genie_config.json").write_text(json.dumps({"model": "llm.bin", "num_generate": 12}))
    (model / "llm.bin").write_bytes(json.dumps({"ms_per_prompt_token": 0.5, "ms_per_token": 25.0}).encode() + b"\n")
    with phone(adb_server, tmp_path, rt) as (standin, dev):
        prepared = dev.prepare(model)
        assert prepared.runtime == "genie-t2t-run" and prepared.runtime_version == "2.22.6"
        rec = dev.run(prepared, Workload(graph="decode", prompt_len=32, warmup=1, repeats=4))
        out = standin.host_path(prepared.remote_dir) / "out"
        profiles = [json.loads((out / f"profile_{i}.json").read_text()) for i in range(1, 5)]
    queries = [p["components"][0]["events"][1] for p in profiles]
    rates = [q["token-generation-rate"]["value"] for q in queries]
    assert rec.samples_ms == [1000.0 / r for r in rates]
    assert rec.extra["ttft_ms"] == [q["time-to-first-token"]["value"] / 1000.0 for q in queries]
    assert rec.extra["generated_tokens"] == [12] * 4 and 25.0 <= rec.median_ms < 50.0
    assert rec.energy_mj_per_token is None and "not split into execute phases" in rec.extra["energy"]["refused"]


def test_standin_speaks_adb_to_the_real_adb_client(adb_server, tmp_path):
    """The stand-in itself, through the adb command-line client (not adbutils): `adb devices -l` lists it
    with its model, `adb shell` returns the command's exit code and stderr (shell v2), `adb push` and a
    folder `adb pull` round-trip 300 kB bit-exactly, and the client used the v2 sync requests our features
    offer (STA2, LIS2, RCV2, and SND2 for a file over one sync packet; small files go as v1 SEND)."""
    payload = bytes(range(256)) * 1200
    (tmp_path / "blob.bin").write_bytes(payload)
    with PhoneStandIn(tmp_path / "phone") as standin:
        serial = adb_server.connect(standin)
        try:
            listed = adb_server.cli("devices", "-l").stdout
            assert f"{serial}" in listed and "model:SM_S928B" in listed and "device:e3q" in listed
            sh = adb_server.cli("-s", serial, "shell", "getprop ro.soc.model; echo oops >&2; exit 7")
            assert (sh.returncode, sh.stdout, sh.stderr) == (7, "SM8650\n", "oops\n")
            push = adb_server.cli("-s", serial, "push", str(tmp_path / "blob.bin"), f"{SANDBOX}/x/blob.bin")
            assert push.returncode == 0, push.stderr
            assert standin.host_path(f"{SANDBOX}/x/blob.bin").read_bytes() == payload
            pull = adb_server.cli("-s", serial, "pull", f"{SANDBOX}/x", str(tmp_path / "back"))
            assert pull.returncode == 0, pull.stderr
            assert (tmp_path / "back" / "blob.bin").read_bytes() == payload
            bad = adb_server.cli("-s", serial, "push", str(tmp_path / "blob.bin"), f"{SANDBOX}/y/")
            assert bad.returncode == 1 and "couldn't create file: Is a directory" in bad.stderr
            assert {"STA2", "LIS2", "RCV2", "SND2"} <= set(standin.sync_requests)
        finally:
            adb_server.client().disconnect(standin.address)
