"""``adb``: an Android phone through adbutils and the adb server (USB, or ``adb connect HOST:PORT`` over Wi-Fi).

The reference's device step (MOBILEQUANT.md §7), made a backend:

* ``prepare``: push the compiled model and the runtime into ``/data/local/tmp/mqfarm/<key>/`` after checking
  free storage (a DeviceError names the phone, the bytes needed and the bytes free). The runtime is the
  user's QNN SDK for aarch64-android (``qnn-net-run``, ``qnn-profile-viewer``, ``libQnnHtp*.so`` and the
  ``hexagon-v75`` skel, taken from an SDK root or a flat folder), or Genie's ``genie-t2t-run``, or any
  command the inventory names (``runtime_cmd``);
* ``run``: check the battery level, wait (bounded) for the phone to cool down, refuse power measurement
  while it charges over USB unless ``allow_charging``, take an idle power baseline, run every repeat in one
  shell session while a background thread samples ``current_now``/``voltage_now``, pull the outputs, and
  parse the timings from the runtime's own report: ``qnn-profile-viewer``'s "Execute Stats (Average)"
  NetRun time per run (the reference's "Average latency", read from the Average block), or Genie's
  ``--profile`` JSON (time-to-first-token, token-generation-rate).

Conventions: latency samples in ms, one per run of the runtime (qnn-net-run: the average over its
``--num_inferences``; genie: TTFT for prefill, 1000 / tokens-per-second for decode); power in mW above the
idle baseline while the runs went on; energy per token in mJ = that power x the median sample / the tokens
one sample covers (prefill: the prompt's tokens, decode: one). ``current_now`` is µA on most phones and mA on
some, negative while discharging on some and positive on others: units are read from the magnitude
(``current_unit: auto``) or set per phone, and the sign is dropped while discharging. ``voltage_now`` is µV
(mV when the value is below 100000). A phone that leaves the adb server mid-run raises
:class:`~devicelab.protocol.DeviceLost`, which the pool retries on another phone of the same kind.
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from .. import stats
from ..exported import read_export
from ..inventory import DeviceEntry, adb_server_address
from ..protocol import Device, DeviceError, DeviceInfo, DeviceLost, Health, Measurement, Workload

REMOTE_ROOT = "/data/local/tmp/mqfarm"
BATTERY = "/sys/class/power_supply/battery"
QNN_SDK_FILES = ("bin/aarch64-android/qnn-net-run", "bin/aarch64-android/qnn-profile-viewer",
                 "lib/aarch64-android/libQnnHtp.so", "lib/aarch64-android/libQnnHtpV75Stub.so",
                 "lib/aarch64-android/libQnnHtpPrepare.so", "lib/aarch64-android/libQnnSystem.so",
                 "lib/aarch64-android/libQnnHtpNetRunExtensions.so", "lib/hexagon-v75/unsigned/libQnnHtpV75Skel.so")
QNN_CMD = ("LD_LIBRARY_PATH=. ADSP_LIBRARY_PATH=. ./qnn-net-run --retrieve_context={context} "
           "--backend=libQnnHtp.so --num_inferences={inferences} --perf_profile=burst --profiling_level=basic "
           "--output_dir={output_dir}{input_list}")
GENIE_CMD = "LD_LIBRARY_PATH=. ADSP_LIBRARY_PATH=. ./genie-t2t-run -c {config} -p {prompt} --profile {profile}"
_VERSION_RE = re.compile(r"v?(\d+\.\d+\.\d+(?:\.\d+)?)")


@dataclass
class AdbOptions:
    """Per-phone settings (the inventory's ``phones[]`` keys). Times in s, temperatures in °C."""

    runtime_dir: Path | None = None  # a QNN SDK root or a flat folder of files to push
    runtime_cmd: str = ""  # overrides the default command; placeholders as QNN_CMD / GENIE_CMD
    runtime: str = ""  # qnn-net-run | genie-t2t-run; default: from runtime_cmd or the folder's files
    inferences_per_run: int = 10  # qnn-net-run --num_inferences of one sample
    min_battery_pct: float = 20.0
    max_temp_c: float = 40.0  # battery temperature to cool down to before a run
    cooldown_timeout_s: float = 600.0
    poll_s: float = 2.0  # how often to read the temperature while cooling down
    allow_charging: bool = False
    baseline_s: float = 2.0  # idle power baseline taken right before the run
    sample_interval_s: float = 0.05
    run_timeout_s: float = 3600.0  # one run() of all repeats; a runtime that hangs longer fails the record
    current_unit: str = "auto"  # auto | uA | mA
    pull_dir: Path | None = None  # where run outputs are pulled (default: a temporary folder)


@dataclass
class AdbPrepared:
    remote_dir: str
    contexts: dict  # graph name (or "*") -> file name in remote_dir
    runtime: str
    runtime_version: str
    model_id: str = ""
    pushed_bytes: int = 0
    files: list = field(default_factory=list)
    prompt_len: int | None = None  # the compiled prefill graph's fixed prompt length, when the export says


class AdbDevice(Device):
    """One phone, by adb serial, through the adb server at ``server`` (default: $ANDROID_ADB_SERVER_*)."""

    kind = "adb"

    def __init__(self, serial: str, *, name: str | None = None, options: AdbOptions | None = None,
                 server: tuple[str, int] | None = None, progress=None):
        self.serial = serial
        self.name = name or serial
        self.options = options or AdbOptions()
        self.server = server or adb_server_address()
        self._progress = progress or _to_stderr
        self._client = None
        self._info: DeviceInfo | None = None
        self._runtime_version = ""

    # -- adb plumbing -----------------------------------------------------------------------------------

    def client(self):
        import adbutils

        if self._client is None:
            self._client = adbutils.AdbClient(host=self.server[0], port=self.server[1], socket_timeout=30)
        return self._client

    def _state(self) -> str:
        """The adb server's state for this serial (device, offline, unauthorized...), "absent" when unlisted."""
        try:
            for info in self.client().list():
                if info.serial == self.serial:
                    return info.state
        except Exception:  # no server, server died: the phone is not reachable, which is what we report
            return "absent"
        return "absent"

    def _device(self):
        return self.client().device(self.serial)

    def _lost_or_error(self, what: str, e: BaseException) -> DeviceError:
        state = self._state()
        if state != "device":
            return DeviceLost(f"{self.name}: lost while trying to {what} (adb state: {state}; {type(e).__name__}: {e})")
        return DeviceError(f"{self.name}: failed to {what}: {type(e).__name__}: {e}")

    def shell(self, cmd: str, what: str, timeout: float | None = 120.0, check: bool = True) -> str:
        """Run ``cmd`` with shell v2 (exit code and stderr kept); DeviceLost when the phone went away."""
        try:
            res = self._device().shell2(cmd, timeout=timeout, v2=True)
        except Exception as e:  # adbutils raises AdbError, EOFError, OSError, socket timeouts
            raise self._lost_or_error(what, e) from None
        if check and res.returncode != 0:
            raise DeviceError(f"{self.name}: failed to {what}: `{cmd}` exited with {res.returncode}: "
                              f"{(res.stderr or res.stdout).strip()[-400:]}")
        return res.stdout

    # -- identity and health ----------------------------------------------------------------------------

    PROPS = ("ro.product.manufacturer", "ro.product.model", "ro.soc.model", "ro.board.platform",
             "ro.build.fingerprint", "ro.build.version.release", "ro.build.version.sdk", "ro.product.cpu.abi")

    def info(self) -> DeviceInfo:
        """Model, SoC (``ro.soc.model``, Android 12+, else the board platform), build fingerprint, runtime
        and its version (known once ``prepare`` has asked the pushed runtime)."""
        if self._info is None:
            out = self.shell("; ".join(f"getprop {p}" for p in self.PROPS), "read its properties")
            props = dict(zip(self.PROPS, (out.splitlines() + [""] * len(self.PROPS))[:len(self.PROPS)]))
            self._info = DeviceInfo(
                name=self.name, kind=self.kind,
                model=f"{props['ro.product.manufacturer']} {props['ro.product.model']}".strip(),
                soc=props["ro.soc.model"] or props["ro.board.platform"], os_build=props["ro.build.fingerprint"],
                runtime=self._runtime_kind(), runtime_version="",
                extra={"serial": self.serial, "android": props["ro.build.version.release"],
                       "sdk": props["ro.build.version.sdk"], "abi": props["ro.product.cpu.abi"],
                       "platform": props["ro.board.platform"]})
        self._info.runtime_version = self._runtime_version or self._info.runtime_version
        return self._info

    def battery(self) -> dict:
        """``dumpsys battery``: level (%), temperature (°C), charging (USB/AC/wireless powered or status 2)."""
        out = self.shell("dumpsys battery", "read the battery state")
        kv = {}
        for line in out.splitlines():
            key, sep, value = line.strip().partition(":")
            if sep:
                kv[key.strip().lower()] = value.strip()
        powered = any(kv.get(f"{src} powered") == "true" for src in ("ac", "usb", "wireless"))
        usb = kv.get("usb powered") == "true"
        scale = float(kv.get("scale", 100) or 100)
        return {"level_pct": float(kv["level"]) * 100.0 / scale if "level" in kv else None,
                "temperature_c": float(kv["temperature"]) / 10.0 if "temperature" in kv else None,
                "charging": powered or kv.get("status") == "2", "usb_powered": usb}

    def free_bytes(self) -> int:
        """Free bytes where models go (``df -k`` of /data/local/tmp: 1K blocks, Available column)."""
        out = self.shell("df -k /data/local/tmp", "read free storage")
        rows = [r.split() for r in out.splitlines() if r.strip()]
        try:
            head = [h.lower() for h in rows[0]]
            col = head.index("available") if "available" in head else 3
            return int(rows[-1][col]) * 1024
        except (IndexError, ValueError):
            raise DeviceError(f"{self.name}: cannot read free storage from `df -k /data/local/tmp`: {out!r}") from None

    def health(self) -> Health:
        state = self._state()
        if state != "device":
            return Health(online=False, detail=f"{self.name}: adb state {state!r} (serial {self.serial})")
        try:
            bat = self.battery()
            free = self.free_bytes()
        except DeviceError as e:
            return Health(online=False, detail=str(e))
        return Health(online=True, battery_pct=bat["level_pct"], temperature_c=bat["temperature_c"],
                      charging=bat["charging"], free_storage_bytes=free)

    # -- prepare ----------------------------------------------------------------------------------------

    def _runtime_kind(self) -> str:
        o = self.options
        if o.runtime:
            return o.runtime
        if "genie-t2t-run" in o.runtime_cmd:
            return "genie-t2t-run"
        if o.runtime_dir is not None and not o.runtime_cmd:
            root = Path(o.runtime_dir).expanduser()
            if (root / "genie-t2t-run").is_file() and not (root / "qnn-net-run").is_file():
                return "genie-t2t-run"
        return "qnn-net-run"

    def runtime_files(self) -> list[Path]:
        """What to push for the runtime: the reference's QNN SDK files (MOBILEQUANT.md §7) from an SDK root,
        or every file of a flat runtime folder."""
        if self.options.runtime_dir is None:
            raise DeviceError(f"{self.name}: no runtime_dir: name the folder of qnn-net-run and libQnnHtp*.so for "
                              f"aarch64-android (or a QNN SDK root) in the devices file under phones[].runtime_dir")
        root = Path(self.options.runtime_dir).expanduser()
        if (root / "bin" / "aarch64-android").is_dir():
            files = [root / f for f in QNN_SDK_FILES if (root / f).is_file()]
            missing = [f for f in QNN_SDK_FILES[:3] if not (root / f).is_file()]
            if missing:
                raise DeviceError(f"{self.name}: QNN SDK {root} lacks {', '.join(missing)}")
            return files
        if not root.is_dir():
            raise DeviceError(f"{self.name}: runtime_dir {root} is not a folder")
        return sorted(p for p in root.iterdir() if p.is_file())

    def model_files(self, model: Path) -> tuple[list[Path], dict, str, int | None]:
        """The compiled model's files, the context binary per graph, the model id (export content hash) and
        the prefill graph's prompt length (from export.json, None without one).

        ``model``: a context binary (``.bin``), a compiled folder (``compiled-<target>/``: every file is
        pushed; ``prefill*.bin`` / ``decode*.bin`` serve those graphs, a single ``.bin`` serves both), or an
        export folder, whose ``compiled-*`` folder for this phone's SoC is used.
        """
        model = Path(model)
        if not model.exists():
            raise DeviceError(f"{self.name}: model {model} does not exist")
        model_id, export = "", None
        if (model / "export.json").is_file():
            export = read_export(model)  # ExportError for an unknown exporter or version
            compiled = sorted(p for p in model.glob("compiled-*") if p.is_dir())
            soc = self.info().soc.lower()
            fitting = [p for p in compiled if soc and soc in p.name.lower()] or compiled
            if not fitting:
                raise DeviceError(f"{self.name}: export {model} has no compiled-* folder; compile it for the phone "
                                  f"first (farm compile)")
            model = fitting[0]
        elif (model.parent / "export.json").is_file():
            export = read_export(model.parent)
        if export is not None:
            model_id = export.content_hash
            prompt_len = export.index.get("graphs", {}).get("prefill", {}).get("prompt_len")
        else:
            prompt_len = None
        files = [model] if model.is_file() else sorted(p for p in model.iterdir() if p.is_file())
        bins = [p.name for p in files if p.suffix == ".bin"]
        if self._runtime_kind() == "genie-t2t-run":
            configs = [p.name for p in files if p.suffix == ".json" and "genie" in p.name]
            if not configs:
                raise DeviceError(f"{self.name}: {model} has no Genie config (*genie*.json) for genie-t2t-run")
            return files, {"*": configs[0]}, model_id, prompt_len
        if not bins:
            raise DeviceError(f"{self.name}: {model} has no QNN context binary (.bin) to run")
        contexts = {g: b for g in ("prefill", "decode") for b in bins if b.startswith(g)}
        if len(bins) == 1:
            contexts["*"] = bins[0]
        return files, contexts, model_id, prompt_len

    def prepare(self, model: Path) -> AdbPrepared:
        state = self._state()
        if state != "device":
            raise DeviceLost(f"{self.name}: not available to the adb server (state {state!r}, serial {self.serial})")
        files, contexts, model_id, prompt_len = self.model_files(Path(model))
        files = self.runtime_files() + files
        names = [f.name for f in files]
        dupes = {n for n in names if names.count(n) > 1}
        if dupes:
            raise DeviceError(f"{self.name}: runtime and model both have {', '.join(sorted(dupes))}")
        key = hashlib.sha256("\n".join(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)
                             .encode()).hexdigest()[:12]
        remote = f"{REMOTE_ROOT}/{key}"
        sizes = {f.name: f.stat().st_size for f in files}
        present = self._remote_sizes(remote)
        needed = sum(size for n, size in sizes.items() if present.get(n) != size)
        free = self.free_bytes()
        if needed > free:
            raise DeviceError(f"{self.name}: not enough storage for the model and runtime: needs {needed} bytes in "
                              f"/data/local/tmp, {free} bytes free (serial {self.serial})")
        self.shell(f"mkdir -p {remote}", f"create {remote}")
        pushed = 0
        for f in files:
            if present.get(f.name) == sizes[f.name]:
                continue
            self._progress(f"{self.name}: push {f.name} ({sizes[f.name]} bytes)")
            try:
                self._device().sync.push(f, f"{remote}/{f.name}", mode=0o755)
            except Exception as e:
                raise self._lost_or_error(f"push {f} to {remote}", e) from None
            pushed += sizes[f.name]
        kind = self._runtime_kind()
        version = self._probe_version(remote, kind)
        self._runtime_version = version
        return AdbPrepared(remote, contexts, kind, version, model_id, pushed, names, prompt_len)

    def _remote_sizes(self, remote: str) -> dict:
        try:
            return {e.path: e.size for e in self._device().sync.list(remote) if e.path not in (".", "..")}
        except Exception as e:
            raise self._lost_or_error(f"list {remote}", e) from None

    def _probe_version(self, remote: str, kind: str) -> str:
        out = self.shell(f"cd {remote} && LD_LIBRARY_PATH=. ./{kind} --version", f"ask {kind} its version",
                         check=False)
        m = _VERSION_RE.search(out)
        return m.group(1) if m else ""

    # -- run ----------------------------------------------------------------------------------------------

    def ready_for_run(self, workload: Workload) -> dict:
        """The pre-run checks: battery level, charging vs power measurement, and a bounded cool-down wait.
        Returns what the record keeps (start temperature, seconds waited)."""
        o = self.options
        bat = self.battery()
        if bat["level_pct"] is not None and bat["level_pct"] < o.min_battery_pct:
            raise DeviceError(f"{self.name}: battery at {bat['level_pct']:.0f}%, below min_battery_pct "
                              f"{o.min_battery_pct:.0f}%: charge it first")
        allow = workload.allow_charging or o.allow_charging
        if workload.measure_power and bat["charging"] and not allow:
            how = "over USB" if bat["usb_powered"] else "(plugged in)"
            raise DeviceError(f"{self.name}: charging {how}, so current_now reads the charger, not the workload: "
                              f"refusing to measure power; use adb over Wi-Fi with the cable out, disable charging, "
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
        return {"temperature_c_start": start_temp, "temperature_c_run": temp,
                "cooldown_s": round(time.monotonic() - t0, 3), "battery_pct": bat["level_pct"],
                "charging": bat["charging"]}

    def run(self, prepared: AdbPrepared, workload: Workload) -> Measurement:
        if workload.repeats < 1 or workload.warmup < 0:
            raise DeviceError(f"{self.name}: workload needs repeats >= 1 and warmup >= 0, got repeats "
                              f"{workload.repeats}, warmup {workload.warmup}")
        checks = self.ready_for_run(workload)
        baseline = self._sample_for(self.options.baseline_s) if workload.measure_power else []
        runs = workload.warmup + workload.repeats
        if prepared.runtime == "genie-t2t-run":
            command, outputs = self._genie_command(prepared, workload, runs)
        else:
            command, outputs = self._qnn_command(prepared, workload, runs)
        sampler = _Sampler(self) if workload.measure_power else None
        if sampler:
            sampler.start()
        t0 = time.monotonic()
        try:
            self._progress(f"{self.name}: {prepared.runtime}, {workload.warmup} warm-up + {workload.repeats} runs")
            self.shell(command, f"run {prepared.runtime} ({runs} runs)", timeout=self.options.run_timeout_s)
        finally:
            window_s = time.monotonic() - t0
            samples = sampler.stop() if sampler else []
        if prepared.runtime == "genie-t2t-run":
            per_run, tokens_per_sample, extra = self._genie_results(prepared, workload, outputs[workload.warmup:])
        else:
            per_run, tokens_per_sample, extra = self._qnn_results(prepared, workload, outputs[workload.warmup:])
        extra.update(checks)
        try:  # the numbers are in hand: a failed pull is noted, not allowed to throw them away
            extra["pulled"] = self._pull(prepared, outputs[-1])
        except DeviceError as e:
            extra["pulled"] = {"error": str(e)}
        extra["window_s"] = round(window_s, 4)
        rec = Measurement(device=self.info(), workload=workload, model_id=prepared.model_id,
                          samples_ms=per_run, latency_meaningful=True, **stats.summarize(per_run))
        if workload.graph == "decode" or prepared.runtime == "genie-t2t-run":
            rec.tokens_per_s = extra.pop("tokens_per_s", None) or 1000.0 / rec.median_ms
        if workload.measure_power:
            if sampler.error is not None and len(samples) < 3:
                raise DeviceError(f"{self.name}: power sampling failed during the run: {sampler.error}")
            power = power_above_baseline(baseline, samples, self.options.current_unit)
            rec.power_mw = power["power_mw"]
            rec.energy_mj_per_token = power["power_mw"] * rec.median_ms / 1000.0 / tokens_per_sample
            extra["power"] = {**power, "energy_window_mj": power["power_mw"] * window_s, "skipped": sampler.skipped,
                              "while_charging": checks["charging"]}
        extra["tokens_per_sample"] = tokens_per_sample
        rec.extra = extra
        return rec

    def _context_for(self, prepared: AdbPrepared, graph: str) -> str:
        ctx = prepared.contexts.get(graph) or prepared.contexts.get("*")
        if ctx is None:
            raise DeviceError(f"{self.name}: the prepared model has no context binary for the {graph!r} graph "
                              f"(has {', '.join(sorted(prepared.contexts))})")
        return ctx

    def _qnn_command(self, prepared: AdbPrepared, workload: Workload, runs: int) -> tuple[str, list[str]]:
        ctx = self._context_for(prepared, workload.graph)
        input_list = " --input_list=input_list.txt" if "input_list.txt" in prepared.files else ""
        template = self.options.runtime_cmd or QNN_CMD
        outputs = [f"out/run_{i}" for i in range(runs)]
        body = template.format(context=ctx, inferences=self.options.inferences_per_run, output_dir="out/run_$i",
                               input_list=input_list)
        return (f"cd {prepared.remote_dir} && rm -rf out && mkdir -p out && "
                f"for i in $(seq 0 {runs - 1}); do {body} || exit $?; done"), outputs

    def _qnn_results(self, prepared: AdbPrepared, workload: Workload, outputs: list[str]):
        """One qnn-profile-viewer call per measured run (on the phone, the SDK's aarch64-android build)."""
        logs = " ".join(f"{o}/qnn-profiling-data_0.log" for o in outputs)
        text = self.shell(f"cd {prepared.remote_dir} && for f in {logs}; do echo '=== '$f; "
                          f"LD_LIBRARY_PATH=. ./qnn-profile-viewer --input_log $f || exit $?; done",
                          "read the profiles with qnn-profile-viewer")
        reports = [chunk for chunk in text.split("=== ")[1:]]
        if len(reports) != len(outputs):
            raise DeviceError(f"{self.name}: expected {len(outputs)} qnn-profile-viewer reports, got {len(reports)}")
        parsed = [parse_profile_viewer(r) for r in reports]
        per_run = [p["execute_avg_us"] / 1000.0 for p in parsed]
        # the compiled graph's prompt length is fixed: the export's wins over the workload's
        tokens = (prepared.prompt_len or workload.prompt_len) if workload.graph == "prefill" else 1
        return per_run, tokens, {"runtime": "qnn-net-run", "inferences_per_run": self.options.inferences_per_run,
                                 "init_ms": [p.get("init_us", 0) / 1000.0 for p in parsed],
                                 "context": self._context_for(prepared, workload.graph)}

    def _genie_command(self, prepared: AdbPrepared, workload: Workload, runs: int) -> tuple[str, list[str]]:
        prompt = shlex.quote(" ".join(["hello"] * workload.prompt_len))
        template = self.options.runtime_cmd or GENIE_CMD
        outputs = [f"out/profile_{i}.json" for i in range(runs)]
        body = template.format(config=prepared.contexts["*"], prompt=prompt, profile="out/profile_$i.json")
        return (f"cd {prepared.remote_dir} && rm -rf out && mkdir -p out && "
                f"for i in $(seq 0 {runs - 1}); do {body} > out/stdout_$i.txt || exit $?; done"), outputs

    def _genie_results(self, prepared: AdbPrepared, workload: Workload, outputs: list[str]):
        parsed = []
        for o in outputs:
            try:
                raw = self._device().sync.read_text(f"{prepared.remote_dir}/{o}")
            except Exception as e:
                raise self._lost_or_error(f"read the Genie profile {o}", e) from None
            parsed.append(parse_genie_profile(json.loads(raw)))
        if workload.graph == "prefill":
            per_run = [p["ttft_ms"] for p in parsed]
            tokens = stats.median([p["prompt_tokens"] for p in parsed])
        else:
            per_run = [1000.0 / p["tokens_per_s"] for p in parsed]
            tokens = 1
        return per_run, tokens, {"runtime": "genie-t2t-run", "tokens_per_s": stats.median(
            [p["tokens_per_s"] for p in parsed]), "ttft_ms": [p["ttft_ms"] for p in parsed],
            "generated_tokens": [p["generated_tokens"] for p in parsed]}

    def _pull(self, prepared: AdbPrepared, output: str) -> dict:
        """Pull the last run's outputs (the reference compares them against the simulation)."""
        dest = Path(self.options.pull_dir or tempfile.mkdtemp(prefix="mqfarm-adb-")) / self.name.replace(":", "_")
        dest.mkdir(parents=True, exist_ok=True)
        try:
            self._device().sync.pull(f"{prepared.remote_dir}/{output}", dest / Path(output).name, exist_ok=True)
        except Exception as e:
            raise self._lost_or_error(f"pull {output}", e) from None
        files = {str(p.relative_to(dest)): p.stat().st_size for p in sorted(dest.rglob("*")) if p.is_file()}
        return {"dir": str(dest), "files": files}

    def _read_power(self) -> tuple[float, int, int]:
        try:
            out = self._device().shell(f"cat {BATTERY}/current_now {BATTERY}/voltage_now", timeout=10)
        except Exception as e:
            raise self._lost_or_error("read current_now", e) from None
        try:
            cur, volt = out.split()[:2]
            return time.monotonic(), int(cur), int(volt)
        except ValueError:  # a v1 shell that lost its phone ends with no output and no error
            raise self._lost_or_error(f"read {BATTERY}/current_now and voltage_now",
                                      ValueError(f"unreadable output {out!r}")) from None

    def _sample_for(self, seconds: float) -> list:
        out, end, failures = [], time.monotonic() + seconds, 0
        while time.monotonic() < end or len(out) < 3:
            try:
                out.append(self._read_power())
            except DeviceLost:
                raise
            except DeviceError:  # one unreadable sample is not fatal; a phone that never answers is
                failures += 1
                if failures > 10 + len(out):
                    raise
            time.sleep(self.options.sample_interval_s)
        return out


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class _Sampler(threading.Thread):
    """Reads current_now / voltage_now through ``adb shell`` until stopped (each read is one round trip)."""

    def __init__(self, device: AdbDevice):
        super().__init__(daemon=True, name=f"power-{device.name}")
        self.device, self.samples, self.error, self.skipped = device, [], None, 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            try:
                self.samples.append(self.device._read_power())
            except DeviceLost as e:  # the run itself reports the loss; keep what was read
                self.error = e
                return
            except DeviceError as e:  # one unreadable sample (a sysfs file mid-update) is not fatal
                self.error = e
                self.skipped += 1
            self._stop_event.wait(self.device.options.sample_interval_s)

    def stop(self) -> list:
        self._stop_event.set()
        self.join()
        return self.samples


def _to_ma(values: list[int], unit: str) -> tuple[list[float], str]:
    """current_now in mA. ``auto``: µA when the typical magnitude is 20000 or more (20 mA in µA; 20 A in mA,
    which no phone draws)."""
    if unit == "auto":
        mags = sorted(abs(v) for v in values)
        unit = "uA" if mags and mags[len(mags) // 2] >= 20000 else "mA"
    if unit not in ("uA", "mA"):
        raise ValueError(f"current_unit must be auto, uA or mA, got {unit!r}")
    return [v / 1000.0 if unit == "uA" else float(v) for v in values], unit


def power_above_baseline(baseline: list, samples: list, current_unit: str = "auto") -> dict:
    """Average power (mW) above the idle baseline from (time, current_now, voltage_now) samples.

    The first and last 10% of the run's samples are dropped: the fuel gauge lags the load, and the sampler
    starts before and stops after the workload. Current magnitudes are used (the sign convention varies by
    vendor; while discharging every reading has the same sign).
    """
    if len(samples) < 3 or len(baseline) < 1:
        raise DeviceError(f"too few power samples ({len(samples)} during the run, {len(baseline)} idle) to "
                          f"measure power: lengthen the run (repeats, inferences_per_run) or the baseline")
    cut = len(samples) // 10
    run = samples[cut:len(samples) - cut]
    cur_run, unit = _to_ma([s[1] for s in run], current_unit)
    cur_idle, _ = _to_ma([s[1] for s in baseline], unit)
    volt = lambda v: v / 1e6 if abs(v) >= 100000 else v / 1e3  # µV, else mV  # noqa: E731
    p_run = sum(abs(c) * volt(s[2]) for c, s in zip(cur_run, run)) / len(run)
    p_idle = sum(abs(c) * volt(s[2]) for c, s in zip(cur_idle, baseline)) / len(baseline)
    return {"power_mw": p_run - p_idle, "run_mw": p_run, "idle_mw": p_idle, "current_unit": unit,
            "samples": len(run), "baseline_samples": len(baseline)}


_PV_SECTION = re.compile(r"^Execute Stats \((\w+)\):")
_PV_NETRUN = re.compile(r"^\s+NetRun:\s+(\d+)\s+us")
_PV_INIT = re.compile(r"^Init Stats:")


def parse_profile_viewer(text: str) -> dict:
    """The timings of one ``qnn-profile-viewer --input_log`` report (layout: tests/data/qnn_profile_viewer.txt).

    Returns ``execute_avg_us`` / ``execute_min_us`` / ``execute_max_us`` (the NetRun line of the "Execute
    Stats (Average|Min|Max)" blocks: one inference, wall time in qnn-net-run) and ``init_us``. The
    reference reads "Total Inference Time" NetRun as its average latency; here the Average block is taken
    explicitly, since Min and Max blocks repeat the same heading.
    """
    out, section = {}, None
    for line in text.splitlines():
        m = _PV_SECTION.match(line)
        if m:
            section = m.group(1).lower()
            continue
        if _PV_INIT.match(line):
            section = "init"
            continue
        if line and not line[0].isspace() and line.endswith("Stats:"):
            section = None
            continue
        m = _PV_NETRUN.match(line)
        if m and section in ("average", "min", "max") and f"execute_{section[:3]}_us" not in out:
            out[f"execute_{section[:3]}_us"] = int(m.group(1))
        elif m and section == "init" and "init_us" not in out:
            out["init_us"] = int(m.group(1))
    if "execute_ave_us" not in out:
        raise DeviceError("qnn-profile-viewer report has no 'Execute Stats (Average)' NetRun time; was "
                          "qnn-net-run run with --profiling_level=basic? Report starts: " + text[:300])
    out["execute_avg_us"] = out.pop("execute_ave_us")
    return out


def parse_genie_profile(profile: dict) -> dict:
    """TTFT (ms), tokens/s and token counts from a ``genie-t2t-run --profile`` JSON (layout:
    tests/data/genie_profile.json): the last ``GenieDialog_query`` event of the ``dialog`` component."""
    for comp in profile.get("components", []):
        if comp.get("type") != "dialog":
            continue
        queries = [e for e in comp.get("events", []) if e.get("type") == "GenieDialog_query"]
        if queries:
            q = queries[-1]

            def value(key):
                if key not in q or "value" not in q[key]:
                    raise DeviceError(f"Genie profile: GenieDialog_query has no {key!r}")
                return q[key]["value"]

            ttft = value("time-to-first-token")
            unit = q["time-to-first-token"].get("unit", "us")
            return {"ttft_ms": ttft / 1000.0 if unit == "us" else float(ttft),
                    "tokens_per_s": float(value("token-generation-rate")),
                    "prompt_tokens": int(value("num-prompt-tokens")),
                    "generated_tokens": int(value("num-generated-tokens"))}
    raise DeviceError("Genie profile has no dialog component with a GenieDialog_query event")


def from_entry(entry: DeviceEntry) -> AdbDevice:
    o = dict(entry.options)
    opts = AdbOptions()
    if o.get("runtime_dir"):
        opts.runtime_dir = Path(o["runtime_dir"]).expanduser()
    opts.runtime_cmd = o.get("runtime_cmd", "")
    opts.allow_charging = bool(o.get("allow_charging", False))
    for key, attr in (("min_battery_pct", "min_battery_pct"), ("max_temp_c", "max_temp_c"),
                      ("cooldown_timeout_s", "cooldown_timeout_s")):
        if key in o:
            setattr(opts, attr, float(o[key]))
    if "current_unit" in o:
        opts.current_unit = o["current_unit"]
    return AdbDevice(o["serial"], name=entry.name, options=opts)
