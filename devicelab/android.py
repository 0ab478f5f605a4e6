"""An Android phone through adbutils and the adb server: shell, files, identity and state.

Every failure names the phone; a phone the adb server no longer lists as ``device`` raises
:class:`~devicelab.protocol.DeviceLost` (the pool retries elsewhere), any other failure DeviceError.
"""

from __future__ import annotations

from pathlib import Path

from .inventory import adb_server_address
from .power import BATTERY
from .protocol import DeviceError, DeviceLost

PROPS = ("ro.product.manufacturer", "ro.product.model", "ro.soc.model", "ro.board.platform",
         "ro.build.fingerprint", "ro.build.version.release", "ro.build.version.sdk", "ro.product.cpu.abi")


class Phone:
    """One phone by serial, through the adb server at ``server`` (default: $ANDROID_ADB_SERVER_*)."""

    def __init__(self, serial: str, name: str, server: tuple[str, int] | None = None):
        self.serial, self.name = serial, name
        self.server = server or adb_server_address()
        self._client = None

    def client(self):
        import adbutils

        if self._client is None:
            self._client = adbutils.AdbClient(host=self.server[0], port=self.server[1], socket_timeout=30)
        return self._client

    def state(self) -> str:
        """The adb server's state for this serial (device, offline, unauthorized...), "absent" when unlisted."""
        try:
            for info in self.client().list():
                if info.serial == self.serial:
                    return info.state
        except Exception:  # no server, server died: the phone is not reachable, which is what we report
            return "absent"
        return "absent"

    def device(self):
        return self.client().device(self.serial)

    def lost_or_error(self, what: str, e: BaseException) -> DeviceError:
        state = self.state()
        if state != "device":
            return DeviceLost(f"{self.name}: lost while trying to {what} (adb state: {state}; {type(e).__name__}: {e})")
        return DeviceError(f"{self.name}: failed to {what}: {type(e).__name__}: {e}")

    def shell(self, cmd: str, what: str, timeout: float | None = 120.0, check: bool = True):
        """Run ``cmd`` with shell v2 (exit code and stderr kept); returns stdout, or the result when not
        ``check``."""
        try:
            res = self.device().shell2(cmd, timeout=timeout, v2=True)
        except Exception as e:  # adbutils raises AdbError, EOFError, OSError, socket timeouts
            raise self.lost_or_error(what, e) from None
        if check and res.returncode != 0:
            raise DeviceError(f"{self.name}: failed to {what}: exited with {res.returncode}: "
                              f"{(res.stderr or res.stdout).strip()[-600:]}")
        return res.stdout if check else res

    def props(self) -> dict:
        out = self.shell("; ".join(f"getprop {p}" for p in PROPS), "read its properties")
        return dict(zip(PROPS, (out.splitlines() + [""] * len(PROPS))[:len(PROPS)]))

    def battery(self) -> dict:
        """``dumpsys battery``: level (%), temperature (°C), charging (USB/AC/wireless powered or status 2)."""
        out = self.shell("dumpsys battery", "read the battery state")
        kv = {}
        for line in out.splitlines():
            key, sep, value = line.strip().partition(":")
            if sep:
                kv[key.strip().lower()] = value.strip()
        powered = any(kv.get(f"{src} powered") == "true" for src in ("ac", "usb", "wireless"))
        scale = float(kv.get("scale", 100) or 100)
        return {"level_pct": float(kv["level"]) * 100.0 / scale if "level" in kv else None,
                "temperature_c": float(kv["temperature"]) / 10.0 if "temperature" in kv else None,
                "charging": powered or kv.get("status") == "2", "usb_powered": kv.get("usb powered") == "true"}

    def battery_nodes(self) -> str:
        """Empty when current_now and voltage_now can be read, else what the phone said (SELinux denials)."""
        res = self.shell(f"cat {BATTERY}/current_now {BATTERY}/voltage_now", "read the battery nodes",
                         check=False)
        vals = res.stdout.split()
        if res.returncode != 0 or len(vals) < 2 or not all(v.lstrip("-").isdigit() for v in vals[:2]):
            return (res.stderr or res.stdout).strip().splitlines()[0] if (res.stderr or res.stdout).strip() \
                else f"exit status {res.returncode}"
        return ""

    def free_bytes(self, path: str = "/data/local/tmp") -> int:
        """Free bytes where models go (``df -k``: 1K blocks, Available column)."""
        out = self.shell(f"df -k {path}", "read free storage")
        rows = [r.split() for r in out.splitlines() if r.strip()]
        try:
            head = [h.lower() for h in rows[0]]
            col = head.index("available") if "available" in head else 3
            return int(rows[-1][col]) * 1024
        except (IndexError, ValueError):
            raise DeviceError(f"{self.name}: cannot read free storage from `df -k {path}`: {out!r}") from None

    def thermal_status(self) -> str:
        """``dumpsys thermalservice``'s "Thermal Status" (0 = none ... 6 = shutdown); "" when not offered."""
        res = self.shell("dumpsys thermalservice", "read the thermal state", check=False)
        for line in res.stdout.splitlines():
            if line.strip().lower().startswith("thermal status"):
                return line.split(":", 1)[1].strip()
        return ""

    def remote_sizes(self, remote: str) -> dict:
        try:
            return {e.path: e.size for e in self.device().sync.list(remote) if e.path not in (".", "..")}
        except Exception as e:
            raise self.lost_or_error(f"list {remote}", e) from None

    def push(self, src: Path, dst: str, mode: int = 0o755) -> None:
        try:
            self.device().sync.push(src, dst, mode=mode)
        except Exception as e:
            raise self.lost_or_error(f"push {src} to {dst}", e) from None

    def pull(self, src: str, dst: Path) -> None:
        try:
            self.device().sync.pull(src, dst, exist_ok=True)
        except Exception as e:
            raise self.lost_or_error(f"pull {src}", e) from None

    def read_text(self, path: str) -> str:
        try:
            return self.device().sync.read_text(path)
        except Exception as e:
            raise self.lost_or_error(f"read {path}", e) from None
