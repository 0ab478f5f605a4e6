"""A protocol-level stand-in for an Android phone's adbd, on 127.0.0.1, for tests of the ``adb`` backend.

No phone can exist on this machine, so this speaks the DEVICE side of the adb wire protocol (AOSP
``protocol.txt``, ``SERVICES.TXT``, ``SYNC.TXT``) and the real adb server binary that adbutils ships reaches
it with ``adb connect 127.0.0.1:PORT``, exactly as it reaches a phone over Wi-Fi. Everything above the
socket (the adb server, adbutils, our backend) is the real code path.

What it speaks:

* transport: ``CNXN`` (our banner carries ``ro.product.*`` and ``features=shell_v2,cmd,stat_v2,ls_v2,
  sendrecv_v2``; no AUTH), ``OPEN``/``OKAY``/``WRTE``/``CLSE`` with one unacknowledged ``WRTE`` per stream
  and direction (no ``delayed_ack``);
* ``shell:CMD`` (v1: stdout and stderr merged, no exit code) and ``shell,v2,...:CMD`` (stdout / stderr /
  exit packets);
* ``sync:`` with ``STAT``/``LIST``/``SEND``/``RECV`` and the v2 forms the adb client uses when the features
  are advertised (``STA2``/``LST2``/``LIS2``/``SND2``/``RCV2``, no compression).

The phone's file system is a folder (``root``): device paths map under it (``/data/local/tmp`` is the
sandbox where pushed files land and commands run). Shell commands run under ``sh`` with those paths
rewritten and ``root/bin`` first on ``PATH``, where ``getprop``, ``dumpsys`` and ``df`` read state files the
stand-in refreshes before every command, as are the sysfs battery files
``/sys/class/power_supply/battery/{current_now,voltage_now,temp,capacity,status}``.

Power model (what tests check energy against): the battery delivers ``idle_ma``, plus ``load_ma`` while a
pushed qnn-net-run loads its context (CPU and I/O work), plus ``active_ma - idle_ma`` while it executes
(the NPU): the runtime appends its phases to ``.standin/events`` and :meth:`PhoneStandIn.phases` reads them,
so a test knows the energy drawn during execute alone (:meth:`PhoneStandIn.execute_energy_mj`). The fuel
gauge is modelled as phones have it: ``current_now`` changes only every ``gauge_period_s`` and then holds
the average true current over the period that ended ``gauge_lag_s`` earlier, with a deterministic
+-``noise`` relative jitter per update. Real gauges update about once a second; tests use a short period
(0.05 s) so they stay fast, and the same rules (at least 10 updates inside the execute phase) then need
0.65 s of execute instead of 13 s.

Knobs (:class:`Phone`): vendor units and sign of ``current_now`` (µA or mA, negative while discharging),
a hot phone whose temperature falls over time, charging over USB, small free storage, battery nodes that
SELinux keeps unreadable (``cat`` says "Permission denied", as on user builds that deny shell access to
them), and a disconnect ``disconnect_after_s`` seconds into the first matching workload (the connection
drops and the port stops listening, as when a phone leaves the Wi-Fi). Compiled contexts are registered
with :meth:`PhoneStandIn.register_export` (what each binary computes, for tests/data/adb_runtime/qnn-net-run).
"""

from __future__ import annotations

import os
import queue
import random
import re
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

A_CNXN, A_OPEN, A_OKAY, A_CLSE, A_WRTE, A_AUTH = (int.from_bytes(c, "little") for c in
                                                 (b"CNXN", b"OPEN", b"OKAY", b"CLSE", b"WRTE", b"AUTH"))
A_VERSION = 0x01000001
MAX_PAYLOAD = 256 * 1024
FEATURES = "shell_v2,cmd,stat_v2,ls_v2,sendrecv_v2"
SANDBOX = "/data/local/tmp"
BATTERY = "/sys/class/power_supply/battery"

# shell protocol v2 packet ids (adb's shell_protocol.h)
SH_STDIN, SH_STDOUT, SH_STDERR, SH_EXIT, SH_CLOSE_STDIN = 0, 1, 2, 3, 4


@dataclass
class Phone:
    """What the stand-in pretends to be. Currents in mA, voltage in V, temperatures in °C, sizes in bytes."""

    model: str = "SM-S928B"
    manufacturer: str = "samsung"
    device: str = "e3q"
    soc: str = "SM8650"
    platform: str = "pineapple"
    fingerprint: str = "samsung/e3qxxx/e3q:14/UP1A.231005.007/S928BXXU1AXB5:user/release-keys"
    android: str = "14"
    sdk: int = 34
    battery_pct: int = 85
    voltage_v: float = 3.95
    idle_ma: float = 180.0
    active_ma: float = 1150.0
    noise: float = 0.02  # relative jitter of each current read, uniform in +-noise
    current_unit: str = "uA"  # how current_now is written: "uA" (most vendors) or "mA"
    negative_discharge: bool = True  # current_now < 0 while discharging (Pixel-style) or > 0
    temperature_c: float = 31.0  # at start
    cooling_c_per_s: float = 0.0  # a hot phone cools at this rate towards ambient_c
    ambient_c: float = 30.0
    charging: bool = False  # plugged into USB and charging
    free_bytes: int = 48 * 2**30  # free space in /data before anything is pushed
    disconnect_after_s: float | None = None  # drop off the network this long into the first matching workload
    disconnect_match: str = ""  # regex a workload's command must match to arm the disconnect ("" = any)
    seed: int = 0
    load_ma: float = 600.0  # extra current while a context loads (CPU, I/O), never the NPU's
    gauge_period_s: float = 0.05  # fuel-gauge update period (real phones: about 1 s)
    gauge_lag_s: float = 0.05  # how late each update reports its period's average
    sysfs_readable: bool = True  # False: SELinux denies reading current_now / voltage_now / temp
    qnn_version: str = "v2.51.0.260929181845"  # what the pushed qnn-net-run reports


@dataclass
class Draw:
    """One command that ran a program from the sandbox, and its wall-clock span."""

    command: str
    start: float
    end: float | None = None


class _Stream:
    """One adb stream (an OPENed service): bytes in from the server, WRTE out with flow control."""

    def __init__(self, conn: "_Connection", local_id: int, remote_id: int):
        self.conn, self.local_id, self.remote_id = conn, local_id, remote_id
        self.inbox: queue.Queue = queue.Queue()
        self.buffer = b""
        self.can_write = threading.Event()
        self.can_write.set()
        self.closed = threading.Event()

    def read_exact(self, n: int) -> bytes:
        while len(self.buffer) < n:
            chunk = self.inbox.get()
            if chunk is None:
                raise EOFError("stream closed by the adb server")
            self.buffer += chunk
        out, self.buffer = self.buffer[:n], self.buffer[n:]
        return out

    def write(self, data: bytes) -> None:
        for i in range(0, len(data), self.conn.max_payload):
            while not self.can_write.wait(0.05):
                if self.closed.is_set() or self.conn.dead:
                    raise EOFError("stream closed")
            if self.closed.is_set() or self.conn.dead:
                raise EOFError("stream closed")
            self.can_write.clear()
            self.conn.send(A_WRTE, self.local_id, self.remote_id, data[i:i + self.conn.max_payload])

    def close(self) -> None:
        if not self.closed.is_set():
            self.closed.set()
            self.conn.send(A_CLSE, self.local_id, self.remote_id)
            self.conn.streams.pop(self.local_id, None)


class _Connection:
    """One TCP connection from the adb server: the transport of one device."""

    def __init__(self, phone: "PhoneStandIn", sock: socket.socket):
        self.phone, self.sock = phone, sock
        self.lock = threading.Lock()
        self.streams: dict[int, _Stream] = {}
        self.next_id = 1
        self.max_payload = MAX_PAYLOAD
        self.dead = False

    def send(self, cmd: int, arg0: int, arg1: int, data: bytes = b"") -> None:
        header = struct.pack("<6I", cmd, arg0, arg1, len(data), sum(data) & 0xFFFFFFFF, cmd ^ 0xFFFFFFFF)
        with self.lock:
            if self.dead:
                raise EOFError("connection dropped")
            try:
                self.sock.sendall(header + data)
            except OSError as e:
                self.dead = True
                raise EOFError(f"connection dropped: {e}") from None

    def _recv_exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise EOFError
            buf += chunk
        return buf

    def serve(self) -> None:
        try:
            while True:
                cmd, arg0, arg1, length, _crc, magic = struct.unpack("<6I", self._recv_exact(24))
                if magic != cmd ^ 0xFFFFFFFF:
                    raise EOFError(f"bad packet magic {magic:#x}")
                data = self._recv_exact(length) if length else b""
                self._dispatch(cmd, arg0, arg1, data)
        except (EOFError, OSError):
            pass
        finally:
            self.drop()

    def _dispatch(self, cmd: int, arg0: int, arg1: int, data: bytes) -> None:
        if cmd == A_CNXN:
            self.max_payload = min(MAX_PAYLOAD, arg1)
            self.send(A_CNXN, A_VERSION, MAX_PAYLOAD, self.phone.banner().encode())
        elif cmd == A_OPEN:
            service = data.rstrip(b"\0").decode("utf-8", "replace")
            local_id = self.next_id
            self.next_id += 1
            handler = self.phone.handler_for(service)
            if handler is None:
                self.send(A_CLSE, 0, arg0)
                return
            stream = _Stream(self, local_id, arg0)
            self.streams[local_id] = stream
            self.send(A_OKAY, local_id, arg0)
            threading.Thread(target=self._run_handler, args=(handler, stream, service), daemon=True).start()
        elif cmd == A_WRTE:
            stream = self.streams.get(arg1)
            if stream is not None:
                stream.inbox.put(data)
                self.send(A_OKAY, arg1, arg0)
        elif cmd == A_OKAY:
            stream = self.streams.get(arg1)
            if stream is not None:
                stream.remote_id = arg0
                stream.can_write.set()
        elif cmd == A_CLSE:
            stream = self.streams.pop(arg1, None)
            if stream is not None:
                stream.closed.set()
                stream.inbox.put(None)

    def _run_handler(self, handler, stream: _Stream, service: str) -> None:
        try:
            handler(stream, service)
        except (EOFError, OSError):
            pass
        finally:
            try:
                stream.close()
            except (EOFError, OSError):
                pass

    def drop(self) -> None:
        with self.lock:
            self.dead = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        for stream in list(self.streams.values()):
            stream.closed.set()
            stream.inbox.put(None)
        self.streams.clear()


class PhoneStandIn:
    """An adb device on ``127.0.0.1:port`` backed by the folder ``root``. Use as a context manager."""

    def __init__(self, root: Path, phone: Phone | None = None, serialno: str = "R5CX10ABCDE"):
        self.root = Path(root)
        self.phone = phone or Phone()
        self.serialno = serialno
        self.draws: list[Draw] = []
        self.sync_requests: list[str] = []  # sync request ids in arrival order (STAT, SND2, ...)
        self.disconnected = threading.Event()
        self._lock = threading.Lock()
        self._active: dict[int, Draw] = {}
        self._procs: set[subprocess.Popen] = set()
        self._conns: list[_Connection] = []
        self._rng = random.Random(self.phone.seed)
        self._t0 = time.monotonic()
        self._listener: socket.socket | None = None
        self._armed = False
        self.port = 0
        self._gauge_stop = threading.Event()
        self.gauge_times: list[float] = []
        self._setup_root()

    # ---- life cycle
    def start(self) -> "PhoneStandIn":
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(4)
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()
        threading.Thread(target=self._gauge, daemon=True).start()
        return self

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self._go_offline()

    def __enter__(self) -> "PhoneStandIn":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = _Connection(self, sock)
            self._conns.append(conn)
            threading.Thread(target=conn.serve, daemon=True).start()

    def _go_offline(self) -> None:
        """Leave the network: stop listening, drop the transport, kill what runs (the phone walked away)."""
        with self._lock:
            now = time.monotonic()
            for d in self._active.values():
                d.end = d.end or now
            self._active.clear()
        self._gauge_stop.set()
        self.disconnected.set()
        if self._listener is not None:
            try:
                self._listener.close()
            except OSError:
                pass
        for conn in list(self._conns):
            conn.drop()
        for proc in list(self._procs):
            _kill(proc)

    # ---- state the shell sees
    def banner(self) -> str:
        p = self.phone
        return (f"device::ro.product.name={p.device};ro.product.model={p.model};ro.product.device={p.device};"
                f"features={FEATURES}")

    def heat(self, temperature_c: float) -> None:
        """The phone is this hot now (a previous job warmed it); it cools from here at ``cooling_c_per_s``."""
        with self._lock:
            self.phone.temperature_c, self._t0 = temperature_c, time.monotonic()

    def temperature_c(self) -> float:
        p = self.phone
        return max(p.ambient_c, p.temperature_c - p.cooling_c_per_s * (time.monotonic() - self._t0))

    # ---- power: phases the runtime reports, and the fuel gauge
    def phases(self) -> list[tuple[str, float, float]]:
        """(phase, start, end) in time.monotonic seconds, from the runtime's events (an open phase ends now)."""
        path = self.root / ".standin" / "events"
        out, open_ = [], {}
        if not path.exists():
            return out
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) != 3:
                continue
            t, phase, what = int(parts[0]) / 1e9, parts[1], parts[2]
            if what == "begin":
                open_[phase] = t
            elif phase in open_:
                out.append((phase, open_.pop(phase), t))
        now = time.monotonic()
        out += [(phase, t, now) for phase, t in open_.items()]
        return out

    def _level(self, phase: str) -> float:
        p = self.phone
        return p.active_ma - p.idle_ma if phase == "execute" else p.load_ma if phase == "load" else 0.0

    def mean_current_ma(self, a: float, b: float) -> float:
        """True battery current (mA) averaged over [a, b]: idle plus each phase's excess over its overlap."""
        if b <= a:
            return self.phone.idle_ma
        extra = sum(self._level(ph) * max(0.0, min(b, e) - max(a, s)) for ph, s, e in self.phases())
        return self.phone.idle_ma + extra / (b - a)

    def execute_energy_mj(self) -> float:
        """Energy drawn above idle during execute phases alone (mA x V x s = mJ)."""
        p = self.phone
        return sum((p.active_ma - p.idle_ma) * p.voltage_v * (e - s) for ph, s, e in self.phases() if ph == "execute")

    def execute_seconds(self) -> float:
        return sum(e - s for ph, s, e in self.phases() if ph == "execute")

    def _gauge(self) -> None:
        """Updates on a fixed grid of ``gauge_period_s`` (a busy machine can delay one; the next keeps the
        grid); :attr:`gauge_times` keeps when each update happened."""
        p, bat = self.phone, self.root / BATTERY[1:]
        nxt = time.monotonic() + p.gauge_period_s
        while not self._gauge_stop.wait(max(0.0, nxt - time.monotonic())):
            now = time.monotonic()
            true_ma = self.mean_current_ma(now - p.gauge_period_s - p.gauge_lag_s, now - p.gauge_lag_s)
            self._write_gauge(bat, true_ma)
            self.gauge_times.append(now)
            nxt += p.gauge_period_s
            if nxt < now:  # fell more than a period behind: restart the grid from now
                nxt = now + p.gauge_period_s

    def _write_gauge(self, bat: Path, true_ma: float) -> None:
        p = self.phone
        if p.charging:
            true_ma = -(900.0 - true_ma)  # charger current flows into the battery
        with self._lock:
            jitter = 1.0 + self._rng.uniform(-p.noise, p.noise)
        read_ma = true_ma * jitter * (-1.0 if p.negative_discharge else 1.0)
        current = read_ma * 1000.0 if p.current_unit == "uA" else read_ma
        _write_atomic(bat / "current_now", f"{int(round(current))}\n")
        _write_atomic(bat / "voltage_now", f"{int(p.voltage_v * 1e6)}\n")
        _write_atomic(bat / "temp", f"{int(round(self.temperature_c() * 10))}\n")

    def register_export(self, export: Path, ms_per_inference: float = 20.0, load_ms: float = 50.0,
                        qnn_version: str | None = None) -> int:
        """Tell the phone's (simulated) HTP what each context binary of ``export``'s compiled-* folders computes:
        keyed by the binary's sha256 (compile.json), the export graph it came from, the SoC and QNN version
        it was built for, its input and output tensors. Returns how many binaries were registered."""
        import json

        export = Path(export)
        index = json.loads((export / "export.json").read_text())
        reg_path = self.root / ".standin" / "contexts.json"
        reg = json.loads(reg_path.read_text())
        n = 0
        for comp in sorted(export.glob("compiled-*/compile.json")):
            rec = json.loads(comp.read_text())
            for graph, info in rec["graphs"].items():
                binary = info["context_binary"]
                g = index["graphs"][graph]
                kv = index.get("kv_encoding") or {}

                def tensor(spec):
                    t = {"name": spec["name"], "shape": spec["shape"], "dtype": spec["dtype"],
                         "native_dtype": "int32" if spec["dtype"] == "int64" else spec["dtype"]}
                    enc = spec.get("encoding") or kv.get({"k_cache": "k", "k_out": "k", "v_cache": "v",
                                                          "v_out": "v"}.get(spec["name"], ""))
                    if spec["dtype"] == "uint8" and enc:
                        t["scale"] = float(enc["scale"])
                        t["zero_point"] = (-float(enc["aimet_offset"]) if "aimet_offset" in enc
                                           else -float(enc["offset"]))
                    return t

                reg["contexts"][info["files"][binary]["sha256"]] = {
                    "onnx": str((export / g["file"]).resolve()), "graph": f"{graph}_qnn",
                    "soc_model": rec["target"]["soc_model"], "htp_arch": rec["target"]["htp_arch"],
                    "qnn_version": qnn_version or info.get("qnn_version") or rec["versions"].get("qnn", "2.0.0"),
                    "inputs": [tensor(s) for s in g["inputs"]], "outputs": [tensor(s) for s in g["outputs"]],
                    "ms_per_inference": ms_per_inference, "load_ms": load_ms}
                n += 1
        _write_atomic(reg_path, json.dumps(reg))
        return n

    def register_context(self, sha256: str, entry: dict) -> None:
        import json

        reg_path = self.root / ".standin" / "contexts.json"
        reg = json.loads(reg_path.read_text())
        reg["contexts"][sha256] = entry
        _write_atomic(reg_path, json.dumps(reg))

    def used_bytes(self) -> int:
        return sum(f.stat().st_size for f in (self.root / SANDBOX[1:]).rglob("*") if f.is_file())

    def free_bytes(self) -> int:
        return max(0, self.phone.free_bytes - self.used_bytes())

    def props(self) -> dict[str, str]:
        p = self.phone
        return {"ro.product.model": p.model, "ro.product.manufacturer": p.manufacturer,
                "ro.product.device": p.device, "ro.product.name": p.device, "ro.soc.model": p.soc,
                "ro.soc.manufacturer": "QTI", "ro.board.platform": p.platform, "ro.hardware": "qcom",
                "ro.build.fingerprint": p.fingerprint, "ro.build.version.release": p.android,
                "ro.build.version.sdk": str(p.sdk), "ro.product.cpu.abi": "arm64-v8a",
                "ro.serialno": self.serialno}

    def _setup_root(self) -> None:
        (self.root / SANDBOX[1:]).mkdir(parents=True, exist_ok=True)
        (self.root / BATTERY[1:]).mkdir(parents=True, exist_ok=True)
        state, bin_ = self.root / ".standin", self.root / "bin"
        state.mkdir(exist_ok=True)
        bin_.mkdir(exist_ok=True)
        (state / "props").write_text("".join(f"[{k}]: [{v}]\n" for k, v in self.props().items()))
        scripts = {
            "getprop": f'if [ $# -eq 0 ]; then cat "{state}/props"; else '
                       f'sed -n "s/^\\[$1\\]: \\[\\(.*\\)\\]$/\\1/p" "{state}/props"; fi\n',
            "dumpsys": f'if [ "$1" = battery ]; then cat "{state}/battery"; '
                       f'elif [ "$1" = thermalservice ]; then cat "{state}/thermal"; '
                       f'else echo "Can\'t find service: $1" >&2; exit 1; fi\n',
            "df": f'cat "{state}/df"\n',
            # SELinux on user builds: reading the fuel gauge's nodes from the shell is denied
            "cat": f'if [ -f "{state}/sysfs_denied" ]; then for a in "$@"; do case "$a" in '
                   f'*/power_supply/battery/*) echo "cat: $a: Permission denied" >&2; exit 1;; esac; done; fi; '
                   f'exec /bin/cat "$@"\n',
        }
        for name, body in scripts.items():
            (bin_ / name).write_text("#!/bin/sh\n" + body)
            (bin_ / name).chmod(0o755)
        # pushed python runtimes find this interpreter first on PATH (no pyenv shim start-up per call)
        # a wrapper, not a symlink: a venv's interpreter finds its packages only when run by its own path
        link = bin_ / "python3"
        link.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
        link.chmod(0o755)
        import json

        soc_ids = {"SM8650": ("57", "75"), "SM8550": ("43", "73"), "SM8450": ("36", "69")}
        soc_model, arch = soc_ids.get(self.phone.soc.upper(), ("0", "0"))
        (state / "contexts.json").write_text(json.dumps({"contexts": {}, "phone": {"soc_model": soc_model,
                                                                                   "htp_arch": arch}}))
        (state / "events").write_text("")
        if not self.phone.sysfs_readable:
            (state / "sysfs_denied").write_text("")
        (state / "thermal").write_text("IsStatusOverride: false\nThermal Status: 0\n")
        self._write_gauge(self.root / BATTERY[1:], self.phone.idle_ma)
        self._refresh()

    def _refresh(self) -> None:
        """Write what getprop / dumpsys / df and the sysfs battery files show at this instant."""
        p = self.phone
        state, bat = self.root / ".standin", self.root / BATTERY[1:]
        temp = self.temperature_c()
        status = "Charging" if p.charging else "Discharging"
        files = {"capacity": f"{p.battery_pct}\n", "status": status + "\n"}
        for name, text in files.items():
            _write_atomic(bat / name, text)
        _write_atomic(state / "battery", 
            "Current Battery Service state:\n"
            "  AC powered: false\n"
            f"  USB powered: {'true' if p.charging else 'false'}\n"
            "  Wireless powered: false\n"
            "  Dock powered: false\n"
            "  Max charging current: 3000000\n"
            "  Max charging voltage: 5000000\n"
            "  Charging counter: 3987000\n"
            f"  status: {2 if p.charging else 3}\n"
            "  health: 2\n"
            "  present: true\n"
            f"  level: {p.battery_pct}\n"
            "  scale: 100\n"
            f"  voltage: {int(p.voltage_v * 1000)}\n"
            f"  temperature: {int(round(temp * 10))}\n"
            "  technology: Li-ion\n")
        total_k = 230942304
        free_k = self.free_bytes() // 1024
        _write_atomic(
            state / "df",
            "Filesystem        1K-blocks     Used Available Use% Mounted on\n"
            f"/dev/block/dm-48  {total_k} {total_k - free_k} {free_k} {100 * (total_k - free_k) // total_k}% /data\n")

    # ---- services
    def handler_for(self, service: str):
        if service.startswith("shell"):
            return self._shell
        if service == "sync:":
            return self._sync
        return None

    def host_path(self, device_path: str) -> Path:
        """Where a device path lives in ``root``; refuses paths that climb out of it."""
        path = (self.root / device_path.lstrip("/")).resolve()
        if path != self.root.resolve() and self.root.resolve() not in path.parents:
            raise PermissionError(device_path)
        return path

    def _rewrite(self, command: str) -> str:
        root = str(self.root.resolve())
        return re.sub(r"(?<![\w.])/(data|sys|sdcard)(?=/|\b)", lambda m: root + m.group(0), command)

    def _shell(self, stream: _Stream, service: str) -> None:
        head, _, command = service.partition(":")
        v2 = "v2" in head.split(",")[1:]
        if not command.strip():  # interactive shells are not offered
            if v2:
                stream.write(_shell_packet(SH_STDERR, b"interactive shell not supported\n"))
                stream.write(_shell_packet(SH_EXIT, bytes([1])))
            return
        self._refresh()
        workload = _WORKLOAD.search(command) is not None
        env = {"PATH": f"{self.root / 'bin'}:/usr/bin:/bin", "HOME": str(self.root / SANDBOX[1:]),
               "ANDROID_DATA": str(self.root / "data"), "LANG": "C",
               "MQ_STANDIN_STATE": str(self.root / ".standin"), "MQ_STANDIN_ROOT": str(self.root.resolve()),
               "MQ_STANDIN_QNN_VERSION": self.phone.qnn_version}
        proc = subprocess.Popen(["sh", "-c", self._rewrite(command)], cwd=self.root, env=env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE if v2 else subprocess.STDOUT, start_new_session=True)
        self._procs.add(proc)
        if workload:
            self._begin_workload(proc, command)
        try:
            threading.Thread(target=_drain, args=(stream,), daemon=True).start()
            pumps = [threading.Thread(target=self._pump, args=(proc.stdout, stream, SH_STDOUT if v2 else None),
                                      daemon=True)]
            if v2:
                pumps.append(threading.Thread(target=self._pump, args=(proc.stderr, stream, SH_STDERR), daemon=True))
            for t in pumps:
                t.start()
            while proc.poll() is None:
                if stream.closed.is_set() or stream.conn.dead:
                    _kill(proc)
                time.sleep(0.005)
            for t in pumps:
                t.join()
            if v2 and not stream.conn.dead:
                stream.write(_shell_packet(SH_EXIT, bytes([proc.returncode & 0xFF])))
        finally:
            _kill(proc)
            self._procs.discard(proc)
            if workload:
                self._end_workload(proc)

    @staticmethod
    def _pump(pipe, stream: _Stream, packet_id: int | None) -> None:
        try:
            for chunk in iter(lambda: pipe.read1(65536), b""):
                stream.write(_shell_packet(packet_id, chunk) if packet_id is not None else chunk)
        except (EOFError, OSError, ValueError):
            pass

    def _begin_workload(self, proc: subprocess.Popen, command: str) -> None:
        p = self.phone
        with self._lock:
            self._active[proc.pid] = d = Draw(command, time.monotonic(), None)
            self.draws.append(d)
            arm = (p.disconnect_after_s is not None and not self._armed
                   and re.search(p.disconnect_match, command) is not None)
            self._armed = self._armed or arm
        if arm:
            timer = threading.Timer(p.disconnect_after_s, self._go_offline)
            timer.daemon = True
            timer.start()

    def _end_workload(self, proc: subprocess.Popen) -> None:
        with self._lock:
            d = self._active.pop(proc.pid, None)
            if d is not None and d.end is None:
                d.end = time.monotonic()

    def _sync(self, stream: _Stream, service: str) -> None:
        while True:
            try:
                ident, length = struct.unpack("<4sI", stream.read_exact(8))
            except EOFError:
                return
            if ident == b"QUIT":
                return
            path = stream.read_exact(length).decode("utf-8", "replace")
            self.sync_requests.append(ident.decode("ascii", "replace"))
            {b"STAT": self._sync_stat_v1, b"STA2": self._sync_stat_v2, b"LST2": self._sync_stat_v2,
             b"LIST": self._sync_list, b"LIS2": self._sync_list, b"SEND": self._sync_send,
             b"SND2": self._sync_send, b"RECV": self._sync_recv, b"RCV2": self._sync_recv,
             }.get(ident, self._sync_unknown)(stream, path, ident)

    def _sync_unknown(self, stream: _Stream, path: str, ident: bytes) -> None:
        _sync_fail(stream, f"unknown sync command {ident!r}")

    def _lstat(self, path: str) -> os.stat_result | None:
        try:
            return os.lstat(self.host_path(path))
        except (OSError, PermissionError):
            return None

    def _sync_stat_v1(self, stream: _Stream, path: str, ident: bytes) -> None:
        st = self._lstat(path)
        mode, size, mtime = (st.st_mode, st.st_size, int(st.st_mtime)) if st else (0, 0, 0)
        stream.write(b"STAT" + struct.pack("<3I", mode, size & 0xFFFFFFFF, mtime))

    def _sync_stat_v2(self, stream: _Stream, path: str, ident: bytes) -> None:
        st = self._lstat(path)
        if st is None:
            stream.write(ident + struct.pack("<IQQ4IQqqq", 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0))  # ENOENT
            return
        stream.write(ident + struct.pack("<IQQ4IQqqq", 0, st.st_dev, st.st_ino, st.st_mode, st.st_nlink,
                                         2000, 2000, st.st_size, int(st.st_atime), int(st.st_mtime),
                                         int(st.st_ctime)))

    def _sync_list(self, stream: _Stream, path: str, ident: bytes) -> None:
        v2 = ident == b"LIS2"
        try:
            folder = self.host_path(path)
            names = sorted(os.listdir(folder)) if folder.is_dir() else []
        except (OSError, PermissionError):
            folder, names = None, []
        for name in names:
            st = os.lstat(folder / name)
            raw = name.encode()
            if v2:
                stream.write(b"DNT2" + struct.pack("<IQQ4IQqqqI", 0, st.st_dev, st.st_ino, st.st_mode, st.st_nlink,
                                                   2000, 2000, st.st_size, int(st.st_atime), int(st.st_mtime),
                                                   int(st.st_ctime), len(raw)) + raw)
            else:
                stream.write(b"DENT" + struct.pack("<4I", st.st_mode, st.st_size & 0xFFFFFFFF, int(st.st_mtime),
                                                   len(raw)) + raw)
        if v2:
            stream.write(b"DONE" + bytes(struct.calcsize("<IQQ4IQqqqI")))
        else:
            stream.write(b"DONE" + bytes(16))

    def _sync_send(self, stream: _Stream, path: str, ident: bytes) -> None:
        dry_run = False
        if ident == b"SND2":
            _id, mode, flags = struct.unpack("<4sII", stream.read_exact(12))
            dry_run = bool(flags & 0x80000000)  # SyncFlag::kDryRun: receive, store nothing
        else:
            path, _, mode_text = path.rpartition(",")  # SEND's path is "PATH,MODE" (MODE in decimal)
            mode = int(mode_text) if mode_text.isdigit() else 0o100644
        data = bytearray()
        while True:
            chunk_id, n = struct.unpack("<4sI", stream.read_exact(8))
            if chunk_id == b"DATA":
                data += stream.read_exact(n)
            elif chunk_id == b"DONE":
                mtime = n
                break
            else:
                _sync_fail(stream, f"unexpected {chunk_id!r} in SEND")
                return
        if path.endswith("/"):
            _sync_fail(stream, f"couldn't create file: Is a directory: {path}")
            return
        try:
            target = self.host_path(path)
        except PermissionError:
            _sync_fail(stream, f"couldn't create file: Permission denied: {path}")
            return
        if dry_run:
            stream.write(b"OKAY" + bytes(4))
            return
        if len(data) > self.free_bytes():
            _sync_fail(stream, f"write failed: No space left on device: {path}")
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(bytes(data))
        target.chmod(stat.S_IMODE(mode) or 0o644)
        os.utime(target, (mtime, mtime))
        stream.write(b"OKAY" + bytes(4))

    def _sync_recv(self, stream: _Stream, path: str, ident: bytes) -> None:
        if ident == b"RCV2":
            stream.read_exact(8)  # RCV2 + flags (no compression offered)
        try:
            data = self.host_path(path).read_bytes()
        except (OSError, PermissionError) as e:
            _sync_fail(stream, f"open failed: {e.strerror or 'Permission denied'}")
            return
        for i in range(0, len(data), 64 * 1024):
            chunk = data[i:i + 64 * 1024]
            stream.write(b"DATA" + struct.pack("<I", len(chunk)) + chunk)
        stream.write(b"DONE" + bytes(4))


# a workload runs a program from the sandbox: a simple command (after VAR=value assignments) whose word is
# ./something or /data/local/tmp/...; housekeeping (mkdir, rm, cat of sysfs, df) draws no extra current
_WORKLOAD = re.compile(r"(?:^|[;&|(\n])\s*(?:(?:do|then|else|exec)\s+)?(?:\w+=(?:\"[^\"]*\"|\S*)\s+)*"
                       r"(?:\./|/data/local/tmp/)\S+", re.M)


def _write_atomic(path: Path, text: str) -> None:
    """Replace a state file in one step: shells of other streams may be reading it right now."""
    tmp = path.with_name(f".{path.name}.{threading.get_ident()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _shell_packet(packet_id: int, data: bytes) -> bytes:
    return struct.pack("<BI", packet_id, len(data)) + data


def _sync_fail(stream: _Stream, message: str) -> None:
    raw = message.encode()
    stream.write(b"FAIL" + struct.pack("<I", len(raw)) + raw)


def _drain(stream: _Stream) -> None:
    """Consume what the server sends on a shell stream (stdin packets we do not use) so it never blocks."""
    while not stream.closed.is_set():
        try:
            if stream.inbox.get(timeout=0.2) is None:
                return
        except queue.Empty:
            continue


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()


class AdbServer:
    """The adb server binary that adbutils ships, on a port of its own with HOME in a test folder.

    Never port 5037 (a developer's or another test's server may own it); stopped with ``adb kill-server``
    on its own port only. mDNS, USB and emulator scanning are off so it talks to nothing but loopback.
    """

    def __init__(self, home: Path, port: int | None = None):
        from adbutils import adb_path

        self.adb = adb_path()
        self.home = Path(home)
        self.home.mkdir(parents=True, exist_ok=True)
        self.port = port or _free_port()
        self.env = {**os.environ, "HOME": str(self.home), "ANDROID_ADB_SERVER_PORT": str(self.port),
                    "ADB_MDNS": "0", "ADB_MDNS_AUTO_CONNECT": "0", "ADB_USB": "0", "ADB_EMU": "0",
                    "ANDROID_USER_HOME": str(self.home / ".android")}

    def cli(self, *args: str, timeout: float = 20.0) -> subprocess.CompletedProcess:
        return subprocess.run([self.adb, "-P", str(self.port), *args], env=self.env, capture_output=True,
                              text=True, timeout=timeout)

    def start(self) -> "AdbServer":
        out = self.cli("start-server")
        if out.returncode != 0:
            raise RuntimeError(f"adb start-server on port {self.port} failed: {out.stderr or out.stdout}")
        return self

    def client(self):
        import adbutils

        return adbutils.AdbClient(host="127.0.0.1", port=self.port)

    def connect(self, phone: PhoneStandIn, timeout: float = 10.0) -> str:
        """``adb connect`` the stand-in and wait until the server lists it as ``device``; returns the serial."""
        msg = self.client().connect(phone.address, timeout=timeout)
        if "connected" not in msg:
            raise RuntimeError(f"adb connect {phone.address}: {msg}")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(i.serial == phone.address and i.state == "device" for i in self.client().list()):
                return phone.address
            time.sleep(0.05)
        raise RuntimeError(f"{phone.address} never came online in the adb server on port {self.port}")

    def stop(self) -> None:
        self.cli("kill-server")

    def __enter__(self) -> "AdbServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    if port == 5037:
        return _free_port()
    return port

