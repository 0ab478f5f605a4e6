"""The device inventory: which devices the pool may use, from a YAML file that users edit, plus the
phones adb sees attached.

Where the file is: ``$MQFARM_DEVICES`` if set (it must exist then), else ``devices.yaml`` in the current
folder if there is one; with no file the pool has the host and, where ``onnxruntime-qnn`` is installed,
the qnn-sim emulator. The format (every key optional)::

    host:                       # the onnxruntime CPU backend, always present
      threads: 1                # intra-op threads, pinned to the first N cores
      pin: true
    qnn_sim:                    # the QNN HTP emulator (outputs, not speed)
      enabled: true
      soc_model: "57"           # QNN SoC id: 57 = SM8650 (Snapdragon 8 Gen 3), 43 = SM8550
      htp_arch: "75"
    phones:                     # attached over USB or adb over Wi-Fi (adb connect HOST:PORT)
      - name: s24-a             # unique in the pool; default: the serial
        serial: R5CX1234ABC     # adb serial, or 192.168.1.20:5555
        soc: SM8650             # the kind's resource name is phone:<soc lowercase>
        runtime_dir: ~/qnn/aarch64-android   # pushed to the phone: qnn-net-run, libQnnHtp*.so, ...
        runtime_cmd: "./qnn-net-run --retrieve_context model.bin --backend libQnnHtp.so"
        allow_charging: false   # measure power while USB charges (readings are wrong then)
        max_temp_c: 40          # cool down to this battery temperature before a run, for at most
        cooldown_timeout_s: 600 #   this long (then the run fails, naming the temperature)
        current_unit: auto      # current_now units: auto (from the magnitude), uA or mA
    aihub:                      # Qualcomm AI Hub cloud devices (credentials: qai-hub configure)
      devices: ["Samsung Galaxy S24 (Family)"]
      compile_options: ""       # extra options of the compile / profile jobs, job timeout (seconds)
      profile_options: ""
      job_timeout_s: 3600
    lock_dir: ~/.mqfarm/device-locks   # one benchmark per device at a time, across processes

Every device is a :class:`DeviceEntry` (name, kind, options); backends are built from entries by
``devicelab.backends.create``. Errors name the file and the key path (``devices.yaml: phones[1].serial``).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ENV_FILE = "MQFARM_DEVICES"
DEFAULT_FILE = "devices.yaml"
DEFAULT_LOCK_DIR = "~/.mqfarm/device-locks"
AIHUB_DEFAULT_DEVICE = "Samsung Galaxy S24 (Family)"
KINDS = ("host", "qnn-sim", "adb", "aihub")


class InventoryError(ValueError):
    """The devices file is missing, unreadable or wrong; the message names the file and key."""


@dataclass(frozen=True)
class DeviceEntry:
    name: str  # unique in the pool
    kind: str  # one of KINDS
    options: dict = field(default_factory=dict)  # the backend's settings from the file (serial, runtime_dir...)
    source: str = "file"  # file | default | adb (discovered)


@dataclass
class Inventory:
    entries: list[DeviceEntry]
    path: Path | None = None  # the file read, None when built from defaults
    lock_dir: Path = field(default_factory=lambda: Path(DEFAULT_LOCK_DIR).expanduser())

    def names(self) -> list[str]:
        return [e.name for e in self.entries]

    def kinds(self) -> list[str]:
        return sorted({e.kind for e in self.entries})

    def get(self, name: str) -> DeviceEntry | None:
        return next((e for e in self.entries if e.name == name), None)


_HOST_KEYS = {"threads": int, "pin": bool}
_QNN_KEYS = {"enabled": bool, "soc_model": str, "htp_arch": str}
_PHONE_KEYS = {"name": str, "serial": str, "soc": str, "runtime_dir": str, "runtime_cmd": str,
               "allow_charging": bool, "min_battery_pct": (int, float), "max_temp_c": (int, float),
               "cooldown_timeout_s": (int, float), "current_unit": str, "baseline_s": (int, float)}
_AIHUB_KEYS = {"devices": list, "compile_options": str, "profile_options": str, "job_timeout_s": (int, float)}
_TOP_KEYS = ("host", "qnn_sim", "phones", "aihub", "lock_dir")


def default_path() -> Path | None:
    """The devices file to read: $MQFARM_DEVICES, else ./devices.yaml when it exists, else None."""
    env = os.environ.get(ENV_FILE)
    if env:
        return Path(env).expanduser()
    p = Path(DEFAULT_FILE)
    return p if p.is_file() else None


def _check(where: str, section: dict, allowed: dict) -> dict:
    if not isinstance(section, dict):
        raise InventoryError(f"{where}: must be a mapping, got {type(section).__name__}")
    for k, v in section.items():
        if k not in allowed:
            raise InventoryError(f"{where}.{k}: unknown key; known keys here: {', '.join(allowed)}")
        typ = allowed[k]
        if not isinstance(v, typ) or (typ is int and isinstance(v, bool)):
            names = " or ".join(t.__name__ for t in (typ if isinstance(typ, tuple) else (typ,)))
            raise InventoryError(f"{where}.{k}: must be {names}, got {v!r}")
    return dict(section)


def cpu_limit() -> int:
    """The CPUs this process may run on (its affinity, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def yaml_error_line(e: Exception) -> str:
    """A YAML error in one line: where, and what (a ``!!python/...`` tag is refused by the safe loader)."""
    mark = getattr(e, "problem_mark", None)
    where = f"line {mark.line + 1} column {mark.column + 1}: " if mark is not None else ""
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    if "could not determine a constructor for the tag" in problem:
        problem = problem.replace("could not determine a constructor for the tag",
                                  "the tag is not allowed (only plain YAML is read):")
    return f"not valid YAML: {where}{problem}"


def qnn_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("onnxruntime_qnn") is not None


def parse(data: dict | None, path: Path | None = None) -> Inventory:
    """Validate the file's content (already parsed YAML) into an Inventory."""
    label = str(path) if path else "devices"
    data = data or {}
    if not isinstance(data, dict):
        raise InventoryError(f"{label}: a devices file must be a mapping ({', '.join(_TOP_KEYS)})")
    for k in data:
        if k not in _TOP_KEYS:
            raise InventoryError(f"{label}: {k}: unknown key; known keys: {', '.join(_TOP_KEYS)}")
    host = _check(f"{label}: host", data.get("host") or {}, _HOST_KEYS)
    if host.get("threads", 1) < 1:
        raise InventoryError(f"{label}: host.threads: must be at least 1, got {host['threads']}")
    if host.get("threads", 1) > cpu_limit():  # more threads than cores only thrash (load average in the hundreds)
        raise InventoryError(f"{label}: host.threads: {host['threads']} is more than this machine's {cpu_limit()} "
                             "CPUs (the limit)")
    entries = [DeviceEntry("host", "host", host, "file" if "host" in data else "default")]
    qnn = _check(f"{label}: qnn_sim", data.get("qnn_sim") or {}, _QNN_KEYS)
    if qnn.pop("enabled", True) and qnn_available():
        entries.append(DeviceEntry("qnn-sim", "qnn-sim", qnn, "file" if "qnn_sim" in data else "default"))
    phones = data.get("phones") or []
    if not isinstance(phones, list):
        raise InventoryError(f"{label}: phones: must be a list of phones (name, serial, runtime_dir, ...)")
    for i, ph in enumerate(phones):
        ph = _check(f"{label}: phones[{i}]", ph, _PHONE_KEYS)
        if not ph.get("serial"):
            raise InventoryError(f"{label}: phones[{i}].serial: required (the adb serial, or HOST:PORT)")
        name = ph.pop("name", None) or ph["serial"]
        entries.append(DeviceEntry(name, "adb", ph))
    hub = data.get("aihub")
    if hub is not None:
        hub = _check(f"{label}: aihub", hub, _AIHUB_KEYS)
        shared = {k: v for k, v in hub.items() if k != "devices"}
        for j, dev in enumerate(hub.get("devices", [AIHUB_DEFAULT_DEVICE])):
            if not isinstance(dev, str) or not dev:
                raise InventoryError(f"{label}: aihub.devices[{j}]: must be an AI Hub device name, got {dev!r}")
            entries.append(DeviceEntry(f"aihub:{dev}", "aihub", {"device": dev, **shared}))
    seen: dict[str, int] = {}
    for e in entries:
        if e.name in seen:
            raise InventoryError(f"{label}: device name {e.name!r} is used twice; names must be unique")
        seen[e.name] = 1
    lock_dir = data.get("lock_dir", DEFAULT_LOCK_DIR)
    if not isinstance(lock_dir, str):
        raise InventoryError(f"{label}: lock_dir: must be a folder path, got {lock_dir!r}")
    return Inventory(entries, path, Path(lock_dir).expanduser())


def load(path: str | Path | None = None, discover: bool = True) -> Inventory:
    """Read the devices file (``path``, else :func:`default_path`) and add the phones adb sees that the
    file does not name (``discover``)."""
    explicit = path is not None or bool(os.environ.get(ENV_FILE))
    p = Path(path).expanduser() if path is not None else default_path()
    data = None
    if p is not None:
        if not p.is_file():
            why = f" (from ${ENV_FILE})" if path is None and explicit else ""
            raise InventoryError(f"devices file {p}{why} does not exist")
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise InventoryError(f"{p}: {yaml_error_line(e)}") from None
    inv = parse(data, p)
    return add_discovered(inv) if discover else inv


def defaults(discover: bool = True) -> Inventory:
    """The pool without a devices file (whatever $MQFARM_DEVICES or ./devices.yaml say): host, qnn-sim
    where installed, and the phones adb sees."""
    inv = parse(None)
    return add_discovered(inv) if discover else inv


def add_discovered(inv: Inventory) -> Inventory:
    """Add the phones adb sees that the inventory does not name (by serial)."""
    known = {e.options.get("serial") for e in inv.entries if e.kind == "adb"}
    for entry in discover_adb():
        if entry.options.get("serial") not in known and inv.get(entry.name) is None:
            inv.entries.append(entry)
    return inv


def adb_server_address() -> tuple[str, int]:
    """Where the adb server listens: $ANDROID_ADB_SERVER_ADDRESS / $ANDROID_ADB_SERVER_PORT, else 127.0.0.1:5037."""
    return (os.environ.get("ANDROID_ADB_SERVER_ADDRESS", "127.0.0.1"),
            int(os.environ.get("ANDROID_ADB_SERVER_PORT", "5037")))


def _server_listening(host: str, port: int, timeout: float = 0.3) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def discover_adb() -> list[DeviceEntry]:
    """Phones attached to a running adb server, as ``adb`` entries named by serial (source ``adb``).

    Never starts a server and never raises: no server, or a server that fails, means no phones. Only
    phones in state ``device`` are listed (not offline or unauthorized ones); each one's SoC comes from
    ``getprop ro.soc.model`` when it answers within 5 s.
    """
    host, port = adb_server_address()
    if not _server_listening(host, port):
        return []
    try:
        import adbutils

        client = adbutils.AdbClient(host=host, port=port, socket_timeout=5)
        listed = [i for i in client.list(extended=True) if i.state == "device"]
    except Exception:  # adbutils missing, or the server went away / answered garbage: no phones
        return []
    entries = []
    for info in listed:
        options = {"serial": info.serial}
        try:  # the SoC names the Ray resource (phone:sm8650); a phone that does not answer stays listed
            soc = client.device(info.serial).shell("getprop ro.soc.model", timeout=5).strip()
            if soc:
                options["soc"] = soc
        except Exception:
            pass
        if info.tags.get("model"):
            options["model"] = info.tags["model"]
        entries.append(DeviceEntry(info.serial, "adb", options, "adb"))
    return entries
