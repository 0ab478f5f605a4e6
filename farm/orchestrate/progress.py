"""What a person watching a sweep sees: a live line (done / running / failed, ETA) and tables."""

from __future__ import annotations

import sys
import time


def fmt_duration(s: float | None) -> str:
    if s is None:
        return "?"
    s = int(round(s))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def table(rows: list[dict], columns: list[str]) -> str:
    cells = [[_cell(r.get(c, "")) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip(),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells]
    return "\n".join(lines)


def _cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
    return str(v)


class Progress:
    """Counts and ETA; redraws one line on a terminal, prints a line per finished trial otherwise."""

    def __init__(self, total: int, already: int, slots: int, out=None, live: bool | None = None):
        self.out = out or sys.stderr
        self.live = self.out.isatty() if live is None else live
        self.total, self.already, self.slots = total, already, max(1, slots)
        self.done = self.failed = 0
        self.running: set[str] = set()
        self.durations: list[float] = []
        self.t0 = time.time()
        self._last = 0.0

    @property
    def remaining(self) -> int:
        return self.total - self.already - self.done - self.failed

    def eta(self) -> float | None:
        if not self.durations:
            return None
        mean = sum(self.durations) / len(self.durations)
        waves = (self.remaining + self.slots - 1) // self.slots
        return waves * mean

    def line(self) -> str:
        return (f"[{self.already + self.done}/{self.total}] done {self.already + self.done}  running "
                f"{len(self.running)}  failed {self.failed}  | elapsed {fmt_duration(time.time() - self.t0)}"
                f"  ETA {fmt_duration(self.eta()) if self.remaining else '0s'}")

    def started(self, tid: str) -> None:
        self.running.add(tid)
        self.redraw()

    def finished(self, tid: str, label: str, seconds: float | None, ok: bool, note: str = "") -> None:
        self.running.discard(tid)
        if ok:
            self.done += 1
        else:
            self.failed += 1
        if seconds is not None and ok:
            self.durations.append(seconds)
        word = "done  " if ok else "FAILED"
        msg = f"{word} {label} ({fmt_duration(seconds)}){' ' + note if note else ''}"
        if self.live:
            print("\r\033[K" + msg, file=self.out)
        else:
            print(f"{msg}  | {self.line()}", file=self.out)
        self.redraw(force=True)

    def note(self, msg: str) -> None:
        print(("\r\033[K" if self.live else "") + msg, file=self.out)
        self.redraw(force=True)

    def redraw(self, force: bool = False) -> None:
        if not self.live:
            return
        now = time.time()
        if force or now - self._last > 0.5:
            self._last = now
            print("\r\033[K" + self.line(), end="", file=self.out, flush=True)

    def close(self) -> None:
        if self.live:
            print("\r\033[K" + self.line(), file=self.out, flush=True)
