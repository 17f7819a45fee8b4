"""Progress of long steps (calibration, statistics, format search, fine-tuning, sampling, plots).

On a terminal: a tqdm bar on stderr. Otherwise (a log file, CI, a pipe): one line on the ``msfp`` logger every
``MSFP_PROGRESS_INTERVAL`` seconds (default 10), so a long step is never silent and a log is not flooded; the CLI
shows these lines unless ``-q``. ``enabled=False`` turns both off (tests, nested loops).
"""

from __future__ import annotations

import logging
import os
import sys
import time

__all__ = ["Progress", "interval_seconds"]

log = logging.getLogger("msfp")


def interval_seconds() -> float:
    try:
        return max(0.0, float(os.environ.get("MSFP_PROGRESS_INTERVAL", "10")))
    except ValueError:
        return 10.0


def _fmt_s(s: float) -> str:
    return f"{s:.0f}s" if s < 120 else f"{s / 60:.1f}min"


class Progress:
    """``with Progress(total, "calibration") as p: ... p.update()``; see the module docstring."""

    def __init__(self, total: int, desc: str, enabled: bool | None = None, unit: str = "it"):
        self.total, self.desc, self.unit = total, desc, unit
        self.n = 0
        self.postfix = ""
        self.t0 = self.last = time.perf_counter()
        self.interval = interval_seconds()
        self.bar = None
        tty = sys.stderr.isatty()
        self.mode = "off" if enabled is False else ("bar" if tty or enabled else "log")
        if self.mode == "bar":
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, leave=False, unit=unit, file=sys.stderr)

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.mode == "log":
            now = time.perf_counter()
            if now - self.last >= self.interval and self.n < self.total:
                self.last = now
                self._line(now)

    def set_postfix(self, text: str) -> None:
        self.postfix = text
        if self.bar is not None:
            self.bar.set_postfix_str(text)

    def _line(self, now: float) -> None:
        el = now - self.t0
        left = el / self.n * (self.total - self.n) if self.n else float("nan")
        log.info("%s: %d/%d %s (%.0f%%), %s elapsed, ~%s left%s", self.desc, self.n, self.total, self.unit,
                 100.0 * self.n / max(self.total, 1), _fmt_s(el), _fmt_s(left),
                 f", {self.postfix}" if self.postfix else "")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.mode == "log" and time.perf_counter() - self.t0 >= self.interval:
            log.info("%s: done, %d %s in %s", self.desc, self.n, self.unit, _fmt_s(time.perf_counter() - self.t0))
        self.mode = "off"

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
