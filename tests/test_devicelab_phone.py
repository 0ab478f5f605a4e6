"""The whole phone path: a compiled export measured and scored on a phone, through the real adb server.

No phone can exist here. The phone is tests/adb_standin.py (the device side of the adb protocol on
loopback, reached by the real adb server with ``adb connect``) and its QNN runtime is the strict test
qnn-net-run (tests/data/adb_runtime/qnn-net-run), which refuses what the SDK documents the real one
refusing and computes a context binary's real outputs by running the export graph it was compiled from
on onnxruntime's CPU. The context binaries are real: onnxruntime-qnn's HTP compiler built them.

The fuel gauge of the stand-in updates every 0.05 s and reports one period late (real gauges: about 1 s);
with the same rule (10 updates inside the execute phase) the tests need 0.65 s of execute, not 13 s.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from devicelab import net_inputs, preflight
from devicelab.backends.adb import AdbDevice, AdbOptions
from devicelab.exported import read_export
from devicelab.protocol import DeviceError, Workload
from tests.adb_standin import AdbServer, Phone, PhoneStandIn
from tests.devicelab_fixtures import compiled_tiny_export, qnn_sdk_root


@pytest.fixture(scope="module")
def adb_server(tmp_path_factory):
    with AdbServer(tmp_path_factory.mktemp("adb-home")) as server:
        yield server


@pytest.fixture(scope="module")
def sdk(tmp_path_factory):
    return qnn_sdk_root(tmp_path_factory.mktemp("qairt") / "2.51.0.260929")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return compiled_tiny_export(tmp_path_factory.mktemp("tiny") / "export")


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    """SmolLM2-135M cut to 2 layers, W8A8 under the device table (RTN), 32-token prompt, compiled for SM8650
    through the qnn-sdk route (the SDK's host tools are the stand-ins of tests/data/qnn_sdk_host, calibrated
    with the artifact's own calibration windows); and 3 windows of the evaluation corpus.

    The qnn-sdk route also holds the converter's contract against SmolLM2's own encodings (every key a
    tensor of the float graph, quantization requested). The ort route compiles this graph too (20 s at
    commit 74cea17), but in this tree onnxruntime-qnn 2.7.0 (QNN 2.51) has also failed it at finalize with
    QNN_COMMON_ERROR_MEM_ALLOC, so a test on it would pass or fail with the export of the day."""
    from devicelab.compile import compile_export
    from quant import CalibConfig, data, load_model, quantize
    from quant.export import export_model
    from tests.devicelab_fixtures import sdk_host_tools

    lm = load_model("smollm2-135m", num_layers=2)
    res = quantize(lm, scheme="w8a8:device", method="rtn", calib=CalibConfig(4, 32, 0), progress=False)
    root = tmp_path_factory.mktemp("smol")
    out = export_model(lm.model, lm.tokenizer, root / "export", res.recipe, prefill=32, ctx=64)
    calib = data.calibration_windows(lm.tokenizer, 4, 32, 0, add_bos=lm.add_bos).numpy()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PATH", f"{sdk_host_tools(root / 'bin')}:{os.environ['PATH']}")
        compile_export(out, "sm8650", graphs=("prefill",), route="qnn-sdk", calibration=calib, progress=False)
    windows = data.eval_windows(lm.tokenizer, 32, limit=3, add_bos=lm.add_bos).numpy()
    return out, windows


@contextmanager
def phone(server, root: Path, sdk: Path, knobs: Phone | None = None, exports=(), ms=20.0, load_ms=50.0, **options):
    options = {"runtime_dir": sdk, "baseline_s": 0.4, "sample_interval_s": 0.005, "pull_dir": root / "pulled",
               "poll_s": 0.1, **options}
    with PhoneStandIn(root / "phone", knobs) as standin:
        for e in exports:
            standin.register_export(e, ms_per_inference=ms, load_ms=load_ms)
        serial = server.connect(standin)
        try:
            yield standin, AdbDevice(serial, name=f"s24-{root.name}", options=AdbOptions(**options),
                                     server=("127.0.0.1", server.port), progress=lambda s: None)
        finally:
            server.client().disconnect(standin.address)


def _netruns(standin):
    """qnn-net-run processes that loaded a context (each logs its load phase)."""
    return [p for p in standin.phases() if p[0] == "load"]


@pytest.mark.slow
def test_bench_and_eval_on_a_compiled_smollm2_w8a8(adb_server, sdk, smol, tmp_path, capsys):
    """`farm eval EXPORT --device s24` and `farm bench EXPORT --device s24` through the command line, the
    devices file and the real adb server. Inputs have exactly the graph's sizes (float32 raw, 4 x numel,
    as qnn-net-run reads them by default) and one input-list line per window of real text; a bench block
    is ONE qnn-net-run process (the first inference left out, the context load its own metric); the
    logits pulled back from the phone agree with onnxruntime's CPU on the same export at top-1 >= 99% and
    give the same perplexity on those windows."""
    from farm.cli.app import main

    export, windows = smol
    exp = read_export(export)
    # down_proj's 16-bit input has a tensor of its own in the graph and in the encodings (the converter
    # stand-in refused any key that is no tensor of the float graph), and the compile asked for quantization
    enc = json.loads((export / "prefill.encodings").read_text())["activation_encodings"]
    entry = enc["model.layers.0.mlp.down_proj.input"]
    assert (entry[0] if isinstance(entry, list) else entry)["bitwidth"] == 16
    comp = json.loads((export / "compiled-sm8650" / "compile.json").read_text())
    assert comp["graphs"]["prefill"]["quantization"]["mode"] == "calibrate"
    with phone(adb_server, tmp_path, sdk, exports=[export], ms=5.0) as (standin, dev):
        (tmp_path / "devices.yaml").write_text(json.dumps({
            "phones": [{"name": "s24", "serial": standin.address, "soc": "SM8650", "runtime_dir": str(sdk),
                        "baseline_s": 0.3}], "lock_dir": str(tmp_path / "locks")}))
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("ANDROID_ADB_SERVER_PORT", str(adb_server.port))
            mp.setenv("MQFARM_DEVICES", str(tmp_path / "devices.yaml"))
            assert main(["eval", str(export), "--device", "s24", "--limit", "3", "--json"]) == 0
            result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
            assert len(_netruns(standin)) == 1  # the three windows in one process
            assert main(["bench", str(export), "--device", "s24", "--graph", "prefill", "--repeats", "6",
                         "--warmup", "1", "--json"]) == 0
            bench = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
            assert len(_netruns(standin)) == 2  # one more for the whole bench block
        prepared = dev.prepare(export, windows=windows)  # what the CLI pushed: same windows, same files
        on_phone = standin.host_path(prepared.remote_dir)
        gi = prepared.inputs["prefill"]
        assert gi.lines == 3 and len((on_phone / gi.list_file).read_text().splitlines()) == 3
        for f in gi.files:
            name = f.split("_", 2)[2].removesuffix(".raw")
            spec = next(s for s in exp.graph("prefill").inputs if s["name"] == name)
            assert (on_phone / f).stat().st_size == int(np.prod(spec["shape"])) * 4 == net_inputs.expected_bytes(spec)
        first = np.fromfile(on_phone / gi.files[0], dtype="<f4")
        assert np.array_equal(first.astype(np.int64), windows[0])  # real token ids, not zeros
    assert result["device"] == "s24" and result["windows"] == 3 and result["positions"] == 96
    assert result["top1_agreement"] >= 0.99
    assert result["ppl_device"] == pytest.approx(result["ppl_cpu"], rel=1e-3)
    assert result["mean_abs_logit_diff"] < 1e-3
    x = bench["extra"]
    assert len(bench["samples_ms"]) == 6 and x["inferences"] == 7 and x["left_out"] == 1 and x["processes"] == 1
    assert x["context_load_ms"] > 0 and x["built_by_qnn"] == "2.51.0" and bench["device"]["runtime_version"] == "2.51.0"
    assert min(bench["samples_ms"]) >= 5.0 and "caller-given token ids" in x["inputs"]


def test_energy_over_execute_only_with_a_lagging_gauge(adb_server, sdk, tiny, tmp_path):
    """Gauge at 0.05 s, one period late; the context load draws 600 mA more (CPU and I/O) and must not be
    charged. Energy per token is within 10% of what the stand-in drew during execute alone, per token; the
    record keeps its uncertainty and the gauge period it measured (within 20% of the stand-in's real one). A block too short
    for 10 gauge updates keeps its latency and refuses energy by name."""
    knobs = Phone(noise=0.01)
    with phone(adb_server, tmp_path, sdk, knobs, exports=[tiny], ms=40.0, load_ms=400.0) as (standin, dev):
        prepared = dev.prepare(tiny)
        rec = dev.run(prepared, Workload(graph="prefill", warmup=1, repeats=50))
        drawn_per_token = standin.execute_energy_mj() / 51 / 16  # 51 inferences of a 16-token prompt
        energy = rec.extra["energy"]
        assert rec.energy_mj_per_token == pytest.approx(drawn_per_token, rel=0.10), energy
        # the period the backend measured from its reads is the stand-in's real update period
        assert energy["gauge_period_s"] == pytest.approx(float(np.median(np.diff(standin.gauge_times))), rel=0.2)
        assert energy["updates_used"] >= 10 and energy["energy_mj_per_token_se"] > 0
        excess_mw = (knobs.active_ma - knobs.idle_ma) * knobs.voltage_v
        assert rec.power_mw == pytest.approx(excess_mw, rel=0.10)

        short = dev.run(prepared, Workload(graph="prefill", warmup=1, repeats=3))
    assert short.energy_mj_per_token is None and short.power_mw is None and len(short.samples_ms) == 3
    assert "fewer than 10" in short.extra["energy"]["refused"] and "its period is" in short.extra["energy"]["refused"]
    import io

    from farm.cli.device_cmds import print_record

    printed = []
    for r in (rec, short):
        buf = io.StringIO()
        print_record(r, buf)
        printed.append(buf.getvalue())
    assert f"energy   {rec.energy_mj_per_token:.3g} +- " in printed[0] and "context  loads in" in printed[0]
    assert "energy   none: the fuel gauge updated" in printed[1]


def test_unreadable_battery_nodes_keep_latency_and_refuse_energy(adb_server, sdk, tiny, tmp_path):
    with phone(adb_server, tmp_path, sdk, Phone(sysfs_readable=False), exports=[tiny]) as (standin, dev):
        prepared = dev.prepare(tiny)
        rec = dev.run(prepared, Workload(graph="decode", warmup=1, repeats=4))
        checks = {c.check: c for c in preflight.run_checks(dev, tiny, cache_dir=tmp_path / "pf")}
    assert len(rec.samples_ms) == 4 and rec.tokens_per_s > 0
    assert rec.energy_mj_per_token is None and "Permission denied" in rec.extra["energy"]["refused"]
    assert not checks["battery nodes"].ok and "Permission denied" in checks["battery nodes"].detail


def test_refusals_name_the_fault_and_record_nothing(adb_server, sdk, tiny, tmp_path):
    """A context for another SoC, a runtime older than the binary, missing SDK files (named), a phone on USB
    charge: each a DeviceError naming the phone and the fault, and no qnn-net-run measured anything."""
    # a phone with an SM8550: the export has only compiled-sm8650
    with phone(adb_server, tmp_path / "soc", sdk, Phone(soc="SM8550"), exports=[tiny]) as (standin, dev):
        with pytest.raises(DeviceError, match=r"has no compiled-sm8550 folder for this phone's SoC SM8550 "
                                              r"\(has: compiled-sm8650\)"):
            dev.prepare(tiny)
        # forced onto the binary anyway: compile.json says soc_model 57, the phone is 43
        with pytest.raises(DeviceError, match="compiled for soc_model 57"):
            dev.prepare(tiny / "compiled-sm8650")
        assert not _netruns(standin)
    with phone(adb_server, tmp_path / "old", sdk, Phone(qnn_version="v2.22.6.240515"), exports=[tiny]) as (standin, dev):
        with pytest.raises(DeviceError, match=r"the phone's QNN runtime 2\.22\.6 is older than QNN 2\.51\.0, which "
                                              r"built compiled-sm8650/(prefill|decode)_qnn.bin"):
            dev.prepare(tiny)
        assert not _netruns(standin)
    broken = qnn_sdk_root(tmp_path / "broken-sdk", omit=("lib/hexagon-v75/unsigned/libQnnHtpV75Skel.so",
                                                         "lib/aarch64-android/libQnnSystem.so"))
    with phone(adb_server, tmp_path / "sdk", broken, exports=[tiny]) as (standin, dev):
        with pytest.raises(DeviceError, match=r"lacks lib/aarch64-android/libQnnSystem\.so, "
                                              r"lib/hexagon-v75/unsigned/libQnnHtpV75Skel\.so \(needed for HTP v75"):
            dev.prepare(tiny)
        assert list(standin.host_path("/data/local/tmp").rglob("*.bin")) == []
    with phone(adb_server, tmp_path / "usb", sdk, Phone(charging=True), exports=[tiny]) as (standin, dev):
        prepared = dev.prepare(tiny)
        with pytest.raises(DeviceError, match=rf"{dev.name}: charging over USB"):
            dev.run(prepared, Workload(graph="prefill", repeats=3))
        assert not _netruns(standin)
        checks = {c.check: c for c in preflight.run_checks(dev, tiny, cache_dir=tmp_path / "pf")}
        assert not checks["charging"].ok


def test_strict_net_run_refuses_what_the_sdk_refuses(adb_server, sdk, tiny, tmp_path):
    """The stand-in itself: no --input_list, a raw file of the wrong size, a relative ADSP_LIBRARY_PATH are
    refused; outputs are written only for the first --keep_num_outputs inferences, float32 unless
    --use_native_output_files."""
    with phone(adb_server, tmp_path, sdk, exports=[tiny]) as (standin, dev):
        prepared = dev.prepare(tiny)
        d = prepared.remote_dir
        base = (f"cd {d} && LD_LIBRARY_PATH={d} ADSP_LIBRARY_PATH={d} ./qnn-net-run --backend={d}/libQnnHtp.so "
                f"--retrieve_context={d}/{prepared.contexts['prefill']}")
        r = dev.shell(base, "run without an input list", check=False)
        assert r.returncode != 0 and "missing required argument --input_list" in r.stderr
        gi = prepared.inputs["prefill"]
        dev.shell(f"cd {d} && head -c 10 {gi.files[0]} > short.raw && echo input_ids:={d}/short.raw > short.txt",
                  "write a short input")
        r = dev.shell(f"{base} --input_list={d}/short.txt", "run a short input", check=False)
        assert r.returncode == 8 and "holds 10 bytes, the context's tensor [1, 16] (float32) takes 64" in r.stderr
        r = dev.shell(f"cd {d} && LD_LIBRARY_PATH={d} ADSP_LIBRARY_PATH=. ./qnn-net-run --backend={d}/libQnnHtp.so "
                      f"--retrieve_context={d}/{prepared.contexts['prefill']} --input_list={d}/{gi.list_file}",
                      "run with a relative ADSP_LIBRARY_PATH", check=False)
        assert r.returncode == 6 and "libQnnHtpV75Skel.so not found in the absolute folders" in r.stderr
        # outputs only as the flags say: 3 inferences, 2 kept; native uint8 K/V with --use_native_output_files
        ok = (f"{base.replace('ADSP_LIBRARY_PATH=' + d, 'ADSP_LIBRARY_PATH=' + repr(d + ';/dsp'))} "
              f"--input_list={d}/{gi.list_file} --num_inferences=3 --keep_num_outputs=2 --output_dir={d}/o")
        dev.shell(ok, "run 3 inferences, keep 2")
        dev.shell(ok.replace(f"{d}/o", f"{d}/n") + " --use_native_output_files", "run with native outputs")
        o, n = standin.host_path(f"{d}/o"), standin.host_path(f"{d}/n")
        assert sorted(p.name for p in o.glob("Result_*")) == ["Result_0", "Result_1"]
        assert {p.name: p.stat().st_size for p in (o / "Result_0").iterdir()} == {
            "logits.raw": 16 * 512 * 4, "k_out.raw": 16 * 32 * 4, "v_out.raw": 16 * 32 * 4}
        assert (n / "Result_0" / "k_out.raw").stat().st_size == 16 * 32  # uint8, as the graph writes it
        # other windows of the same size are pushed again, not taken for the ones already there
        again = dev.prepare(tiny, windows=np.full((1, 16), 7))
        raw = standin.host_path(f"{again.remote_dir}/{again.inputs['prefill'].files[0]}")
        assert np.array_equal(np.fromfile(raw, dtype="<f4"), np.full(16, 7.0, np.float32))


def test_preflight_passes_on_a_ready_phone(adb_server, sdk, tiny, tmp_path, capsys):
    """Every check on a ready phone, the known graph (y = x + 1, a real context binary compiled here for
    the phone's SoC) run on it and its output checked."""
    cache = tmp_path / "pf"
    folder, rec = preflight.compile_known(cache, "SM8650")
    with phone(adb_server, tmp_path, sdk, exports=[tiny]) as (standin, dev):
        standin.register_context(rec["sha256"], {"onnx": rec["onnx"], "soc_model": "57", "htp_arch": "75",
                                                 "qnn_version": rec["qnn_version"],
                                                 "inputs": [{"name": "x", "shape": [1, 8], "dtype": "float32",
                                                             "native_dtype": "float32"}],
                                                 "outputs": [{"name": "y", "shape": [1, 8], "dtype": "float32",
                                                              "native_dtype": "float32"}]})
        checks = preflight.run_checks(dev, tiny, cache_dir=cache)
        # and through the command line: `farm devices --check s24 --export EXPORT`, exit 0
        from farm.cli.app import main

        (tmp_path / "devices.yaml").write_text(json.dumps({
            "phones": [{"name": "s24", "serial": standin.address, "soc": "SM8650", "runtime_dir": str(sdk)}],
            "lock_dir": str(tmp_path / "locks")}))
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("ANDROID_ADB_SERVER_PORT", str(adb_server.port))
            mp.setenv("MQFARM_DEVICES", str(tmp_path / "devices.yaml"))
            mp.setenv("MQFARM_PREFLIGHT_DIR", str(cache))
            assert main(["devices", "--check", "s24", "--export", str(tiny)]) == 0
        printed = capsys.readouterr().out.splitlines()
        assert len(printed) == 10 and all(line.startswith("ok") for line in printed)
    assert [c.check for c in checks] == ["online", "soc", "sdk files", "battery nodes", "charging", "thermal",
                                         "compiled folder", "storage", "runtime version", "known graph"]
    assert all(c.ok for c in checks), [c.to_dict() for c in checks if not c.ok]
    assert "max error 0.0" in checks[-1].detail


def test_ab_blocks_alternate_in_one_session(adb_server, sdk, tiny, tmp_path):
    """Two variants through Pool.compare, 3 rounds: 6 blocks A B A B A B in ONE adb shell session, one qnn-net-run per block, each
    variant's samples the medians of its blocks; the slower variant (30 ms vs 10 ms per inference) is
    slower in every round."""
    slow = tmp_path / "slow"
    import shutil

    shutil.copytree(tiny, slow)
    idx = json.loads((slow / "export.json").read_text())
    idx["content_hash"] = "slowvariant"
    (slow / "export.json").write_text(json.dumps(idx))
    with phone(adb_server, tmp_path, sdk, exports=[tiny], ms=10.0) as (standin, dev):
        # the slow variant's binaries differ by one byte so the phone tells them apart
        for b in (slow / "compiled-sm8650").glob("*.bin"):
            b.write_bytes(b.read_bytes() + b"\0")
        rec = json.loads((slow / "compiled-sm8650" / "compile.json").read_text())
        from devicelab.export_checks import sha256_file

        for g in rec["graphs"].values():
            g["files"][g["context_binary"]]["sha256"] = sha256_file(slow / "compiled-sm8650" / g["context_binary"])
        (slow / "compiled-sm8650" / "compile.json").write_text(json.dumps(rec))
        standin.register_export(slow, ms_per_inference=30.0)
        from devicelab.inventory import DeviceEntry, Inventory
        from devicelab.pool import Pool

        # through Pool.compare, as `farm bench A B` and `farm nightly` call it
        pool = Pool(Inventory([DeviceEntry(dev.name, "adb", {"serial": dev.serial})], None, tmp_path / "locks"),
                    devices={dev.name: dev})
        shells = len(standin.draws)
        out = pool.compare({"A": tiny, "B": slow}, dev.name, Workload(graph="prefill", warmup=1, repeats=6), rounds=3)
        sessions = [d for d in standin.draws[shells:] if "--num_inferences" in d.command]
        loads = [p[1] for p in _netruns(standin)]
    assert len(sessions) == 1 and len(loads) == 6  # one shell session, one process per block
    assert len(out["A"].samples_ms) == len(out["B"].samples_ms) == 3
    assert all(sb > sa for sa, sb in zip(out["A"].samples_ms, out["B"].samples_ms))
    assert out["A"].extra["inferences_per_block"] == 3 and out["A"].extra["blocks"] == 3
