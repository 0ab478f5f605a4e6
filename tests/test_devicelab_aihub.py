"""The ``aihub`` backend, tested at the ``qai_hub`` client boundary, as Qualcomm's ai-hub-models tests do.

AI Hub's service cannot be reached from here, so the job flow runs against a fake client: an object with
``qai_hub.Client``'s four methods that records what the backend uploads and submits, and answers with
jobs carrying qai-hub's real ``JobStatus`` / ``Device`` values and profiles built by qai-hub's own
converter (``qai_hub.client._profile_pb_to_python_dict``) from a ``ProfileDetail`` protobuf. The
credential and reachability errors run the real ``qai_hub.Client`` against a missing ini, a closed
loopback port, and a loopback HTTP stand-in that rejects the token. Nothing talks to an address outside
127.0.0.0/8 (an autouse fixture refuses it).
"""

from __future__ import annotations

import http.server
import ipaddress
import json
import socket
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from devicelab.backends.aihub import COMPILE_OPTIONS, DEFAULT_DEVICE, AiHubDevice, parse_profile
from devicelab.exported import read_export
from devicelab.protocol import DeviceError, Measurement, Workload
from tests.devicelab_fixtures import make_tiny_export

import qai_hub as hub  # noqa: E402
from qai_hub import public_api_pb2 as pb  # noqa: E402
from qai_hub.client import JobStatus, SourceModelType, _determine_model_type, _profile_pb_to_python_dict  # noqa: E402
from qai_hub.util.zipped_model import zip_model  # noqa: E402

DATA = Path(__file__).parent / "data"
S24_ATTRS = ["chipset:qualcomm-snapdragon-8gen3", "format:phone", "framework:qnn", "framework:onnx",
             "framework:tflite", "os:android", "vendor:samsung"]


# -- no address outside loopback --------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def loopback_only(monkeypatch):
    real_connect, real_getaddrinfo = socket.socket.connect, socket.getaddrinfo

    def connect(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not ipaddress.ip_address(address[0]).is_loopback:
            raise AssertionError(f"test tried to reach {address}, outside 127.0.0.0/8")
        return real_connect(sock, address)

    def getaddrinfo(host, *args, **kwargs):
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise AssertionError(f"test tried to resolve {host}")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


# -- profiles in qai-hub's own shape ------------------------------------------------------------------------

def _profile(times_us: list[int], units: list[str], peak: int = 50_331_648) -> dict:
    """What ``InferenceJob.download_profile()`` returns for these per-iteration times and per-layer units,
    built by qai-hub's own converter from a version 1.2 ProfileDetail."""
    d = pb.ProfileDetail(major_version=1, minor_version=2, execution_time=min(times_us),
                         after_execution_peak_memory=peak)
    d.execution_memory.peak.lower, d.execution_memory.peak.upper = peak - 4096, peak + 4096
    d.all_execution_times.extend(times_us)
    for i, unit in enumerate(units):
        d.layer_details.add(name=f"op_{i}", layer_type_name="Conv2d",
                            compute_unit=pb.ComputeUnit.Value(f"COMPUTE_UNIT_{unit}"))
    return _profile_pb_to_python_dict(d)


def test_reference_profile_parses_to_its_numbers():
    """tests/data/aihub_profile_s24_prefill.json (its ``_source`` says where its shape comes from): every
    number of the record checked against the file's raw values, µs -> ms."""
    ref = json.loads((DATA / "aihub_profile_s24_prefill.json").read_text())
    raw = ref["execution_summary"]["all_inference_times"]
    p = parse_profile(ref)
    assert p["samples_ms"] == [t / 1000 for t in raw] and len(p["samples_ms"]) == 20
    assert p["samples_ms"][7] == 15.872  # the stall stays in the samples, in run order
    assert p["estimated_ms"] == 12.391
    assert p["peak_memory_bytes"] == 187_695_104
    assert p["peak_memory_range_bytes"] == [180_355_072, 195_035_136]
    assert p["first_load_ms"] == 1846.21 and p["warm_load_ms"] == 176.48
    assert p["compute_units"] == {"NPU": 26}  # a context binary runs every layer on the HTP


def test_reference_profile_is_what_qai_hub_produces():
    """The saved record is exactly what qai-hub 0.56's converter makes of a ProfileDetail with its values:
    same keys, same nesting, same numbers (so the parser is checked against the client's real shape)."""
    ref = json.loads((DATA / "aihub_profile_s24_prefill.json").read_text())
    s = ref["execution_summary"]
    d = pb.ProfileDetail(major_version=1, minor_version=2, execution_time=s["estimated_inference_time"],
                         after_execution_peak_memory=s["estimated_inference_peak_memory"],
                         cold_load_time=s["first_load_time"], after_cold_load_peak_memory=s["first_load_peak_memory"],
                         warm_load_time=s["warm_load_time"], after_warm_load_peak_memory=s["warm_load_peak_memory"],
                         compile_time=s["compile_time"], after_compile_peak_memory=s["compile_peak_memory"])
    for stage, field in (("first_load", "cold_load_memory"), ("warm_load", "warm_load_memory"),
                         ("inference", "execution_memory")):
        mem = getattr(d, field)
        mem.increase.lower, mem.increase.upper = s[f"{stage}_memory_increase_range"]
        mem.peak.lower, mem.peak.upper = s[f"{stage}_memory_peak_range"]
    d.all_execution_times.extend(s["all_inference_times"])
    d.all_cold_load_times.extend(s["all_first_load_times"])
    d.all_warm_load_times.extend(s["all_warm_load_times"])
    for layer in ref["execution_detail"]:
        ld = d.layer_details.add(name=layer["name"], layer_type_name=layer["type"],
                                 compute_unit=pb.ComputeUnit.Value("COMPUTE_UNIT_" + layer["compute_unit"]))
        ld.execution_cycles = layer["execution_cycles"]
    produced = json.loads(json.dumps(_profile_pb_to_python_dict(d)))  # tuples -> lists, as in the file
    assert produced == {k: v for k, v in ref.items() if k != "_source"}


def test_parse_profile_counts_units_and_names_bad_fields():
    p = parse_profile(_profile([900, 1100, 1000], ["NPU"] * 5 + ["CPU", "GPU", "CPU"]))
    assert p["compute_units"] == {"NPU": 5, "CPU": 2, "GPU": 1}
    assert p["samples_ms"] == [0.9, 1.1, 1.0]
    old = {"execution_summary": {"estimated_inference_time": 2500}, "execution_detail": []}  # before 1.2
    assert parse_profile(old)["samples_ms"] == [2.5]
    with pytest.raises(ValueError, match="no execution_summary"):
        parse_profile({})
    with pytest.raises(ValueError, match="estimated_inference_time is 0"):
        parse_profile({"execution_summary": {"estimated_inference_time": 0}})


# -- the job flow against a fake client --------------------------------------------------------------------

class FakeModel:
    def __init__(self, model_id: str):
        self.model_id = model_id


class FakeJob:
    def __init__(self, job_id: str, status: JobStatus, target=None, profile=None, wait_raises=None):
        self.job_id, self.url, self.hub_version = job_id, f"http://127.0.0.1:9/jobs/{job_id}/", "0.0-fake"
        self._status, self._target, self._profile, self._wait_raises = status, target, profile, wait_raises
        self.waits = []

    def wait(self, timeout=None):
        self.waits.append(timeout)
        if self._wait_raises:
            raise self._wait_raises
        return self._status

    def get_target_model(self):
        return self._target

    def download_profile(self):
        return self._profile


OK = JobStatus(JobStatus.State.SUCCESS)


class FakeClient:
    """``qai_hub.Client``'s surface the backend uses; records every call. ``compile_status`` /
    ``profile_status`` / ``profiles`` are per graph (the job name ends with ``-<graph>-<hash>``)."""

    def __init__(self, profiles: dict, compile_status=None, profile_status=None, devices=None, wait_raises=None):
        self.profiles, self.wait_raises = profiles, wait_raises
        self.compile_status, self.profile_status = compile_status or {}, profile_status or {}
        self.devices = devices if devices is not None else [hub.Device(DEFAULT_DEVICE, "13", S24_ATTRS),
                                                            hub.Device(DEFAULT_DEVICE, "14", S24_ATTRS)]
        self.uploads, self.compiles, self.inferences = [], [], []

    def get_devices(self, name="", os="", attributes=None):
        return [d for d in self.devices if d.name == name]

    def upload_model(self, model, name=None, project=None):
        """Refuses an AIMET folder AI Hub would quantize wrongly: ai-hub-models uploads the UNQUANTIZED ONNX
        beside the encodings that quantize it (``qai_hub_models/utils/quantization_aimet_onnx.py``,
        ``convert_to_onnx_and_aimet_encodings``), so a graph that already holds QuantizeLinear /
        DequantizeLinear nodes, or an encodings key that names none of the graph's tensors, is refused as
        AI Hub's compile refuses encodings it cannot attach."""
        import onnx

        folder = Path(model)
        files = {p.name: p.read_bytes() for p in sorted(folder.iterdir())}
        onnx_file = next(p for p in folder.iterdir() if p.suffix == ".onnx")
        g = onnx.load(str(onnx_file)).graph
        if any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in g.node):
            raise hub.client.UserError(f"{onnx_file.name}: an AIMET model's ONNX must be the float graph (QDQ found)")
        tensors = {t.name for t in g.initializer} | {v.name for v in g.input} | {
            x for n in g.node for x in (*n.input, *n.output)}
        enc = json.loads(next(p for p in folder.iterdir() if p.suffix == ".encodings").read_text())
        stray = [k for part in ("activation_encodings", "param_encodings") for k in enc[part] if k not in tensors]
        if stray:
            raise hub.client.UserError(f"encodings name tensors not in the graph: {stray[:3]}")
        zipped = zip_model(str(folder.parent / "zip"), str(folder))  # what qai-hub itself would send
        with zipfile.ZipFile(zipped) as z:
            zip_names = sorted(z.namelist())
        self.uploads.append({"folder": folder.name, "files": files, "name": name, "zip": zip_names,
                             "type": _determine_model_type(str(folder))})
        return FakeModel(f"m{len(self.uploads)}")

    def submit_compile_job(self, model, device, name=None, input_specs=None, options="", **kw):
        graph = name.split("-")[-2]
        self.compiles.append({"model": model, "device": device, "name": name, "options": options, **kw})
        return FakeJob(f"jc{len(self.compiles)}", self.compile_status.get(graph, OK),
                       target=FakeModel(f"compiled-{graph}"))

    def submit_inference_job(self, model, device, inputs=None, name=None, options="", retry=True, profile=True,
                             project=None):
        graph = name.split("-")[-2]
        self.inferences.append({"model": model, "device": device, "inputs": inputs, "name": name,
                                "options": options, "profile": profile})
        return FakeJob(f"jp{len(self.inferences)}", self.profile_status.get(graph, OK),
                       profile=self.profiles.get(graph), wait_raises=self.wait_raises)

    def submit_profile_job(self, *a, **kw):
        raise AssertionError("submit_profile_job is deprecated in qai-hub 0.56 (prints a warning)")


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    return make_tiny_export(tmp_path_factory.mktemp("aihub") / "export")


PREFILL_US = [12480, 12391, 12377, 12402, 12366, 12414, 12389, 15872, 12395, 12371]
DECODE_US = [4210, 4188, 4305, 4177, 4199, 4221]


def _client(**kw) -> FakeClient:
    return FakeClient({"prefill": _profile(PREFILL_US, ["NPU"] * 40),
                       "decode": _profile(DECODE_US, ["NPU"] * 38 + ["CPU"] * 2)}, **kw)


def test_prepare_uploads_the_export_as_aimet_folders_and_compiles_for_the_s24(export):
    fake = _client()
    dev = AiHubDevice(client=fake)
    prepared = dev.prepare(export)
    try:
        assert [u["folder"] for u in fake.uploads] == ["prefill.aimet", "decode.aimet"]
        import onnx

        for up, graph in zip(fake.uploads, ("prefill", "decode")):
            # the export's encodings byte for byte, beside the FLOAT graph (QDQ folded) they are keyed by
            assert sorted(up["files"]) == [f"{graph}.encodings", f"{graph}.onnx"]
            assert up["files"][f"{graph}.encodings"] == (export / f"{graph}.encodings").read_bytes()
            g = onnx.load_model_from_string(up["files"][f"{graph}.onnx"]).graph
            assert not [n for n in g.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
            tensors = {t.name for t in g.initializer} | {v.name for v in g.input} | {
                x for n in g.node for x in (*n.input, *n.output)}
            enc = json.loads(up["files"][f"{graph}.encodings"])
            keys = set(enc["activation_encodings"]) | set(enc["param_encodings"])
            assert keys and keys <= tensors
            assert up["type"] == SourceModelType.AIMET_ONNX  # qai-hub's own reading of the folder
            assert up["zip"] == [f"{graph}.aimet/", f"{graph}.aimet/{graph}.encodings", f"{graph}.aimet/{graph}.onnx"]
        assert len(fake.compiles) == 2
        for c, up_id in zip(fake.compiles, ("m1", "m2")):
            assert c["model"].model_id == up_id
            assert c["device"] == hub.Device(DEFAULT_DEVICE)
            # int64 token/position inputs: QNN has no 64-bit tensors, AI Hub narrows them
            assert c["options"] == f"{COMPILE_OPTIONS} --truncate_64bit_io"
        content_hash = read_export(export).content_hash
        assert fake.compiles[0]["name"] == f"tiny-qdq-w8a8-rtn-prefill-{content_hash[:8]}"
        assert {g: c.failure for g, c in prepared.graphs.items()} == {"prefill": "", "decode": ""}
    finally:
        dev.close()


def test_prefill_profile_becomes_the_record(export):
    fake = _client()
    dev = AiHubDevice(client=fake, profile_options="--qnn_options context_priority=high")
    m = dev.run(dev.prepare(export), Workload(graph="prefill", repeats=10))
    dev.close()
    call = fake.inferences[0]
    assert call["profile"] is True and call["model"].model_id == "compiled-prefill"
    assert call["options"] == "--max_profiler_iterations 10 --qnn_options context_priority=high"
    ids = call["inputs"]["input_ids"][0]  # the export's synthetic prompt, narrowed to int32
    ref = read_export(export).graph("prefill").synthetic_inputs(512)["input_ids"]
    assert list(call["inputs"]) == ["input_ids"] and ids.dtype == np.int32 and ids.shape == (1, 16)
    assert np.array_equal(ids, ref.astype(np.int32)) and ids.max() < 512

    samples = [t / 1000 for t in PREFILL_US]
    assert m.status == "ok" and m.error == ""
    assert m.samples_ms == samples
    assert m.median_ms == pytest.approx(float(np.median(samples)), abs=1e-12)  # 12.3925
    assert m.p90_ms == pytest.approx(float(np.percentile(samples, 90)), abs=1e-12)
    assert min(samples) <= m.ci_low_ms <= m.median_ms <= m.ci_high_ms <= max(samples)
    assert m.tokens_per_s is None and m.power_mw is None and m.energy_mj_per_token is None
    assert m.peak_memory_bytes == 50_331_648 and m.compute_units == {"NPU": 40}
    assert m.extra["estimated_ms"] == 12.366 and m.extra["profile_job"] == "jp1"
    assert m.extra["compile_job"] == "jc1" and m.extra["prompt_len"] == 16
    assert m.model_id == read_export(export).content_hash
    info = m.device
    assert (info.name, info.kind, info.model) == (f"aihub:{DEFAULT_DEVICE}", "aihub", DEFAULT_DEVICE)
    assert info.soc == "qualcomm-snapdragon-8gen3" and info.os_build == "android 14"  # the newest OS
    assert (info.runtime, info.runtime_version) == ("qai-hub", "0.56.0")
    assert Measurement.from_dict(json.loads(json.dumps(m.to_dict()))) == m  # crosses JSON intact


def test_decode_profile_gives_tokens_per_second(export):
    fake = _client()
    dev = AiHubDevice(client=fake)
    m = dev.run(dev.prepare(export), Workload(graph="decode", repeats=6))
    dev.close()
    inputs = fake.inferences[0]["inputs"]
    assert {k: (v[0].dtype.name, v[0].shape) for k, v in inputs.items()} == {
        "input_ids": ("int32", (1, 1)), "position_ids": ("int32", (1, 1)),
        "k_cache": ("uint8", (1, 1, 64, 32)), "v_cache": ("uint8", (1, 1, 64, 32)),
        "attention_bias": ("float32", (1, 65))}
    median = float(np.median([t / 1000 for t in DECODE_US]))  # 4.2045 ms
    assert m.median_ms == pytest.approx(median, abs=1e-12)
    assert m.tokens_per_s == pytest.approx(1000 / median, rel=1e-12)  # 237.84 tokens/s
    assert m.compute_units == {"NPU": 38, "CPU": 2} and m.extra["ctx"] == 64


def test_failed_compile_is_recorded_with_its_reason_and_the_other_graph_still_measures(export):
    reason = "Failed to compile: tensor k_cache has two different encodings"
    fake = _client(compile_status={"decode": JobStatus(JobStatus.State.FAILED, reason)})
    dev = AiHubDevice(client=fake)
    prepared = dev.prepare(export)
    bad = dev.run(prepared, Workload(graph="decode"))
    good = dev.run(prepared, Workload(graph="prefill", repeats=10))
    with pytest.raises(DeviceError, match="workload.repeats is 0; AI Hub's --max_profiler_iterations needs at least 1"):
        dev.run(prepared, Workload(graph="prefill", repeats=0))
    with pytest.raises(DeviceError, match=r"no 'verify' graph \(has \['decode', 'prefill'\]\)"):
        dev.run(prepared, Workload(graph="verify"))
    dev.close()
    assert bad.status == "failed" and reason in bad.error
    assert "compile job jc2" in bad.error and "http://127.0.0.1:9/jobs/jc2/" in bad.error
    assert bad.samples_ms == [] and bad.median_ms is None
    assert [c["name"].split("-")[-2] for c in fake.inferences] == ["prefill"]  # no profile of a failed compile
    assert good.status == "ok" and good.samples_ms == [t / 1000 for t in PREFILL_US]


def test_failed_and_unfinished_profile_jobs_are_recorded(export):
    reason = "Device Samsung Galaxy S24 could not be provisioned"
    fake = _client(profile_status={"prefill": JobStatus(JobStatus.State.FAILED, reason)})
    dev = AiHubDevice(client=fake)
    m = dev.run(dev.prepare(export), Workload(graph="prefill"))
    assert m.status == "failed" and reason in m.error and "profile job jp1" in m.error
    assert m.extra["profile_job"] == "jp1" and m.extra["compile_job"] == "jc1"
    dev.close()

    fake = _client(wait_raises=TimeoutError("still running"))
    dev = AiHubDevice(client=fake, job_timeout_s=5)
    m = dev.run(dev.prepare(export), Workload(graph="prefill"))
    dev.close()
    assert m.status == "failed" and "did not finish within 5 s" in m.error
    assert m.extra["profile_url"] == "http://127.0.0.1:9/jobs/jp1/"  # the job is still findable


def test_unknown_device_and_missing_encodings_are_clear_errors(export, tmp_path):
    dev = AiHubDevice("Samsung Galaxy S99", client=_client())
    with pytest.raises(DeviceError, match=r"aihub:Samsung Galaxy S99: AI Hub has no device named 'Samsung Galaxy S99'"):
        dev.info()
    assert dev.health().online is False

    import shutil

    broken = Path(shutil.copytree(export, tmp_path / "broken"))
    (broken / "decode.encodings").unlink()
    fake = _client()
    dev = AiHubDevice(client=fake)
    with pytest.raises(DeviceError, match=r"decode\.encodings \(the decode graph's AIMET encodings\) is missing"):
        dev.prepare(broken)
    dev.close()
    (broken / "decode.encodings").write_text(json.dumps({"encodings": []}))
    with pytest.raises(DeviceError, match=r"decode\.encodings is not in AIMET format"):
        AiHubDevice(client=fake).prepare(broken)


def test_external_weights_travel_in_the_aimet_folder_and_one_graph_can_be_prepared(export, tmp_path):
    """An export graph that keeps its weights in an external data file is read with them; the float graph
    written for AI Hub (under 2 GB) holds them inline, so the folder is one .onnx and one .encodings.
    Preparing ``EXPORT/prefill.onnx`` compiles that graph only."""
    import shutil

    import onnx

    big = Path(shutil.copytree(export, tmp_path / "big"))
    model = onnx.load(str(big / "prefill.onnx"))
    onnx.save_model(model, str(big / "prefill.onnx"), save_as_external_data=True, location="prefill.onnx.data",
                    size_threshold=0)
    fake, lines = _client(), []
    dev = AiHubDevice(client=fake, progress=lines.append)
    prepared = dev.prepare(big / "prefill.onnx")
    dev.close()
    assert list(prepared.graphs) == ["prefill"] and len(fake.compiles) == 1
    up = fake.uploads[0]
    assert sorted(up["files"]) == ["prefill.encodings", "prefill.onnx"]
    inits = {t.name for t in onnx.load_model_from_string(up["files"]["prefill.onnx"]).graph.initializer}
    assert "wlm_DequantizeLinear_Output" in inits  # the LM head's weight, read from the external file and folded to float
    assert up["type"] == SourceModelType.AIMET_ONNX
    assert lines == [f"aihub:{DEFAULT_DEVICE}: prefill: compile job jc1 submitted ({COMPILE_OPTIONS} "
                     f"--truncate_64bit_io): http://127.0.0.1:9/jobs/jc1/",
                     f"aihub:{DEFAULT_DEVICE}: prefill: compile job jc1 done"]


def test_service_lost_mid_prepare_names_the_jobs_already_running(export):
    """The second upload fails as qai-hub fails when the connection drops (InternalError from a requests
    ConnectionError): the error names the URL and the compile job already submitted, so it is not lost."""
    import requests

    class Drops(FakeClient):
        config = hub.ClientConfig(api_token="x", api_url="http://127.0.0.1:9")

        def upload_model(self, model, name=None, project=None):
            if self.uploads:
                raise hub.client.InternalError("Could not connect") from requests.exceptions.ConnectionError()
            return super().upload_model(model, name, project)

    dev = AiHubDevice(client=Drops({}))
    with pytest.raises(DeviceError) as e:
        dev.prepare(export)
    dev.close()
    msg = str(e.value)
    assert "Qualcomm AI Hub at http://127.0.0.1:9 is unreachable while trying to upload decode.aimet" in msg
    assert "already submitted: compile job jc1 for prefill at http://127.0.0.1:9/jobs/jc1/" in msg


def test_inventory_entry_builds_the_backend():
    from devicelab import backends, inventory

    inv = inventory.parse({"aihub": {"devices": ["Samsung Galaxy S23 (Family)"]}})
    entry = inv.get("aihub:Samsung Galaxy S23 (Family)")
    dev = backends.create(entry)
    assert isinstance(dev, AiHubDevice)
    assert (dev.name, dev.kind, dev.device_name) == (entry.name, "aihub", "Samsung Galaxy S23 (Family)")


# -- the real qai_hub client: credentials and reachability ------------------------------------------------

def _ini(path: Path, api_url: str, token: str | None = "not-a-real-token") -> Path:
    lines = ["[api]", f"api_url = {api_url}", f"web_url = {api_url}"] + ([f"api_token = {token}"] if token else [])
    path.write_text("\n".join(lines) + "\n")
    return path


def test_no_credentials_says_how_to_configure(tmp_path, monkeypatch):
    """Real qai_hub.Client: no client.ini where QAIHUB_CLIENT_INI points, then an ini without a token."""
    missing = tmp_path / "absent.ini"
    monkeypatch.setenv("QAIHUB_CLIENT_INI", str(missing))
    dev = AiHubDevice()
    with pytest.raises(DeviceError) as e:
        dev.info()
    msg = str(e.value)
    assert str(missing) in msg and "qai-hub configure --api_token" in msg and "QAIHUB_CLIENT_INI" in msg
    h = dev.health()
    assert h.online is False and "qai-hub configure --api_token" in h.detail

    monkeypatch.setenv("QAIHUB_CLIENT_INI", str(_ini(tmp_path / "notoken.ini", "http://127.0.0.1:9", None)))
    with pytest.raises(DeviceError, match=r"notoken\.ini is not a usable AI Hub configuration .*token is missing"):
        AiHubDevice().info()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_service_names_the_url(tmp_path, monkeypatch):
    """Real qai_hub.Client against a closed loopback port. The client's own retries (6, ~46 s in all) are
    cut to one without back-off so the test is fast; health()'s probe needs no such help."""
    import qai_hub.util.session as session

    monkeypatch.setattr(session, "MAX_RETRIES", 1)
    monkeypatch.setattr(session, "BACKOFF_FACTOR", 0.0)
    url = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("QAIHUB_CLIENT_INI", str(_ini(tmp_path / "client.ini", url)))
    dev = AiHubDevice()
    t0 = time.monotonic()
    with pytest.raises(DeviceError) as e:
        dev.info()
    assert time.monotonic() - t0 < 10
    msg = str(e.value)
    assert f"Qualcomm AI Hub at {url} is unreachable" in msg and "proxy" in msg and "client.ini" in msg

    monkeypatch.setattr(session, "MAX_RETRIES", 6)  # the client's default: health() must not depend on it
    t0 = time.monotonic()
    h = AiHubDevice(probe_timeout_s=2).health()
    assert time.monotonic() - t0 < 3
    assert h.online is False and f"Qualcomm AI Hub at {url} is unreachable (ConnectionError)" in h.detail


class _Rejects(http.server.BaseHTTPRequestHandler):
    """An AI Hub stand-in that answers every request with 401, as the service does for a revoked token."""

    def do_GET(self):
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"detail": "Invalid token."}')

    def log_message(self, *args):
        pass


def test_rejected_token_says_how_to_reconfigure(tmp_path, monkeypatch):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Rejects)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        monkeypatch.setenv("QAIHUB_CLIENT_INI", str(_ini(tmp_path / "client.ini", url)))
        with pytest.raises(DeviceError, match=rf"AI Hub at {url} rejected the API token .*qai-hub configure"):
            AiHubDevice().info()
        h = AiHubDevice().health()  # reachable, so the probe passes and the device lookup fails
        assert h.online is False and "rejected the API token" in h.detail
    finally:
        server.shutdown()
        server.server_close()
