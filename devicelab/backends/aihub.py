"""The ``aihub`` backend: Qualcomm AI Hub's cloud phones, through the ``qai-hub`` client (written against 0.56).

Flow, one AI Hub job per step (the ai-hub-models compile -> profile chain):

1. ``prepare(EXPORT)``: each graph of the export folder (``prefill``, ``decode``) is laid out as an AIMET
   model folder ``<graph>.aimet/{<graph>.onnx, <graph>.encodings}`` (the FLOAT graph, QDQ folded away, beside
   the encodings keyed by its tensors, as ai-hub-models uploads), uploaded, and compiled
   with ``--target_runtime qnn_context_binary`` for the device. All compile jobs are submitted before any is
   waited on, so AI Hub compiles the graphs side by side.
2. ``run(prepared, workload)``: an inference job with ``profile=True`` on the compiled graph (the current form
   of the profile job: ``submit_profile_job`` is deprecated in 0.56 and prints a warning), fed the export's
   synthetic inputs, ``--max_profiler_iterations`` = ``workload.repeats``.
3. The profile (``InferenceJob.download_profile()``) becomes a :class:`~devicelab.protocol.Measurement`:
   ``execution_summary`` times are integers in microseconds (``estimated_inference_time`` and, from profile
   version 1.2, ``all_inference_times`` one per iteration), memory in bytes, and ``execution_detail`` lists
   one entry per layer with its ``compute_unit`` (``NPU``/``GPU``/``CPU``). :func:`parse_profile` reads it.

Conventions: times in the record are milliseconds; ``compute_units`` counts layers per unit; AI Hub measures
no power, so ``power_mw`` / ``energy_mj_per_token`` stay None; warm-up is AI Hub's own (not configurable).

Credentials are qai-hub's own: ``qai-hub configure --api_token TOKEN`` writes ``~/.qai_hub/client.ini``, and
``QAIHUB_CLIENT_INI`` points at another ini (which also carries ``api_url``). Tests hand the backend a
``client`` object instead (any object with ``get_devices``, ``upload_model``, ``submit_compile_job`` and
``submit_inference_job`` of ``qai_hub.Client``'s signatures).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..exported import Export, ExportError, read_export
from ..protocol import Device, DeviceError, DeviceInfo, Health, Measurement, Workload
from ..stats import summarize

DEFAULT_DEVICE = "Samsung Galaxy S24 (Family)"  # Snapdragon 8 Gen 3 (SM8650), the paper's phone
COMPILE_OPTIONS = "--target_runtime qnn_context_binary"
# QNN has no 64-bit integer tensors; AI Hub narrows int64 inputs/outputs to int32 with this flag (the
# export's input_ids / position_ids are int64), so the profile job is fed int32 for them.
TRUNCATE_64BIT = "--truncate_64bit_io"
CONFIGURE_HINT = ("configure AI Hub credentials with `qai-hub configure --api_token YOUR_TOKEN` (writes "
                  "~/.qai_hub/client.ini; the token is on the Account page of AI Hub's web site), or set "
                  "QAIHUB_CLIENT_INI to an existing client.ini")


def _hub():
    """qai_hub, imported on first use: it costs a second and pulls h5py/requests, and a pool without AI Hub
    devices should not pay for it."""
    import qai_hub

    return qai_hub


@dataclass
class CompiledGraph:
    """One graph of an export after its compile job: ``target`` is the compiled model handle for the profile
    job, or None with ``failure`` saying why (the compile job's own reason, its id and URL)."""

    graph: str
    spec: object  # exported.GraphSpec
    int64_inputs: list
    compile_job_id: str = ""
    compile_url: str = ""
    target: object = None
    failure: str = ""


@dataclass
class AiHubPrepared:
    export: Export
    graphs: dict = field(default_factory=dict)  # graph name -> CompiledGraph


def parse_profile(profile: dict) -> dict:
    """Numbers from ``InferenceJob.download_profile()`` (the dict qai-hub's ``_profile_pb_to_python_dict``
    builds), in the record's units.

    Returns ``samples_ms`` (``all_inference_times`` / 1000, one per profiler iteration, in run order; the
    single ``estimated_inference_time`` when the profile predates per-iteration times), ``estimated_ms``,
    ``peak_memory_bytes`` (``estimated_inference_peak_memory``), ``peak_memory_range_bytes`` (the inference
    stage's [low, high] when present), ``first_load_ms`` / ``warm_load_ms``, and ``compute_units`` (layers per
    unit from ``execution_detail``). Raises ValueError naming the missing or malformed field.
    """
    if not isinstance(profile, dict) or "execution_summary" not in profile:
        got = sorted(profile) if isinstance(profile, dict) else type(profile).__name__
        raise ValueError(f"profile has no execution_summary (got {got})")
    summary = profile["execution_summary"]
    est = summary.get("estimated_inference_time")
    if not isinstance(est, (int, float)) or est <= 0:
        raise ValueError(f"execution_summary.estimated_inference_time is {est!r}, not a positive time in µs")
    all_us = summary.get("all_inference_times") or [est]
    if any(not isinstance(t, (int, float)) or t <= 0 for t in all_us):
        raise ValueError("execution_summary.all_inference_times has a non-positive or non-numeric entry")

    units: dict[str, int] = {}
    for i, layer in enumerate(profile.get("execution_detail", [])):
        unit = layer.get("compute_unit")
        if not unit:
            raise ValueError(f"execution_detail[{i}] ({layer.get('name', '?')}) has no compute_unit")
        units[unit] = units.get(unit, 0) + 1

    def ms(key):
        v = summary.get(key)
        return None if v is None else v / 1000.0

    peak_range = summary.get("inference_memory_peak_range")
    return {
        "samples_ms": [t / 1000.0 for t in all_us],
        "estimated_ms": est / 1000.0,
        "peak_memory_bytes": summary.get("estimated_inference_peak_memory"),
        "peak_memory_range_bytes": list(peak_range) if peak_range else None,
        "first_load_ms": ms("first_load_time"),
        "warm_load_ms": ms("warm_load_time"),
        "compute_units": units,
    }


def _is_connection_failure(exc: BaseException) -> bool:
    import requests

    seen = exc
    while seen is not None:
        if isinstance(seen, (requests.exceptions.ConnectionError, requests.exceptions.Timeout)):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


class AiHubDevice(Device):
    """One AI Hub device type (``Samsung Galaxy S24 (Family)`` by default), named ``aihub:<device name>``.

    Args:
        device_name: AI Hub's device name, exactly as ``qai-hub list-devices`` prints it.
        name: the pool name (default ``aihub:<device_name>``).
        compile_options / profile_options: appended to the backend's own options (``--target_runtime
            qnn_context_binary`` / ``--max_profiler_iterations N``); from the inventory.
        client: a ``qai_hub.Client``-like object; default ``qai_hub.Client()`` on the user's client.ini.
        job_timeout_s: how long to wait for one job before recording it as unfinished (None: AI Hub's own
            limit, which fails a job after a while).
        probe_timeout_s: ``health()``'s reachability probe; one request, no retries, so ``farm devices``
            does not wait out the client's ~46 s of retries when the service is down.
        progress: called with one line per step (upload, job submitted with its URL, job finished); jobs
            take minutes, so the default prints to stderr.
    """

    kind = "aihub"

    def __init__(self, device_name: str = DEFAULT_DEVICE, *, name: str | None = None, compile_options: str = "",
                 profile_options: str = "", client=None, job_timeout_s: float | None = None,
                 probe_timeout_s: float = 5.0, progress: Callable[[str], None] | None = None):
        self.device_name = device_name
        self.name = name or f"aihub:{device_name}"
        self.compile_options = compile_options.strip()
        self.profile_options = profile_options.strip()
        self.job_timeout_s = job_timeout_s
        self.probe_timeout_s = probe_timeout_s
        self._client = client
        self._progress = progress or _to_stderr
        self._info: DeviceInfo | None = None
        self._workdir: Path | None = None

    # -- the client, and what its failures mean ---------------------------------------------------------

    def _config_path(self) -> Path:
        from qai_hub import api_utils  # the client's own precedence: QAIHUB_CLIENT_INI, then ~/.qai_hub/client.ini

        return Path(api_utils.get_config_path())

    def client(self):
        """The qai_hub client; DeviceError (how to configure) when there are no usable credentials."""
        if self._client is None:
            hub = _hub()
            path = self._config_path()
            if not path.is_file():
                raise DeviceError(f"{self.name}: no AI Hub credentials ({path} does not exist): {CONFIGURE_HINT}")
            client = hub.Client()
            try:
                client.config  # reads and checks the ini now, not in the middle of a job
            except hub.client.Error as e:
                raise DeviceError(f"{self.name}: {path} is not a usable AI Hub configuration "
                                  f"({_message(e)}): {CONFIGURE_HINT}") from None
            self._client = client
        return self._client

    def api_url(self) -> str:
        """The endpoint the client talks to (``api_url`` of the ini); empty when the client does not say."""
        config = getattr(self.client(), "config", None)
        return getattr(config, "api_url", "") or ""

    def _call(self, what: str, fn, *args, **kwargs):
        """Run one client call; its failures become DeviceErrors that name the device, the step and the URL."""
        hub = _hub()
        try:
            return fn(*args, **kwargs)
        except hub.client.Error as e:
            url = self.api_url() or "the AI Hub API"
            if _is_connection_failure(e):
                raise DeviceError(
                    f"{self.name}: Qualcomm AI Hub at {url} is unreachable while trying to {what}: check this "
                    f"machine's network and proxy settings (HTTPS_PROXY / NO_PROXY), and that api_url in "
                    f"{self._config_path()} is right") from None
            if "authenticate" in str(e):
                raise DeviceError(f"{self.name}: AI Hub at {url} rejected the API token while trying to {what}; "
                                  f"{CONFIGURE_HINT}") from None
            raise DeviceError(f"{self.name}: AI Hub at {url} refused to {what}: {_message(e)}") from None

    # -- protocol -----------------------------------------------------------------------------------------

    def info(self) -> DeviceInfo:
        """Who the device is, from AI Hub's device list (one request, cached): name, chipset attribute,
        OS version, qai-hub version."""
        if self._info is None:
            hub = _hub()
            devices = self._call(f"look up device {self.device_name!r}", self.client().get_devices,
                                 name=self.device_name)
            if not devices:
                raise DeviceError(f"{self.name}: AI Hub has no device named {self.device_name!r}; "
                                  f"`qai-hub list-devices` prints the names it has")
            dev = max(devices, key=lambda d: _version_key(d.os))  # the newest OS, as AI Hub picks by default
            attrs = sorted(dev.attributes)
            chipset = next((a.split(":", 1)[1] for a in attrs if a.startswith("chipset:")), "")
            os_name = next((a.split(":", 1)[1] for a in attrs if a.startswith("os:")), "")
            self._info = DeviceInfo(
                name=self.name, kind=self.kind, model=dev.name, soc=chipset,
                os_build=f"{os_name} {dev.os}".strip(), runtime="qai-hub", runtime_version=str(hub.__version__),
                extra={"attributes": attrs, "api_url": self.api_url()})
        return self._info

    def health(self) -> Health:
        """Credentials present, service reachable (one bounded probe) and the device known to AI Hub.
        Cloud devices have no battery, temperature or storage to report."""
        try:
            self.client()
            url = self.api_url()
            reason = _probe(url, self.probe_timeout_s) if url else ""
            if reason:
                return Health(online=False, detail=f"Qualcomm AI Hub at {url} is unreachable ({reason}): check the "
                                                   f"network and proxy settings, and api_url in {self._config_path()}")
            self.info()
        except DeviceError as e:
            return Health(online=False, detail=str(e))
        return Health(online=True)

    def prepare(self, model: Path) -> AiHubPrepared:
        """Upload each graph of the export folder ``model`` as an AIMET model folder and compile it for the
        device. A failed compile is kept in the handle (``run`` records its reason); a missing export, missing
        encodings or an unreachable service raise."""
        root = Path(model)
        if root.suffix == ".onnx":  # a graph file inside an export folder: that graph only
            root, only = root.parent, root.name
        else:
            only = None
        try:
            export = read_export(root)
        except ExportError as e:
            raise DeviceError(f"{self.name}: {e}") from None
        names = [g for g, meta in export.index.get("graphs", {}).items() if only is None or meta.get("file") == only]
        if not names:
            raise DeviceError(f"{self.name}: {model} is not a graph listed in {root / 'export.json'}")

        hub = _hub()
        device = hub.Device(self.device_name)
        prepared = AiHubPrepared(export)
        jobs = {}
        for graph in names:  # submit every compile before waiting on any
            spec = export.graph(graph)
            folder = self._aimet_folder(export, graph)
            label = _job_name(export, graph)
            int64_inputs = [i["name"] for i in spec.inputs if i["dtype"] == "int64"]
            options = " ".join(o for o in (COMPILE_OPTIONS, TRUNCATE_64BIT if int64_inputs else "",
                                           self.compile_options) if o)
            try:
                uploaded = self._call(f"upload {folder.name}", self.client().upload_model, str(folder), name=label)
                job = self._call(f"submit the compile job for {graph}", self.client().submit_compile_job,
                                 model=uploaded, device=device, name=label, options=options)
            except DeviceError as e:
                if not jobs:
                    raise
                # the jobs already submitted keep running on AI Hub: say where they are
                raise DeviceError(f"{e} (already submitted: " + ", ".join(
                    f"compile job {j.job_id} for {g} at {j.url}" for g, j in jobs.items()) + ")") from None
            self._progress(f"{self.name}: {graph}: compile job {job.job_id} submitted ({options}): {job.url}")
            jobs[graph] = job
            prepared.graphs[graph] = CompiledGraph(graph, spec, int64_inputs, compile_job_id=job.job_id,
                                                   compile_url=job.url)
        for graph, job in jobs.items():
            compiled = prepared.graphs[graph]
            status = self._wait(job, f"compile job {job.job_id} ({graph})")
            if status is None:
                compiled.failure = (f"compile job {job.job_id} for {graph} did not finish within "
                                    f"{self.job_timeout_s} s; see {compiled.compile_url}")
            elif not status.success:
                compiled.failure = (f"compile job {job.job_id} for {graph} failed: {status.message or status.code} "
                                    f"({compiled.compile_url})")
            else:
                compiled.target = self._call(f"fetch the compiled {graph}", job.get_target_model)
            self._progress(f"{self.name}: {graph}: compile job {job.job_id} "
                           + (f"FAILED: {compiled.failure}" if compiled.failure else "done"))
        return prepared

    def run(self, prepared: AiHubPrepared, workload: Workload) -> Measurement:
        """Profile the compiled ``workload.graph`` on the device; a failed or unfinished job gives a failed
        record carrying the job's own reason, id and URL."""
        if workload.graph not in prepared.graphs:
            raise DeviceError(f"{self.name}: the prepared export has no {workload.graph!r} graph "
                              f"(has {sorted(prepared.graphs)})")
        if workload.repeats < 1:
            raise DeviceError(f"{self.name}: workload.repeats is {workload.repeats}; AI Hub's "
                              f"--max_profiler_iterations needs at least 1")
        compiled = prepared.graphs[workload.graph]
        record = Measurement(device=self.info(), workload=workload, model_id=prepared.export.content_hash,
                             extra={"compile_job": compiled.compile_job_id, "compile_url": compiled.compile_url,
                                    "warmup": "AI Hub's own", "power": "not measured by AI Hub",
                                    **({"prompt_len": compiled.spec.meta["prompt_len"]}
                                       if "prompt_len" in compiled.spec.meta else {}),
                                    **({"ctx": compiled.spec.meta["ctx"]} if "ctx" in compiled.spec.meta else {})})
        if compiled.failure:
            return _failed(record, compiled.failure)

        inputs = compiled.spec.synthetic_inputs(prepared.export.vocab_size)
        # int64 was narrowed by --truncate_64bit_io at compile time (token ids fit in int32)
        dataset = {k: [v.astype(np.int32) if k in compiled.int64_inputs else v] for k, v in inputs.items()}
        options = " ".join(o for o in (f"--max_profiler_iterations {workload.repeats}", self.profile_options) if o)
        hub = _hub()
        job = self._call(f"submit the profile job for {workload.graph}", self.client().submit_inference_job,
                         model=compiled.target, device=hub.Device(self.device_name), inputs=dataset,
                         name=_job_name(prepared.export, workload.graph), options=options, profile=True)
        record.extra.update(profile_job=job.job_id, profile_url=job.url)
        self._progress(f"{self.name}: {workload.graph}: profile job {job.job_id} submitted ({options}): {job.url}")
        if getattr(job, "hub_version", ""):
            record.extra["hub_version"] = job.hub_version
        status = self._wait(job, f"profile job {job.job_id} ({workload.graph})")
        if status is None:
            return _failed(record, f"profile job {job.job_id} did not finish within {self.job_timeout_s} s; "
                                   f"see {record.extra['profile_url']}")
        if not status.success:
            return _failed(record, f"profile job {job.job_id} failed: {status.message or status.code} "
                                   f"({record.extra['profile_url']})")
        self._progress(f"{self.name}: {workload.graph}: profile job {job.job_id} done")
        profile = self._call(f"download the profile of job {job.job_id}", job.download_profile)
        try:
            parsed = parse_profile(profile)
        except ValueError as e:
            return _failed(record, f"profile job {job.job_id}: {e} ({record.extra['profile_url']})")

        record.samples_ms = parsed["samples_ms"]
        for key, value in summarize(parsed["samples_ms"], level=record.ci_level).items():
            setattr(record, key, value)
        if workload.graph == "decode":  # one token per decode step
            record.tokens_per_s = 1000.0 / record.median_ms
        record.peak_memory_bytes = parsed["peak_memory_bytes"]
        record.compute_units = parsed["compute_units"]
        record.extra.update({k: parsed[k] for k in ("estimated_ms", "peak_memory_range_bytes", "first_load_ms",
                                                    "warm_load_ms") if parsed[k] is not None})
        return record

    def close(self) -> None:
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    # -- helpers ------------------------------------------------------------------------------------------

    def _wait(self, job, what: str):
        """The job's final status, or None when ``job_timeout_s`` passed first (the job keeps running on AI Hub)."""
        try:
            return self._call(f"wait for {what}", job.wait, timeout=self.job_timeout_s)
        except TimeoutError:
            return None

    def _aimet_folder(self, export: Export, graph: str) -> Path:
        """``<graph>.aimet/`` with the FLOAT graph ``<graph>.onnx`` (the export's QDQ pairs folded away by
        :func:`devicelab.qdq.strip_qdq`), ``<graph>.encodings`` and the float graph's external data if any.

        The layout is the one qai-hub's client recognises as an AIMET ONNX model (``client.py``:
        ``MODEL_TYPES_BY_EXTENSION[".aimet"]`` and ``_get_model_dir_type``: a directory with exactly one
        ``.onnx``, one ``.encodings`` and at most one ``.data``) and what ai-hub-models uploads
        (``qai_hub_models/utils/quantization_aimet_onnx.py``, ``convert_to_onnx_and_aimet_encodings``: the
        unquantized ONNX beside the encodings that quantize it). A QDQ graph with the encodings would be
        quantized twice, and its tensor names are not the encodings' keys; so every key of the encodings
        must be a tensor of the uploaded graph, checked here.
        """
        from ..qdq import strip_qdq

        meta = export.index["graphs"][graph]
        onnx_path = export.root / meta["file"]
        if "encodings" not in meta:
            raise DeviceError(f"{self.name}: {export.root / 'export.json'}: graph {graph} names no encodings file; "
                              f"AI Hub needs the AIMET encodings to keep the export's quantization")
        enc_path = export.root / meta["encodings"]
        if not enc_path.is_file():
            raise DeviceError(f"{self.name}: {enc_path} (the {graph} graph's AIMET encodings) is missing")
        try:
            enc = json.loads(enc_path.read_text())
        except json.JSONDecodeError as e:
            raise DeviceError(f"{self.name}: {enc_path} is not valid JSON: {e}") from None
        if not isinstance(enc, dict) or not {"activation_encodings", "param_encodings"} <= set(enc):
            raise DeviceError(f"{self.name}: {enc_path} is not in AIMET format (no activation_encodings / "
                              f"param_encodings)")
        if self._workdir is None:
            self._workdir = Path(tempfile.mkdtemp(prefix="mqfarm-aihub-"))
        folder = self._workdir / export.content_hash[:12] / f"{graph}.aimet"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        model = strip_qdq(onnx_path, folder / f"{graph}.onnx")
        g = model.graph
        tensors = ({t.name for t in g.initializer} | {v.name for v in g.input} | {v.name for v in g.output}
                   | {x for n in g.node for x in (*n.input, *n.output)})
        stray = sorted(k for part in ("activation_encodings", "param_encodings") for k in _keys(enc[part])
                       if k not in tensors)
        if stray:
            raise DeviceError(f"{self.name}: {enc_path}: {len(stray)} encodings key(s) name no tensor of the float "
                              f"{graph} graph AI Hub would get: {', '.join(stray[:5])}")
        if any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in g.node):
            raise DeviceError(f"{self.name}: the float {graph} graph still holds QDQ nodes after folding")
        os.symlink(enc_path.resolve(), folder / f"{graph}.encodings")
        data = [p.name for p in folder.iterdir() if p.suffix == ".data"]
        if len(data) > 1:
            raise DeviceError(f"{self.name}: the float {graph} graph keeps its weights in {len(data)} files")
        return folder


def _keys(section) -> list[str]:
    """Tensor names of an encodings section: a dict keyed by name (AIMET 0.6) or a list of {"name": ...}
    (AIMET 1.0)."""
    if isinstance(section, dict):
        return list(section)
    return [e["name"] for e in section if isinstance(e, dict) and "name" in e]


def from_entry(entry) -> AiHubDevice:
    """The backend of an inventory entry (``devicelab.inventory.DeviceEntry`` of kind ``aihub``): options
    ``device`` (AI Hub's device name), and optionally ``compile_options``, ``profile_options``,
    ``job_timeout_s``."""
    o = entry.options
    return AiHubDevice(o.get("device", DEFAULT_DEVICE), name=entry.name, compile_options=o.get("compile_options", ""),
                       profile_options=o.get("profile_options", ""), job_timeout_s=o.get("job_timeout_s"))


def _external_data_files(onnx_path: Path) -> list[str]:
    """The external-data file names the ONNX model refers to (none for a model under 2 GB)."""
    import onnx

    m = onnx.load(str(onnx_path), load_external_data=False)
    names = set()
    for t in m.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            names.update(e.value for e in t.external_data if e.key == "location")
    return sorted(names)


def _probe(url: str, timeout_s: float) -> str:
    """Empty when ``url`` answers HTTP at all (any status), else why not; one try, bounded by ``timeout_s``."""
    import requests

    try:
        requests.get(url, timeout=timeout_s, allow_redirects=False)
    except requests.exceptions.RequestException as e:
        return type(e).__name__
    return ""


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _failed(record: Measurement, error: str) -> Measurement:
    record.status, record.error = "failed", error
    return record


def _job_name(export: Export, graph: str) -> str:
    idx = export.index
    parts = [idx.get("model", ""), idx.get("scheme", ""), idx.get("method", ""), graph, export.content_hash[:8]]
    return "-".join(p for p in parts if p)


def _version_key(v: str) -> tuple:
    return tuple(int(p) if p.isdigit() else 0 for p in (v or "0").split("."))


def _message(e: BaseException) -> str:
    lines = [ln.strip(" |┌┐└┘─") for ln in str(e).splitlines()]
    return " ".join(ln for ln in lines if ln) or type(e).__name__
