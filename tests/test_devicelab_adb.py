"""The ``adb`` backend end to end: adbutils -> the real adb server binary adbutils ships -> a phone.

No phone can exist here, so the phone is a PROTOCOL-LEVEL STAND-IN (tests/adb_standin.py): a loopback TCP
listener speaking the device side of the adb protocol (CNXN, OPEN/OKAY/WRTE/CLSE, shell v2, sync), which
the adb server reaches with ``adb connect 127.0.0.1:PORT`` as it reaches a phone over Wi-Fi. The runtime
pushed to it is a test script (tests/data/adb_runtime) that burns CPU for measured times and writes
qnn-profile-viewer / Genie profile output; the stand-in's battery draws more current while it runs. The
server runs on a port of its own (never 5037) with HOME in a test folder and is stopped with
``adb kill-server`` on that port.
"""

from __future__ import annotations

import json
import shutil
import struct
from contextlib import contextmanager
from pathlib import Path

import pytest

from devicelab import stats
from devicelab.backends.adb import AdbDevice, AdbOptions, parse_genie_profile, parse_profile_viewer
from devicelab.protocol import DeviceError, DeviceLost, Workload
from tests.adb_standin import SANDBOX, AdbServer, Phone, PhoneStandIn

DATA = Path(__file__).parent / "data"
MS_PER_INFERENCE = 20.0
RUN = dict(graph="prefill", prompt_len=128, warmup=1, repeats=5)


@pytest.fixture(scope="module")
def adb_server(tmp_path_factory):
    with AdbServer(tmp_path_factory.mktemp("adb-home")) as server:
        yield server


@pytest.fixture(scope="module")
def runtime_dir(tmp_path_factory):
    """The runtime folder pushed next to the model: the test runtime plus stand-ins for the QNN libraries."""
    rt = tmp_path_factory.mktemp("rt") / "qnn-runtime"
    shutil.copytree(DATA / "adb_runtime", rt)
    for lib in ("libQnnHtp.so", "libQnnHtpV75Stub.so", "libQnnHtpV75Skel.so", "libQnnSystem.so"):
        (rt / lib).write_bytes(b"\x7fELF stand-in for " + lib.encode())
    return rt


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """A compiled-model folder; its context binary's header tells the test runtime the cost per inference."""
    folder = tmp_path_factory.mktemp("model") / "compiled-sm8650"
    folder.mkdir()
    header = json.dumps({"ms_per_inference": MS_PER_INFERENCE, "graph": "qnn_model"}).encode() + b"\n"
    (folder / "prefill_qnn_model.bin").write_bytes(header + bytes(200_000))
    return folder


@contextmanager
def phone(server: AdbServer, root: Path, runtime: Path, knobs: Phone | None = None, **options):
    """A started stand-in, connected through the adb server, and the backend for it."""
    options = {"runtime_dir": runtime, "baseline_s": 0.4, "inferences_per_run": 5, "pull_dir": root / "pulled",
               "poll_s": 0.1, **options}
    with PhoneStandIn(root / "phone", knobs) as standin:
        serial = server.connect(standin)
        try:
            yield standin, AdbDevice(serial, name=f"s24-{root.name}", options=AdbOptions(**options),
                                     server=("127.0.0.1", server.port))
        finally:
            server.client().disconnect(standin.address)


def _logged_runs(standin: PhoneStandIn, prepared) -> list[dict]:
    out = standin.host_path(prepared.remote_dir) / "out"
    return [json.loads((out / f"run_{i}" / "qnn-profiling-data_0.log").read_text())
            for i in range(RUN["warmup"], RUN["warmup"] + RUN["repeats"])]


def _run_draw(standin: PhoneStandIn):
    runs = [d for d in standin.draws if "num_inferences" in d.command]
    assert len(runs) == 1
    return runs[0]


def test_profile_viewer_and_genie_parsers_read_the_sample_reports():
    """tests/data/qnn_profile_viewer.txt follows qnn-profile-viewer's layout (QNN SDK 2.22, the version the
    reference used; the reference's parser reads the same lines); tests/data/genie_profile.json follows
    genie-t2t-run --profile (the layout Qualcomm's qairt gen_ai_api and ai-hub-models parse)."""
    pv = parse_profile_viewer((DATA / "qnn_profile_viewer.txt").read_text())
    assert pv == {"init_us": 331158, "execute_avg_us": 21128, "execute_min_us": 20874, "execute_max_us": 22503}
    g = parse_genie_profile(json.loads((DATA / "genie_profile.json").read_text()))
    assert g == {"ttft_ms": 157.576, "tokens_per_s": 20.6121, "prompt_tokens": 128, "generated_tokens": 64}
    with pytest.raises(DeviceError, match="Execute Stats"):
        parse_profile_viewer("Init Stats:\n-----------\n    NetRun: 1 us\n")


def test_normal_run_latency_from_profiles_and_energy_from_drawn_current(adb_server, runtime_dir, compiled, tmp_path):
    """Protocol-level stand-in. Latency samples are the NetRun averages qnn-profile-viewer printed (checked
    against the runtime's own log, to the µs); power is within 5% of the excess current the stand-in drew
    times its voltage, energy per token within 5% of that power times the runtime's measured median over
    the prompt's tokens, and the run window's energy between 95% of what the stand-in's battery delivered
    above idle and that plus 0.3 s of the excess power (the window also holds adb's shell start-up)."""
    knobs = Phone()
    with phone(adb_server, tmp_path, runtime_dir, knobs) as (standin, dev):
        info = dev.info()
        assert (info.model, info.soc, info.os_build) == ("samsung SM-S928B", "SM8650", knobs.fingerprint)
        health = dev.health()
        assert health.online and health.battery_pct == 85 and health.temperature_c == 31.0
        assert health.charging is False and health.free_storage_bytes == knobs.free_bytes // 1024 * 1024

        prepared = dev.prepare(compiled)
        sent = {p.name for p in runtime_dir.iterdir()} | {"prefill_qnn_model.bin"}
        on_phone = standin.host_path(prepared.remote_dir)
        assert {p.name for p in on_phone.iterdir()} == sent
        for name in sent:  # bit-exact over adb sync
            src = runtime_dir / name if (runtime_dir / name).exists() else compiled / name
            assert (on_phone / name).read_bytes() == src.read_bytes()

        rec = dev.run(prepared, Workload(**RUN))

    logged = _logged_runs(standin, prepared)
    assert rec.samples_ms == [sum(r["execute_us"]) // len(r["execute_us"]) / 1000.0 for r in logged]
    assert all(len(r["execute_us"]) == 5 for r in logged)
    assert rec.median_ms == stats.median(rec.samples_ms)
    assert rec.ci_low_ms <= rec.median_ms <= rec.ci_high_ms
    assert MS_PER_INFERENCE * 0.96 <= rec.median_ms < MS_PER_INFERENCE * 3  # a busy loop only overshoots
    assert rec.device.runtime == "qnn-net-run" and rec.device.runtime_version == "2.22.6.240515"
    assert rec.device.soc == "SM8650" and rec.device.extra["android"] == "14"

    excess_mw = (knobs.active_ma - knobs.idle_ma) * knobs.voltage_v
    assert rec.power_mw == pytest.approx(excess_mw, rel=0.05)
    true_runtime_median = stats.median([sum(r["execute_us"]) / len(r["execute_us"]) / 1000.0 for r in logged])
    assert rec.energy_mj_per_token == pytest.approx(excess_mw * true_runtime_median / 1000.0 / 128, rel=0.05)
    assert rec.extra["power"]["current_unit"] == "uA"
    drawn = _run_draw(standin).energy_mj  # the window adds adb's shell start-up and tear-down, under 0.3 s
    assert 0.95 * drawn <= rec.extra["power"]["energy_window_mj"] <= drawn + 0.3 * excess_mw

    pulled = Path(rec.extra["pulled"]["dir"]) / "run_5" / "Result_0" / "logits.raw"
    assert pulled.read_bytes() == struct.pack("<64f", *[0.25 * k for k in range(64)])


def test_hot_phone_waits_for_cool_down_then_measures_in_ma(adb_server, runtime_dir, compiled, tmp_path):
    """Protocol-level stand-in. A phone at 43 °C cooling 4 °C/s with a 40 °C limit waits about 0.75 s
    (bounded by the 0.1 s poll) before running; this vendor writes current_now in mA, positive while
    discharging, and power still comes out within 5%. A phone that cannot cool within the timeout is refused
    with its temperature named, and nothing runs."""
    knobs = Phone(temperature_c=43.0, cooling_c_per_s=4.0, current_unit="mA", negative_discharge=False)
    with phone(adb_server, tmp_path / "a", runtime_dir, knobs, max_temp_c=40.0) as (standin, dev):
        prepared = dev.prepare(compiled)
        standin.heat(43.0)
        rec = dev.run(prepared, Workload(**RUN))
    assert rec.extra["temperature_c_start"] == pytest.approx(43.0, abs=0.3)
    assert rec.extra["temperature_c_run"] <= 40.0
    assert 0.6 <= rec.extra["cooldown_s"] <= 3.0
    assert rec.extra["power"]["current_unit"] == "mA"
    assert rec.power_mw == pytest.approx((knobs.active_ma - knobs.idle_ma) * knobs.voltage_v, rel=0.05)

    knobs = Phone(temperature_c=50.0, cooling_c_per_s=1.0)
    limits = dict(max_temp_c=40.0, cooldown_timeout_s=0.3)
    with phone(adb_server, tmp_path / "b", runtime_dir, knobs, **limits) as (standin, dev):
        prepared = dev.prepare(compiled)
        standin.heat(50.0)
        with pytest.raises(DeviceError, match=r"still 49\.\d °C after 0 s of cool-down \(limit max_temp_c 40\.0"):
            dev.run(prepared, Workload(**RUN))
        assert not [d for d in standin.draws if "num_inferences" in d.command]


def test_charging_phone_refuses_power_measurement(adb_server, runtime_dir, compiled, tmp_path):
    """Protocol-level stand-in. A phone charging over USB refuses a power measurement (its current_now reads
    the charger) with a message that names the phone and the way out; nothing runs. Without power
    measurement the same phone runs and the record carries no power. A phone at 12% battery is refused
    before anything runs."""
    with phone(adb_server, tmp_path, runtime_dir, Phone(charging=True)) as (standin, dev):
        assert dev.health().charging is True
        prepared = dev.prepare(compiled)
        with pytest.raises(DeviceError, match=rf"{dev.name}: charging over USB.*allow_charging"):
            dev.run(prepared, Workload(**RUN))
        assert not [d for d in standin.draws if "num_inferences" in d.command]
        rec = dev.run(prepared, Workload(**{**RUN, "measure_power": False}))
    assert rec.power_mw is None and rec.energy_mj_per_token is None and len(rec.samples_ms) == 5

    with phone(adb_server, tmp_path / "low", runtime_dir, Phone(battery_pct=12)) as (standin, dev):
        with pytest.raises(DeviceError, match=rf"{dev.name}: battery at 12%, below min_battery_pct 20%"):
            dev.ready_for_run(Workload(**RUN))


def test_storage_too_small_is_a_clear_error_and_pushes_nothing(adb_server, runtime_dir, compiled, tmp_path):
    """Protocol-level stand-in. 150 kB free for a 200 kB model: DeviceError with the phone's name, the bytes
    needed (model + runtime, exactly) and the bytes free (df's 1K blocks); the sandbox stays empty."""
    with phone(adb_server, tmp_path, runtime_dir, Phone(free_bytes=150_000)) as (standin, dev):
        needed = sum(p.stat().st_size for p in [*runtime_dir.iterdir(), *compiled.iterdir()])
        free = 150_000 // 1024 * 1024
        with pytest.raises(DeviceError) as err:
            dev.prepare(compiled)
        assert str(err.value) == (f"{dev.name}: not enough storage for the model and runtime: needs {needed} bytes "
                                  f"in /data/local/tmp, {free} bytes free (serial {dev.serial})")
        assert list(standin.host_path(SANDBOX).rglob("*")) == []


def test_phone_that_drops_mid_run_raises_device_lost(adb_server, runtime_dir, compiled, tmp_path):
    """Protocol-level stand-in. The phone leaves the network 0.5 s into the run (its port closes, as when it
    walks out of Wi-Fi): the run raises DeviceLost naming the phone, within seconds, not a hang."""
    knobs = Phone(disconnect_after_s=0.5, disconnect_match="num_inferences")
    with phone(adb_server, tmp_path, runtime_dir, knobs) as (standin, dev):
        prepared = dev.prepare(compiled)
        with pytest.raises(DeviceLost, match=rf"{dev.name}: lost while trying to run qnn-net-run"):
            dev.run(prepared, Workload(**{**RUN, "repeats": 40}))
        assert standin.disconnected.is_set()
        draw = _run_draw(standin)
        assert draw.end - draw.start == pytest.approx(0.5, abs=0.3)


def test_discover_adb_lists_connected_phones_and_nothing_without_a_server(adb_server, runtime_dir, tmp_path,
                                                                         monkeypatch):
    """Protocol-level stand-in. discover_adb lists the phones the adb server at $ANDROID_ADB_SERVER_PORT
    has, with their SoC; a port with no server gives an empty list, not an exception (and starts nothing)."""
    from devicelab.inventory import discover_adb
    from tests.adb_standin import _free_port

    with phone(adb_server, tmp_path, runtime_dir) as (standin, dev):
        monkeypatch.setenv("ANDROID_ADB_SERVER_PORT", str(adb_server.port))
        found = discover_adb()
        assert [(e.name, e.kind, e.source, e.options["serial"], e.options["soc"]) for e in found] == [
            (standin.address, "adb", "adb", standin.address, "SM8650")]
    port = _free_port()
    monkeypatch.setenv("ANDROID_ADB_SERVER_PORT", str(port))
    assert discover_adb() == []
    from devicelab.inventory import _server_listening

    assert not _server_listening("127.0.0.1", port)


def test_phone_lost_mid_run_is_retried_on_a_second_phone_through_the_pool(adb_server, runtime_dir, compiled,
                                                                          tmp_path):
    """Protocol-level stand-ins, two of them. Through the pool (devicelab.pool): the first workload is
    measured on phone-a; phone-a drops 0.3 s into the second one, which becomes a failed record naming
    phone-a and is measured again on phone-b; the first record is kept as it was. Tokens per prefill
    sample come from the export's compiled prompt length."""
    from devicelab.inventory import DeviceEntry, Inventory
    from devicelab.pool import Pool

    export = tmp_path / "export"
    export.mkdir()
    (export / "export.json").write_text(json.dumps({"exporter": "mqfarm-onnx", "exporter_version": 1,
                                                    "content_hash": "c0ffee",
                                                    "graphs": {"prefill": {"prompt_len": 64}}}))
    shutil.copytree(compiled, export / compiled.name)
    first, second = Workload(**RUN), Workload(**{**RUN, "warmup": 2, "repeats": 8})  # the loop runs `seq 0 9`
    knobs_a = Phone(disconnect_after_s=0.3, disconnect_match=r"seq 0 9\b")
    with phone(adb_server, tmp_path / "a", runtime_dir, knobs_a) as (sa, a), \
            phone(adb_server, tmp_path / "b", runtime_dir, Phone(seed=1)) as (sb, b):
        entries = [DeviceEntry("phone-a", "adb", {"serial": a.serial}),
                   DeviceEntry("phone-b", "adb", {"serial": b.serial})]
        a.name, b.name = "phone-a", "phone-b"
        events = []
        pool = Pool(Inventory(entries, None, tmp_path / "locks"), devices={"phone-a": a, "phone-b": b},
                    on_event=events.append)
        res = pool.bench(export, "adb", [first, second])
        assert sa.disconnected.is_set() and not sb.disconnected.is_set()
    assert res.ok and res.device == "phone-b"
    assert [(r.device.name, r.workload.repeats, r.status, len(r.samples_ms)) for r in res.records] == [
        ("phone-a", 5, "ok", 5), ("phone-b", 8, "ok", 8)]
    assert all(r.model_id == "c0ffee" and r.power_mw > 0 for r in res.records)
    # the compiled graph's prompt length (export.json) counts the tokens, not the workload's 128
    assert all(r.extra["tokens_per_sample"] == 64 for r in res.records)
    assert all(r.energy_mj_per_token == pytest.approx(r.power_mw * r.median_ms / 1000 / 64) for r in res.records)
    (lost,) = res.failed
    assert (lost.status, lost.device.name, lost.device.soc, lost.workload.repeats) == ("failed", "phone-a", "SM8650", 8)
    assert lost.error.startswith("device lost: phone-a: lost while trying to run qnn-net-run")
    assert any("retrying on another adb device" in e for e in events)


def test_genie_decode_tokens_per_second_and_energy_per_token(adb_server, tmp_path):
    """Protocol-level stand-in running the test genie-t2t-run: decode samples are 1000 / the
    token-generation-rate of each --profile JSON (read back from the phone's sandbox), tokens/s their
    median, TTFT kept per run, and energy per token within 5% of the stand-in's excess power x ms/token."""
    rt = tmp_path / "genie-rt"
    rt.mkdir()
    shutil.copy(DATA / "adb_runtime" / "genie-t2t-run", rt)
    (rt / "libGenie.so").write_bytes(b"\x7fELF stand-in for libGenie.so")
    model = tmp_path / "compiled-genie"
    model.mkdir()
    (model / "genie_config.json").write_text(json.dumps({"model": "llm.bin", "num_generate": 12}))
    (model / "llm.bin").write_bytes(json.dumps({"ms_per_prompt_token": 0.5, "ms_per_token": 25.0}).encode() + b"\n")
    knobs = Phone()
    with phone(adb_server, tmp_path, rt, knobs) as (standin, dev):
        prepared = dev.prepare(model)
        assert prepared.runtime == "genie-t2t-run" and prepared.runtime_version == "2.22.6.240515"
        rec = dev.run(prepared, Workload(graph="decode", prompt_len=32, warmup=1, repeats=4))
        out = standin.host_path(prepared.remote_dir) / "out"
        profiles = [json.loads((out / f"profile_{i}.json").read_text()) for i in range(1, 5)]
    queries = [p["components"][0]["events"][1] for p in profiles]
    rates = [q["token-generation-rate"]["value"] for q in queries]
    assert rec.samples_ms == [1000.0 / r for r in rates]
    assert rec.tokens_per_s == stats.median(rates)
    assert rec.extra["ttft_ms"] == [q["time-to-first-token"]["value"] / 1000.0 for q in queries]
    assert rec.extra["generated_tokens"] == [12] * 4 and rec.extra["tokens_per_sample"] == 1
    assert 25.0 <= rec.median_ms < 50.0
    excess_mw = (knobs.active_ma - knobs.idle_ma) * knobs.voltage_v
    assert rec.energy_mj_per_token == pytest.approx(excess_mw * stats.median(rec.samples_ms) / 1000.0, rel=0.05)


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
