"""Progress of long steps, readable on a terminal and in a log file.

One entry point, :func:`progress_bar`, used by every long loop (model loading, feature extraction, the
training loop's epochs, the demo's trunk pass):

* on a terminal: a tqdm bar (redrawn in place);
* otherwise (output to a file or a pipe): plain lines, no carriage returns: one when the step is done,
  and on the way one each time another ~10% is done, at most one every ``min_interval`` seconds, so
  a short step is one line and a long one about ten;
* ``PROMPTKD_PROGRESS=bar|plain|off`` overrides the choice (``off``: nothing).

Progress goes to stderr (results go to stdout)."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import IO, Any

MODE_ENV = "PROMPTKD_PROGRESS"
MODES = ("bar", "plain", "off")
MIN_INTERVAL_S = 3.0  # plain mode: no two progress lines of one step closer than this (the last is always printed)


def progress_mode(stream: IO[str] | None = None) -> str:
    """``$PROMPTKD_PROGRESS`` if set, else "bar" on a terminal and "plain" otherwise."""
    forced = os.environ.get(MODE_ENV, "").strip().lower()
    if forced:
        if forced not in MODES:
            raise ValueError(f"{MODE_ENV}={forced!r}: expected one of {', '.join(MODES)}")
        return forced
    stream = stream if stream is not None else sys.stderr
    try:
        return "bar" if stream.isatty() else "plain"
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return "plain"


def _fmt_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class PlainProgress:
    """tqdm's counting interface (update, set_postfix, close, iteration) writing whole lines."""

    def __init__(self, iterable: Iterable | None = None, *, total: int | None = None, desc: str = "",
                 unit: str = "it", initial: int = 0, stream: IO[str] | None = None,
                 min_interval: float = MIN_INTERVAL_S, step: float = 0.1) -> None:
        if total is None and iterable is not None:
            try:
                total = len(iterable)  # type: ignore[arg-type]
            except TypeError:
                total = None
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.n = initial
        self.stream = stream if stream is not None else sys.stderr
        self.min_interval, self.step = min_interval, step
        self.start = self.last_line = time.monotonic()
        self.postfix = ""
        self.closed = False
        self._next_fraction = self._fraction_after(initial)

    def _fraction_after(self, n: int) -> float:
        if not self.total:
            return float("inf")
        done = n / self.total
        return (int(done / self.step + 1e-9) + 1) * self.step

    def _write(self, text: str) -> None:
        prefix = f"{self.desc}: " if self.desc else ""
        self.stream.write(prefix + text + (f" ({self.postfix})" if self.postfix else "") + "\n")
        self.stream.flush()
        self.last_line = time.monotonic()

    def _counts(self) -> str:
        return f"{self.n}/{self.total} {self.unit}" if self.total else f"{self.n} {self.unit}"

    def update(self, n: int = 1) -> None:
        self.n += n
        if not self.total or self.n >= self.total:
            return  # the final line comes from close()
        if self.n / self.total + 1e-9 < self._next_fraction:
            return
        self._next_fraction = self._fraction_after(self.n)
        now = time.monotonic()
        if now - self.last_line < self.min_interval:
            return
        elapsed = now - self.start
        left = elapsed * (self.total - self.n) / max(self.n, 1)
        self._write(f"{100 * self.n // self.total:3d}% {self._counts()}, {_fmt_seconds(elapsed)} so far, "
                    f"~{_fmt_seconds(left)} left")

    def set_postfix(self, ordered_dict: dict | None = None, refresh: bool = True, **kwargs: Any) -> None:
        values = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def set_postfix_str(self, text: str = "", refresh: bool = True) -> None:
        self.postfix = text

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        self.desc = desc or ""

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        elapsed = _fmt_seconds(time.monotonic() - self.start)
        if self.total and self.n < self.total:
            self._write(f"stopped at {self._counts()} after {elapsed}")
        else:
            self._write(f"done, {self._counts()} in {elapsed}")

    def __iter__(self) -> Iterator:
        if self.iterable is None:
            raise TypeError("this progress counter wraps no iterable")
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class NoProgress(PlainProgress):
    """Counts and prints nothing (``enabled=False`` or ``PROMPTKD_PROGRESS=off``)."""

    def _write(self, text: str) -> None:
        pass


def progress_bar(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "", unit: str = "it",
                 initial: int = 0, enabled: bool = True, leave: bool = True, stream: IO[str] | None = None,
                 min_interval: float = MIN_INTERVAL_S) -> Any:
    """A tqdm bar on a terminal, plain lines elsewhere (see the module docstring); iterate over it or call
    ``update(n)``/``set_postfix(...)``/``close()`` (or use it as a context manager)."""
    stream = stream if stream is not None else sys.stderr
    mode = progress_mode(stream) if enabled else "off"
    if mode == "bar":
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, leave=leave, file=stream,
                    dynamic_ncols=True)
    cls = PlainProgress if mode == "plain" else NoProgress
    return cls(iterable, total=total, desc=desc, unit=unit, initial=initial, stream=stream, min_interval=min_interval)

