"""Progress of the long steps (synthetic set, base build, evaluation): one helper used everywhere.

On a terminal a step is a tqdm bar. When stderr is not a terminal (a log file, CI, a Ray worker whose output Ray
forwards line by line) a bar would be one endless line of carriage returns, so the step instead writes a plain
line every ``$VLADSWEEP_PROGRESS_EVERY`` seconds (default 10) and one when it ends, each parseable as key=value::

    progress step="base: fine-tune" done=40 total=100 unit=step pct=40 rate=2.31/s elapsed=17s eta=26s

``$VLADSWEEP_PROGRESS`` forces the mode: ``bar``, ``log`` or ``off``. The lines go to the ``vladsweep.progress``
logger when logging is set up to show INFO (the sweep driver), else straight to stderr (a Ray task, where
logging has no handler).

Usage::

    with progress("evaluate oxford5k", total=len(paths), unit="img") as bar:
        for batch in batches:
            ...
            bar.update(len(batch))

    with progress("base: fine-tune", total=steps, unit="step") as bar, counting_calls(miner, "sample", bar):
        train(...)   # each miner.sample() call is one step
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from tqdm.auto import tqdm

__all__ = [
    "EVERY_ENV",
    "MODE_ENV",
    "Progress",
    "counting_calls",
    "format_seconds",
    "mode",
    "progress",
    "track",
]

MODE_ENV = "VLADSWEEP_PROGRESS"
EVERY_ENV = "VLADSWEEP_PROGRESS_EVERY"
MODES = ("bar", "log", "off")
DEFAULT_EVERY_S = 10.0

log = logging.getLogger("vladsweep.progress")
T = TypeVar("T")


def mode() -> str:
    """``bar`` on a terminal, ``log`` otherwise; ``$VLADSWEEP_PROGRESS`` overrides."""
    forced = os.environ.get(MODE_ENV, "").strip().lower()
    if forced in MODES:
        return forced
    try:
        return "bar" if sys.stderr is not None and sys.stderr.isatty() else "log"
    except (AttributeError, ValueError):  # a closed or replaced stderr
        return "log"


def _every_s() -> float:
    try:
        return max(0.5, float(os.environ.get(EVERY_ENV, DEFAULT_EVERY_S)))
    except ValueError:
        return DEFAULT_EVERY_S


def format_seconds(seconds: float | None) -> str:
    """``42s``, ``3m05s``, ``1h02m``; ``?`` when unknown."""
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def _emit(line: str) -> None:
    # The driver's logging shows INFO with a timestamp; a Ray task's logging has no handler and would drop it.
    if log.isEnabledFor(logging.INFO) and log.hasHandlers():
        log.info("%s", line)
    else:
        print(line, file=sys.stderr, flush=True)


class Progress:
    """One long step: ``update(n)`` as work gets done, ``note(text)`` for a one-off line, ``close()`` at the end
    (or use it as a context manager). ``total`` may be None when unknown (no percentage, no ETA)."""

    def __init__(self, desc: str, total: int | None = None, unit: str = "it", enabled: bool = True):
        self.desc, self.total, self.unit = desc, total, unit
        self.mode = mode() if enabled else "off"
        self.done = 0
        self.postfix: dict[str, Any] = {}
        self._start = time.monotonic()
        self._last_line = 0.0
        self._every = _every_s()
        self._closed = False
        self._bar = None
        if self.mode == "bar":
            self._bar = tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(failed=exc_type is not None)

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.mode == "log":
            now = time.monotonic()
            if self._last_line == 0.0 or now - self._last_line >= self._every:
                self._last_line = now
                _emit(self.line())

    def set_postfix(self, **values: Any) -> None:
        """Extra key=value fields of the bar and of the lines (e.g. the loss)."""
        self.postfix.update(values)
        if self._bar is not None:
            self._bar.set_postfix(**values, refresh=False)

    def note(self, text: str) -> None:
        """A line of its own that does not break a bar (e.g. "refreshed hard negatives in 4 s")."""
        if self.mode == "off":
            return
        if self._bar is not None:
            self._bar.write(f"{self.desc}: {text}", file=sys.stderr)
        else:
            _emit(f'progress step="{self.desc}" note="{text}"')

    def line(self, final: bool = False) -> str:
        """The parseable status line: done, total, percentage, rate, elapsed and ETA."""
        elapsed = time.monotonic() - self._start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        parts = [f'progress step="{self.desc}"', f"done={self.done}"]
        if self.total is not None:
            parts.append(f"total={self.total}")
        parts.append(f"unit={self.unit}")
        if self.total:
            parts.append(f"pct={100 * self.done / self.total:.0f}")
        parts.append(f"rate={rate:.3g}/s")
        parts.append(f"elapsed={format_seconds(elapsed)}")
        if final:
            parts.append("finished=true")
        elif self.total is not None:
            eta = (self.total - self.done) / rate if rate > 0 else None
            parts.append(f"eta={format_seconds(eta)}")
        parts += [f"{k}={v}" for k, v in self.postfix.items()]
        return " ".join(parts)

    def close(self, failed: bool = False) -> None:
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        elif self.mode == "log" and not failed:
            _emit(self.line(final=True))


def progress(desc: str, total: int | None = None, unit: str = "it", enabled: bool = True) -> Progress:
    """A `Progress` for one long step (a bar on a terminal, periodic lines otherwise, nothing when disabled)."""
    return Progress(desc, total, unit, enabled)


def track(
    items: Iterable[T], desc: str, total: int | None = None, unit: str = "it", enabled: bool = True
) -> Iterator[T]:
    """``items`` one by one, one tick each."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with progress(desc, total, unit, enabled) as bar:
        for item in items:
            yield item
            bar.update(1)


@contextmanager
def counting_calls(
    obj: Any, method: str, bar: Progress, note: Callable[[int, float], str] | None = None
) -> Iterator[None]:
    """Tick ``bar`` once per call of ``obj.method`` while the block runs (for loops inside code that has no
    progress hook, e.g. one fine-tune step per ``miner.sample`` call). With ``note``, each call also writes the
    line ``note(call number, seconds it took)``. The method is restored on exit."""
    original = getattr(obj, method)
    own = method in vars(obj)
    calls = 0

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        t0 = time.monotonic()
        result = original(*args, **kwargs)
        calls += 1
        if note is not None:
            bar.note(note(calls, time.monotonic() - t0))
        else:
            bar.update(1)
        return result

    setattr(obj, method, wrapped)
    try:
        yield
    finally:
        if own:
            setattr(obj, method, original)
        else:  # the instance attribute set above goes; the class's method shows through again
            delattr(obj, method)
