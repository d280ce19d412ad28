"""Progress of long work that a person can follow on a terminal and in a log file alike.

On a terminal: a tqdm bar. Otherwise (output piped, redirected, under CI or nohup): one plain line every
`LOG_EVERY_S` seconds, and one at the end of work that lasted that long, with the count done, the rate, the
time left and the figures the work reports (loss, accuracy...), so a log shows the work is alive and when it
will end, without carriage-return bars that a file cannot render.
"""
from __future__ import annotations

import sys
import time
from typing import Iterable, Iterator

from tqdm import tqdm

LOG_EVERY_S = 30.0  # between two progress lines in a log


class Progress:
    """Iterate over `items` (or call `update` for work without an iterable); `set_postfix` adds figures."""

    def __init__(self, items: Iterable | None, desc: str, *, total: int | None = None, unit: str = "batches",
                 stream=None, every_s: float = LOG_EVERY_S, enabled: bool = True):
        self.items, self.desc, self.unit, self.every_s = items, desc, unit, every_s
        self.stream = stream or sys.stderr
        self.total = total if total is not None or items is None else (len(items) if hasattr(items, "__len__")
                                                                         else None)
        self.bar = None
        if enabled and self.stream.isatty():
            self.bar = tqdm(total=self.total, desc=desc, unit=unit, leave=False, dynamic_ncols=True, file=self.stream)
        self.logging = enabled and self.bar is None
        self.done, self.postfix = 0, ""
        self.began = self.last = time.monotonic()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __iter__(self) -> Iterator:
        try:
            for item in self.items:
                yield item
                self.update()
        finally:
            self.close()

    def update(self, count: int = 1) -> None:
        self.done += count
        if self.bar is not None:
            self.bar.update(count)
            return
        now = time.monotonic()
        if self.logging and now - self.last >= self.every_s:
            self.last = now
            print(self._line(now - self.began), file=self.stream, flush=True)

    def set_postfix(self, values: dict) -> None:
        if self.bar is not None:
            self.bar.set_postfix(values, refresh=False)
        self.postfix = " ".join(f"{key}={value}" for key, value in values.items())

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.logging and self.done and time.monotonic() - self.began >= self.every_s:
            print(self._line(time.monotonic() - self.began) + ", done", file=self.stream, flush=True)
            self.logging = False

    def _line(self, elapsed: float) -> str:
        rate = self.done / elapsed if elapsed > 0 else 0.0
        count = f"{self.done}/{self.total}" if self.total else f"{self.done}"
        line = f"{self.desc}: {count} {self.unit} ({rate:.2f} {self.unit}/s, {_clock(elapsed)} elapsed"
        if self.total and rate > 0 and self.done < self.total:
            line += f", about {_clock((self.total - self.done) / rate)} left"
        return line + ")" + (f" {self.postfix}" if self.postfix else "")


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"
