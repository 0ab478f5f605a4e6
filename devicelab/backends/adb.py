"""``adb``: an Android phone (USB, or ``adb connect HOST:PORT`` over Wi-Fi) running the user's QNN SDK.

* ``prepare(EXPORT, windows=...)``: the export's ``compiled-<soc>/`` for THIS phone's SoC (no other one:
  a context binary loads only on the SoC it was compiled for), its ``compile.json`` (which QNN built each
  binary), the 8 runtime files for the phone's HTP arch (:func:`devicelab.qnn_sdk.sdk_files`; a missing
  one is named), raw inputs and an input list per graph (:mod:`devicelab.net_inputs`: real token ids
  from the caller for prefill, a cache filled by a real prefill for decode) and the perf config; checks
  free storage for all of it plus the outputs the runs will write, pushes it once, and refuses a phone
  runtime older than the QNN that built the binary (both versions named).
* ``run(prepared, workload)``: battery, charging and cool-down checks, then ONE ``adb shell`` that starts
  the phone-side gauge sampler (:mod:`devicelab.power`), idles ``baseline_s``, runs ONE qnn-net-run
  process for the block (``--num_inferences warmup+repeats``, ``--keep_num_outputs 1``,
  ``--shared_buffer``, ``--config_file`` with the burst perf profile) between two clock markers, idles
  ``baseline_s`` again. Samples are the per-inference execute times of the profile minus the first
  ``max(1, warmup)`` (the first inference warms caches and clocks); the context load (Init) time is a
  metric of its own (``context_load_ms``); energy is taken over the execute phase only
  (:func:`devicelab.power.execute_window`), or refused with the reason while the latency is kept.
* ``outputs(prepared, graph, n)``: one process over the first ``n`` input-list lines keeping all their
  outputs, pulled back (:mod:`devicelab.device_eval` scores them against onnxruntime's CPU).
* ``compare_blocks(prepared_by_label, workload, rounds)``: A/B blocks alternating in one shell session.

Conventions: latency in ms, power in mW above the idle baseline, energy per token in mJ (prefill: the
compiled prompt length per inference; decode: one token). A phone that leaves the adb server mid-run
raises :class:`~devicelab.protocol.DeviceLost` (the pool retries on another phone).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import net_inputs, power, qnn_sdk, stats
from ..android import Phone
from ..exported import Export, read_export
from ..genie import genie_command, parse_genie_profile
from ..inventory import DeviceEntry
from ..protocol import Device, DeviceError, DeviceInfo, DeviceLost, Health, Measurement, Workload

REMOTE_ROOT = "/data/local/tmp/mqfarm"


@dataclass
class AdbOptions:
    """Per-phone settings (the inventory's ``phones[]`` keys). Times in s, temperatures in °C."""

    runtime_dir: Path | None = None  # a QNN SDK root, or a flat folder holding the same files
    runtime_cmd: str = ""  # genie-t2t-run only: a command template (GENIE_CMD's placeholders)
    runtime: str = ""  # qnn-net-run | genie-t2t-run; default: from the folder's files
    min_battery_pct: float = 20.0
    max_temp_c: float = 40.0  # battery temperature to cool down to before a run
    cooldown_timeout_s: float = 600.0
    poll_s: float = 2.0
    allow_charging: bool = False
    baseline_s: float = 6.0  # idle before and after the process: several gauge periods at ~1 Hz
    sample_interval_s: float = 0.05  # the phone-side gauge sampler's sleep between reads
    run_timeout_s: float = 3600.0
    current_unit: str = "auto"  # auto | uA | mA
    lag_periods: float = 2.0  # how late the gauge may report, in update periods
    pull_dir: Path | None = None  # where outputs are pulled (default: a temporary folder)


@dataclass
class AdbPrepared:
    remote_dir: str
    contexts: dict  # graph name (or "*") -> file name in remote_dir
    runtime: str
    runtime_version: str
    model_id: str = ""
    pushed_bytes: int = 0
    files: list = field(default_factory=list)
    prompt_len: int | None = None
    inputs: dict = field(default_factory=dict)  # graph -> net_inputs.GraphInputs
    export: Export | None = None
    built_by: dict = field(default_factory=dict)  # graph -> QNN version that built its context binary
    target: dict = field(default_factory=dict)  # compile.json's target
    input_source: str = ""


class AdbDevice(Device):
    kind = "adb"

    def __init__(self, serial: str, *, name: str | None = None, options: AdbOptions | None = None,
                 server: tuple[str, int] | None = None, progress=None):
        self.serial = serial
        self.name = name or serial
        self.options = options or AdbOptions()
        self.phone = Phone(serial, self.name, server)
        self.server = self.phone.server
        self._progress = progress or _to_stderr
        self._info: DeviceInfo | None = None
        self._runtime_version = ""

    # -- identity and health ----------------------------------------------------------------------------

    def shell(self, cmd: str, what: str, timeout: float | None = 120.0, check: bool = True):
        return self.phone.shell(cmd, what, timeout, check)

    def info(self) -> DeviceInfo:
        """Model, SoC (``ro.soc.model``, else the board platform), build, runtime and its version (known once
        ``prepare`` asked the pushed runtime)."""
        if self._info is None:
            props = self.phone.props()
            soc = props["ro.soc.model"] or props["ro.board.platform"]
            extra = {"serial": self.serial, "android": props["ro.build.version.release"],
                     "sdk": props["ro.build.version.sdk"], "abi": props["ro.product.cpu.abi"],
                     "platform": props["ro.board.platform"]}
            if soc.upper() in qnn_sdk.SOCS:
                extra["soc_model"], extra["htp_arch"] = qnn_sdk.SOCS[soc.upper()]
            self._info = DeviceInfo(
                name=self.name, kind=self.kind,
                model=f"{props['ro.product.manufacturer']} {props['ro.product.model']}".strip(),
                soc=soc, os_build=props["ro.build.fingerprint"], runtime=self._runtime_kind(), extra=extra)
        self._info.runtime_version = self._runtime_version or self._info.runtime_version
        return self._info

    def battery(self) -> dict:
        return self.phone.battery()

    def free_bytes(self) -> int:
        return self.phone.free_bytes()

    def health(self) -> Health:
        state = self.phone.state()
        if state != "device":
            return Health(online=False, detail=f"{self.name}: adb state {state!r} (serial {self.serial})")
        try:
            bat = self.battery()
            free = self.free_bytes()
        except DeviceError as e:
            return Health(online=False, detail=str(e))
        return Health(online=True, battery_pct=bat["level_pct"], temperature_c=bat["temperature_c"],
                      charging=bat["charging"], free_storage_bytes=free)

    # -- what to push -------------------------------------------------------------------------------------

    def _runtime_kind(self) -> str:
        o = self.options
        if o.runtime:
            return o.runtime
        if "genie-t2t-run" in o.runtime_cmd:
            return "genie-t2t-run"
        if o.runtime_dir is not None:
            root = Path(o.runtime_dir).expanduser()
            if (root / "genie-t2t-run").is_file() and not (root / "qnn-net-run").is_file():
                return "genie-t2t-run"
        return "qnn-net-run"

    def htp_arch(self) -> str:
        info = self.info()
        return qnn_sdk.soc_arch(info.soc)[1] if info.soc.upper() in qnn_sdk.SOCS else ""

    def runtime_files(self) -> list[Path]:
        """The QNN SDK files for this phone's HTP arch, from an SDK root or a flat folder; DeviceError
        naming every missing one."""
        if self.options.runtime_dir is None:
            raise DeviceError(f"{self.name}: no runtime_dir: name your QNN SDK root (or a folder of its aarch64-android "
                              f"files) in the devices file under phones[].runtime_dir")
        root = Path(self.options.runtime_dir).expanduser()
        if not root.is_dir():
            raise DeviceError(f"{self.name}: runtime_dir {root} is not a folder")
        if self._runtime_kind() == "genie-t2t-run":
            return sorted(p for p in root.iterdir() if p.is_file())
        arch = self.htp_arch()
        if not arch:
            raise DeviceError(f"{self.name}: SoC {self.info().soc!r} has no known HTP arch (known SoCs: "
                              f"{', '.join(qnn_sdk.SOCS)})")
        wanted = qnn_sdk.sdk_files(arch)
        sdk = (root / "bin" / "aarch64-android").is_dir()
        paths = [root / f if sdk else root / Path(f).name for f in wanted]
        missing = [str(f) for f, p in zip(wanted, paths) if not p.is_file()]
        if missing:
            raise DeviceError(f"{self.name}: {'QNN SDK' if sdk else 'runtime folder'} {root} lacks "
                              f"{', '.join(missing if sdk else [Path(m).name for m in missing])} "
                              f"(needed for HTP v{arch}, the phone's {self.info().soc})")
        return paths

    def compiled_folder(self, model: Path) -> tuple[Path, Export | None, dict]:
        """The compiled folder for this phone, its export (None for a bare folder) and compile.json."""
        model = Path(model)
        if not model.exists():
            raise DeviceError(f"{self.name}: model {model} does not exist")
        soc = self.info().soc
        if (model / "export.json").is_file():
            export = read_export(model)
            compiled = sorted(p for p in model.glob("compiled-*") if p.is_dir())
            fitting = [p for p in compiled if soc and p.name.lower() == f"compiled-{soc.lower()}"]
            if not fitting:
                have = ", ".join(p.name for p in compiled) or "none"
                raise DeviceError(f"{self.name}: export {model} has no compiled-{soc.lower()} folder for this phone's "
                                  f"SoC {soc} (has: {have}); compile it for the phone first: farm compile {model} "
                                  f"--target {soc.lower()}")
            folder = fitting[0]
        else:
            folder = model
            export = read_export(model.parent) if (model.parent / "export.json").is_file() else None
        record = {}
        if (folder / "compile.json").is_file():
            record = json.loads((folder / "compile.json").read_text())
            want = qnn_sdk.SOCS.get(soc.upper(), (None, None))[0]
            got = str(record.get("target", {}).get("soc_model", ""))
            if want and got and got != want:
                raise DeviceError(f"{self.name}: {folder} was compiled for soc_model {got} "
                                  f"({record['target'].get('name', '?')}), this phone's {soc} is soc_model {want}: a "
                                  f"context binary loads only on the SoC it was compiled for")
        return folder, export, record

    # -- prepare ------------------------------------------------------------------------------------------

    def prepare(self, model: Path, windows: np.ndarray | None = None) -> AdbPrepared:
        """Push the runtime, the model and its inputs (see the module docstring). ``windows``: token ids,
        one row per prompt, of the compiled prompt length (real text from the caller); without them the
        export's synthetic ids are used and the record says so."""
        state = self.phone.state()
        if state != "device":
            raise DeviceLost(f"{self.name}: not available to the adb server (state {state!r}, serial {self.serial})")
        if self._runtime_kind() == "genie-t2t-run":
            return self._prepare_genie(Path(model))
        folder, export, record = self.compiled_folder(Path(model))
        runtime = self.runtime_files()
        graphs = record.get("graphs", {})
        bins = sorted(p.name for p in folder.iterdir() if p.suffix == ".bin")
        contexts = {g: info["context_binary"] for g, info in graphs.items() if info.get("context_binary") in bins}
        if not contexts:
            contexts = {g: b for g in ("prefill", "decode") for b in bins if b.startswith(g)}
        if not contexts:
            raise DeviceError(f"{self.name}: {folder} has no QNN context binary (.bin) to run")
        if export is None:
            raise DeviceError(f"{self.name}: {folder} is not inside an export folder: the inputs are written from "
                              f"the export's export.json")
        key_src = "\n".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in runtime + [folder / b for b in
                                                                                                 contexts.values()])
        remote = f"{REMOTE_ROOT}/{hashlib.sha256(key_src.encode()).hexdigest()[:12]}"
        stage = Path(tempfile.mkdtemp(prefix="mqfarm-adb-inputs-"))
        if windows is None:
            t = int(export.graph("prefill").meta.get("prompt_len", export.graph("prefill").inputs[0]["shape"][1]))
            windows = np.random.default_rng(0).integers(0, export.vocab_size, size=(1, t))
            source = "synthetic token ids (no windows given)"
        else:
            source = f"{len(windows)} window(s) of caller-given token ids"
        inputs = {g: net_inputs.write_inputs(export, g, windows, stage, remote) for g in contexts
                  if g in export.index.get("graphs", {})}
        soc_model, arch = qnn_sdk.soc_arch(self.info().soc)
        (stage / "htp_config.json").write_text(json.dumps(qnn_sdk.htp_config(soc_model, arch)))
        (stage / "htp_backend_ext.json").write_text(json.dumps(qnn_sdk.backend_config(f"{remote}/htp_config.json")))
        files = runtime + [folder / b for b in sorted(set(contexts.values()))] + sorted(stage.iterdir())
        names = [f.name for f in files]
        dupes = {n for n in names if names.count(n) > 1}
        if dupes:
            raise DeviceError(f"{self.name}: runtime and model both have {', '.join(sorted(dupes))}")
        sizes = {f.name: f.stat().st_size for f in files}
        present = self.phone.remote_sizes(remote)
        outputs = sum(net_inputs.output_bytes(export, g) * max(1, gi.lines) for g, gi in inputs.items())
        needed = sum(s for n, s in sizes.items() if present.get(n) != s) + outputs
        free = self.free_bytes()
        if needed > free:
            raise DeviceError(f"{self.name}: not enough storage: needs {needed} bytes in /data/local/tmp (model, "
                              f"runtime, inputs and {outputs} bytes of outputs), {free} bytes free (serial {self.serial})")
        self.shell(f"mkdir -p {remote}", f"create {remote}")
        pushed = 0
        staged = {f.name for f in stage.iterdir()}
        for f in files:
            # the runtime and the binaries are skipped when the phone has them at that size; inputs and
            # configs are always sent (other windows have the same sizes)
            if present.get(f.name) == sizes[f.name] and f.name not in staged:
                continue
            self._progress(f"{self.name}: push {f.name} ({sizes[f.name]} bytes)")
            self.phone.push(f, f"{remote}/{f.name}", mode=0o755)
            pushed += sizes[f.name]
        shutil.rmtree(stage, ignore_errors=True)
        version = self._probe_version(remote, "qnn-net-run")
        self._runtime_version = version
        built_by = {g: graphs.get(g, {}).get("qnn_version") or record.get("versions", {}).get("qnn", "")
                    for g in contexts}
        for g, v in built_by.items():
            qnn_sdk.check_runtime_version(self.name, version, v, f"{folder.name}/{contexts[g]}")
        prompt_len = export.index.get("graphs", {}).get("prefill", {}).get("prompt_len")
        return AdbPrepared(remote, contexts, "qnn-net-run", version, export.content_hash, pushed, names, prompt_len,
                           inputs, export, built_by, record.get("target", {}), source)

    def _prepare_genie(self, model: Path) -> AdbPrepared:
        files = [model] if model.is_file() else sorted(p for p in model.iterdir() if p.is_file())
        configs = [p.name for p in files if p.suffix == ".json" and "genie" in p.name]
        if not configs:
            raise DeviceError(f"{self.name}: {model} has no Genie config (*genie*.json) for genie-t2t-run")
        files = self.runtime_files() + files
        remote = f"{REMOTE_ROOT}/{hashlib.sha256(''.join(f.name for f in files).encode()).hexdigest()[:12]}"
        free, needed = self.free_bytes(), sum(f.stat().st_size for f in files)
        if needed > free:
            raise DeviceError(f"{self.name}: not enough storage: needs {needed} bytes in /data/local/tmp, {free} "
                              f"bytes free (serial {self.serial})")
        self.shell(f"mkdir -p {remote}", f"create {remote}")
        for f in files:
            self.phone.push(f, f"{remote}/{f.name}", mode=0o755)
        version = self._probe_version(remote, "genie-t2t-run")
        self._runtime_version = version
        return AdbPrepared(remote, {"*": configs[0]}, "genie-t2t-run", version, "", needed, [f.name for f in files])

    def _probe_version(self, remote: str, kind: str) -> str:
        res = self.shell(f"cd {remote} && LD_LIBRARY_PATH={remote} ./{kind} --version", f"ask {kind} its version",
                         check=False)
        v = qnn_sdk.parse_version(res.stdout)
        return qnn_sdk.version_text(v) if v else ""

    # -- checks before a run --------------------------------------------------------------------------------

    def ready_for_run(self, workload: Workload) -> dict:
        """Battery level, charging vs power measurement, and a bounded cool-down wait."""
        o = self.options
        bat = self.battery()
        if bat["level_pct"] is not None and bat["level_pct"] < o.min_battery_pct:
            raise DeviceError(f"{self.name}: battery at {bat['level_pct']:.0f}%, below min_battery_pct "
                              f"{o.min_battery_pct:.0f}%: charge it first")
        allow = workload.allow_charging or o.allow_charging
        if workload.measure_power and bat["charging"] and not allow:
            how = "over USB" if bat["usb_powered"] else "(plugged in)"
            raise DeviceError(f"{self.name}: charging {how}, so current_now reads the charger, not the workload: "
                              f"refusing to measure; use adb over Wi-Fi with the cable out, disable charging, "
                              f"or set allow_charging (devices file, or the workload) to measure anyway")
        t0, start_temp = time.monotonic(), bat["temperature_c"]
        temp = start_temp
        while temp is not None and temp > o.max_temp_c:
            waited = time.monotonic() - t0
            if waited >= o.cooldown_timeout_s:
                raise DeviceError(f"{self.name}: still {temp:.1f} °C after {waited:.0f} s of cool-down (limit "
                                  f"max_temp_c {o.max_temp_c:.1f} °C, cooldown_timeout_s {o.cooldown_timeout_s:.0f})")
            self._progress(f"{self.name}: {temp:.1f} °C > {o.max_temp_c:.1f} °C, cooling down")
            time.sleep(min(o.poll_s, max(0.0, o.cooldown_timeout_s - waited)))
            temp = self.battery()["temperature_c"]
        return {"temperature_c_start": start_temp, "cooldown_s": round(time.monotonic() - t0, 3),
                "battery_pct": bat["level_pct"], "charging": bat["charging"]}

    # -- one shell session of blocks -----------------------------------------------------------------------

    def _context_for(self, prepared: AdbPrepared, graph: str) -> str:
        ctx = prepared.contexts.get(graph) or prepared.contexts.get("*")
        if ctx is None:
            raise DeviceError(f"{self.name}: the prepared model has no context binary for the {graph!r} graph "
                              f"(has {', '.join(sorted(prepared.contexts))})")
        return ctx

    def _session(self, blocks: list[tuple[str, AdbPrepared, str, int, int]], baseline_s: float, what: str) -> dict:
        """Run ``blocks`` (tag, prepared, graph, inferences, outputs to keep) as one adb shell: gauge sampler,
        idle, each block's qnn-net-run between clock markers, idle. Returns per-tag timings and the samples."""
        root = blocks[0][1].remote_dir
        sess = f"{root}/run"
        lines = [f"rm -rf {sess} && mkdir -p {sess}", power.sampler_script(f"{sess}/gauge.txt",
                                                                            self.options.sample_interval_s),
                 "SAMPLER=$!", f"date +%s%N > {sess}/idle0_start", f"sleep {baseline_s:g}"]
        for tag, prep, graph, n, keep in blocks:
            gi = prep.inputs.get(graph)
            if gi is None:
                raise DeviceError(f"{self.name}: no inputs were prepared for the {graph!r} graph")
            run = qnn_sdk.NetRun(prep.remote_dir, self._context_for(prep, graph), gi.list_file, f"{sess}/{tag}",
                                 inferences=n, keep_outputs=keep)
            lines += [f"date +%s%N > {sess}/{tag}.t0",
                      f"{run.command()} > {sess}/{tag}.log 2>&1 || {{ rc=$?; kill $SAMPLER; cat {sess}/{tag}.log >&2; "
                      f"exit $rc; }}",
                      f"date +%s%N > {sess}/{tag}.t1"]
        lines += [f"date +%s%N > {sess}/idle1_start", f"sleep {baseline_s:g}", f"date +%s%N > {sess}/idle1_end",
                  "kill $SAMPLER", "wait $SAMPLER 2>/dev/null; true"]
        self._progress(f"{self.name}: {what}")
        self.shell("\n".join(lines), what, timeout=self.options.run_timeout_s)
        out = {"blocks": {}}
        for tag, prep, graph, n, keep in blocks:
            viewer = f"cd {root} && LD_LIBRARY_PATH={root} ./qnn-profile-viewer --input_log {sess}/{tag}/qnn-profiling-data_0.log"
            text = self.shell(f"{viewer} --output {sess}/{tag}/profile.csv", f"read the profile of {tag}")
            csv_text = self.phone.read_text(f"{sess}/{tag}/profile.csv")
            summary = qnn_sdk.parse_profile_viewer(text)
            times = qnn_sdk.parse_profile_csv(csv_text)
            if len(times) != n:
                raise DeviceError(f"{self.name}: {tag}: the profile holds {len(times)} inferences, {n} were run")
            t0 = int(self.phone.read_text(f"{sess}/{tag}.t0").split()[0]) / 1e9
            t1 = int(self.phone.read_text(f"{sess}/{tag}.t1").split()[0]) / 1e9
            out["blocks"][tag] = {"times_us": times, "summary": summary, "t0": t0, "t1": t1}
        marks = {k: int(self.phone.read_text(f"{sess}/{k}").split()[0]) / 1e9 for k in ("idle0_start", "idle1_start",
                                                                                         "idle1_end")}
        out["idle"] = [(marks["idle0_start"], blocks_start(out)), (marks["idle1_start"], marks["idle1_end"])]
        out["samples"], out["sample_errors"] = power.parse_samples(self.phone.read_text(f"{sess}/gauge.txt"))
        out["session"] = sess
        return out

    # -- run --------------------------------------------------------------------------------------------------

    def run(self, prepared: AdbPrepared, workload: Workload) -> Measurement:
        if workload.repeats < 1 or workload.warmup < 0:
            raise DeviceError(f"{self.name}: workload needs repeats >= 1 and warmup >= 0, got repeats "
                              f"{workload.repeats}, warmup {workload.warmup}")
        checks = self.ready_for_run(workload)
        if prepared.runtime == "genie-t2t-run":
            return self._run_genie(prepared, workload, checks)
        skip = max(1, workload.warmup)
        n = skip + workload.repeats
        tag = f"{workload.graph}_block"
        got = self._session([(tag, prepared, workload.graph, n, 1)],
                            self.options.baseline_s if workload.measure_power else 0.0,
                            f"{workload.graph}: one qnn-net-run of {n} inferences ({skip} left out)")
        block = got["blocks"][tag]
        per = [t / 1000.0 for t in block["times_us"][skip:]]
        tokens = (prepared.prompt_len or workload.prompt_len) if workload.graph == "prefill" else 1
        s = block["summary"]
        extra = {**checks, "runtime": "qnn-net-run", "context": self._context_for(prepared, workload.graph),
                 "inferences": n, "left_out": skip, "processes": 1, "context_load_ms": s.get("init_us", 0) / 1000.0,
                 "first_inference_ms": block["times_us"][0] / 1000.0, "tokens_per_sample": tokens,
                 "inputs": prepared.input_source, "built_by_qnn": prepared.built_by.get(workload.graph, ""),
                 "process_s": round(block["t1"] - block["t0"], 4)}
        temps = _temperatures(self.phone, got)
        extra.update(temps)
        rec = Measurement(device=self.info(), workload=workload, model_id=prepared.model_id, samples_ms=per,
                          latency_meaningful=True, **stats.summarize(per))
        if workload.graph == "decode":
            rec.tokens_per_s = 1000.0 / rec.median_ms
        if workload.measure_power:
            self._energy(rec, got, [block], tokens, extra)
        rec.extra = extra
        return rec

    def _energy(self, rec: Measurement, got: dict, blocks: list, tokens: int, extra: dict) -> None:
        errors = got["sample_errors"]
        if errors and len(got["samples"]) < 3:
            extra["energy"] = {"refused": f"the battery nodes cannot be read ({errors[0]}), so no energy: latency only"}
            return
        windows = []
        for b in blocks:
            s = b["summary"]
            before = s.get("libload_us", 0) + s.get("init_us", 0) + s.get("finalize_us", 0)
            windows.append(power.execute_window(b["t0"], b["t1"], before / 1e6,
                                                s.get("deinit_us", 0) / 1e6, sum(b["times_us"]) / 1e6))
        try:
            p = power.excess_power(got["samples"], windows[0], got["idle"], self.options.current_unit,
                                   self.options.lag_periods)
        except power.EnergyRefused as e:
            extra["energy"] = {"refused": f"{e}: latency only"}
            return
        rec.power_mw = p["power_mw"]
        rec.energy_mj_per_token = p["power_mw"] * rec.median_ms / 1000.0 / tokens
        extra["energy"] = {**p, "energy_mj_per_token_se": p["power_se_mw"] * rec.median_ms / 1000.0 / tokens,
                           "while_charging": extra.get("charging", False)}

    def outputs(self, prepared: AdbPrepared, graph: str = "prefill", n: int | None = None) -> tuple[Path, list]:
        """Run the first ``n`` input-list lines of ``graph`` in one process keeping every output, pull them;
        returns the local folder and the per-inference ``Result_i`` folders."""
        gi = prepared.inputs[graph]
        n = gi.lines if n is None else min(n, gi.lines)
        tag = f"{graph}_outputs"
        got = self._session([(tag, prepared, graph, n, n)], 0.0, f"{graph}: {n} inference(s), outputs kept")
        dest = Path(self.options.pull_dir or tempfile.mkdtemp(prefix="mqfarm-adb-")) / self.name.replace(":", "_") / tag
        dest.mkdir(parents=True, exist_ok=True)
        names = [o["name"] for o in prepared.export.graph(graph).outputs]
        results = []
        for i in range(n):
            d = dest / f"Result_{i}"
            d.mkdir(exist_ok=True)
            for name in names:
                self.phone.pull(f"{got['session']}/{tag}/Result_{i}/{name}.raw", d / f"{name}.raw")
            results.append(d)
        return dest, results

    def compare_blocks(self, prepared: dict, workload: Workload, rounds: int) -> dict:
        """Variants (label -> AdbPrepared) in alternating blocks, A B A B ..., in ONE shell session (one
        battery check, one cool-down, no baseline): one qnn-net-run per block with ``warmup + 1`` left-out
        inferences and ``ceil(repeats / rounds)`` measured ones; a variant's samples are its blocks' medians,
        one per round, so round i of A pairs with round i of B."""
        if rounds < 1:
            raise ValueError(f"rounds must be at least 1, got {rounds}")
        self.ready_for_run(Workload(**{**workload.to_dict(), "measure_power": False}))
        per = -(-workload.repeats // rounds)
        skip = max(1, workload.warmup)
        blocks = [(f"{label}_{r}", prep, workload.graph, skip + per, 1) for r in range(rounds)
                  for label, prep in prepared.items()]
        t0 = time.monotonic()
        got = self._session(blocks, 0.0, f"{len(blocks)} A/B blocks of {skip + per} inferences")
        wall = time.monotonic() - t0
        out = {}
        for label, prep in prepared.items():
            meds, loads = [], []
            for r in range(rounds):
                b = got["blocks"][f"{label}_{r}"]
                meds.append(stats.median([t / 1000.0 for t in b["times_us"][skip:]]))
                loads.append(b["summary"].get("init_us", 0) / 1000.0)
            rec = Measurement(device=self.info(), workload=workload, model_id=prep.model_id, samples_ms=meds,
                              **stats.summarize(meds))
            if workload.graph == "decode":
                rec.tokens_per_s = 1000.0 / rec.median_ms
            rec.extra = {"variant": label, "blocks": rounds, "inferences_per_block": skip + per, "left_out": skip,
                         "context_load_ms": stats.median(loads), "session_s": round(wall, 3),
                         "interleaved": {"rounds": rounds, "variants": list(prepared)},
                         "energy": {"refused": "A/B blocks measure latency only"}}
            out[label] = rec
        return out

    def _run_genie(self, prepared: AdbPrepared, workload: Workload, checks: dict) -> Measurement:
        runs = workload.warmup + workload.repeats
        command, outputs = genie_command(prepared.remote_dir, prepared.contexts["*"], workload.prompt_len, runs,
                                         self.options.runtime_cmd)
        self.shell(command, f"run genie-t2t-run ({runs} runs)", timeout=self.options.run_timeout_s)
        parsed = [parse_genie_profile(json.loads(self.phone.read_text(f"{prepared.remote_dir}/{o}")))
                  for o in outputs[workload.warmup:]]
        if workload.graph == "prefill":
            per = [p["ttft_ms"] for p in parsed]
        else:
            per = [1000.0 / p["tokens_per_s"] for p in parsed]
        rec = Measurement(device=self.info(), workload=workload, model_id=prepared.model_id, samples_ms=per,
                          **stats.summarize(per))
        rec.tokens_per_s = stats.median([p["tokens_per_s"] for p in parsed])
        rec.extra = {**checks, "runtime": "genie-t2t-run", "ttft_ms": [p["ttft_ms"] for p in parsed],
                     "generated_tokens": [p["generated_tokens"] for p in parsed],
                     "energy": {"refused": "genie-t2t-run runs are not split into execute phases"}}
        return rec


def blocks_start(got: dict) -> float:
    return min(b["t0"] for b in got["blocks"].values())


def _temperatures(phone: Phone, got: dict) -> dict:
    """Battery temperature read by the sampler while the blocks ran (sysfs ``temp``, tenths of °C), else one
    ``dumpsys battery`` right after."""
    lo, hi = blocks_start(got), max(b["t1"] for b in got["blocks"].values())
    temps = [s.temp for s in got["samples"] if s.temp is not None and lo <= s.t <= hi]
    if temps:
        return {"temperature_c_run_max": max(temps), "temperature_c_run_mean": float(np.mean(temps)),
                "temperature_source": "battery temp node, read during the run"}
    return {"temperature_c_after": phone.battery()["temperature_c"], "temperature_source": "dumpsys battery after the run"}


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def from_entry(entry: DeviceEntry) -> AdbDevice:
    o = dict(entry.options)
    opts = AdbOptions()
    if o.get("runtime_dir"):
        opts.runtime_dir = Path(o["runtime_dir"]).expanduser()
    opts.runtime_cmd = o.get("runtime_cmd", "")
    opts.allow_charging = bool(o.get("allow_charging", False))
    for key in ("min_battery_pct", "max_temp_c", "cooldown_timeout_s", "baseline_s"):
        if key in o:
            setattr(opts, key, float(o[key]))
    if "current_unit" in o:
        opts.current_unit = o["current_unit"]
    return AdbDevice(o["serial"], name=entry.name, options=opts)

