"""Progress reporting shared by the library and ``procpool run``.

A :class:`Progress` counts finished tasks (and how many of them failed) and
shows them one of three ways:

* ``"bar"``: a live tqdm bar (done/total, rate, ETA, failures so far), used
  when the stream is a terminal and tqdm is installed;
* ``"lines"``: one plain line every ``interval`` seconds, for logs and pipes
  where a redrawn bar would be garbage;
* a callback: ``callback(ProgressUpdate)`` on every update, for GUIs,
  notebooks and custom logging. An exception it raises propagates to whoever
  called :meth:`Progress.update` (errors in listeners are never swallowed).

:func:`progress_for` turns the user-facing ``progress=`` option (``True``,
``False``/``None``, a callable, or a ready :class:`Progress`) into a reporter.
The clock is injectable so the "every few seconds" logic is testable without
sleeping.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

TYPE_CHECKING = False  # not typing's (see _core/_generic.py)
if TYPE_CHECKING:
    from typing import Any, Literal, TextIO

    Mode = Literal["auto", "bar", "lines", "off"]

__all__ = ["Progress", "ProgressUpdate", "progress_for"]


# Default seconds between plain lines.
DEFAULT_INTERVAL = 5.0


@dataclass(frozen=True)
class ProgressUpdate:
    """A snapshot of a run's progress, as passed to a progress callback.

    Attributes:
        done: Tasks finished so far, failed ones included.
        failed: Tasks that finished with an error.
        total: Tasks expected in all, or None when unknown (a stream).
        elapsed: Seconds since the reporter started.
    """

    done: int
    failed: int
    total: int | None
    elapsed: float

    @property
    def rate(self) -> float:
        """Tasks finished per second so far."""
        return self.done / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def eta(self) -> float | None:
        """Seconds left at the current rate, or None when it cannot be known."""
        if self.total is None or self.rate <= 0:
            return None
        return max(0.0, (self.total - self.done) / self.rate)

    def describe(self) -> str:
        """One line, e.g. ``'1200/5000 (24.0%), 3 failed, 412.3/s, ETA 9s'``."""
        if self.total:
            head = f"{self.done}/{self.total} ({100.0 * self.done / self.total:.1f}%)"
        else:
            head = f"{self.done}"
        parts = [head, f"{self.failed} failed", f"{self.rate:.1f}/s"]
        eta = self.eta
        parts.append(f"elapsed {format_seconds(self.elapsed)}")
        if eta is not None and self.done < (self.total or 0):
            parts.append(f"ETA {format_seconds(eta)}")
        return ", ".join(parts)


def format_seconds(seconds: float) -> str:
    """``'9s'``, ``'4m05s'``, ``'2h03m'``; tenths below ten seconds."""
    if seconds < 10:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        minutes, secs = divmod(int(seconds), 60)
        return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"
    hours, rest = divmod(int(seconds), 3600)
    return f"{hours}h{rest // 60:02d}m"


class Progress:
    """Counts finished tasks and reports them as a bar, plain lines or callbacks.

    Thread-safe: ``update`` may be called from any thread. Usable as a context
    manager; :meth:`close` is safe to call twice.

    Args:
        total: Tasks expected, or None if unknown (can be set later with
            :meth:`set_total`).
        callback: Called with a :class:`ProgressUpdate` after every update;
            when given, nothing is drawn.
        mode: ``"auto"`` (a bar on a terminal with tqdm installed, else plain
            lines), ``"bar"``, ``"lines"``, or ``"off"`` (count silently).
        stream: Where to draw; default ``sys.stderr``.
        interval: Seconds between plain lines.
        desc: Label put in front of the bar and each line.
        unit: What is being counted (``"task"``, ``"record"``).
        clock: A monotonic clock, replaceable in tests.

    Raises:
        ValueError: if ``mode`` is unknown or ``interval`` is not positive.
    """

    def __init__(
        self,
        total: int | None = None,
        *,
        callback: Callable[[ProgressUpdate], object] | None = None,
        mode: Mode = "auto",
        stream: TextIO | None = None,
        interval: float = DEFAULT_INTERVAL,
        desc: str = "procpool",
        unit: str = "task",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if mode not in ("auto", "bar", "lines", "off"):
            raise ValueError(f"mode must be 'auto', 'bar', 'lines' or 'off', not {mode!r}")
        if not interval > 0:
            raise ValueError(f"interval must be a positive number of seconds, not {interval!r}")
        self._stream = stream if stream is not None else sys.stderr
        self._callback = callback
        self._interval = interval
        self._desc = desc
        self._clock = clock
        self._lock = threading.RLock()
        self._total = total
        self._done = 0
        self._failed = 0
        self._started = clock()
        self._last_line = self._started
        self._closed = False
        self.mode: Mode = "off" if callback is not None else _resolve_mode(mode, self._stream)
        self._bar: Any = None
        if self.mode == "bar":
            self._bar = _make_bar(total, desc, unit, self._stream)

    # ------------------------------------------------------------ counting

    @property
    def is_bar(self) -> bool:
        """Whether a live bar is being drawn (so other output should go through :meth:`write`)."""
        return self._bar is not None

    def snapshot(self) -> ProgressUpdate:
        """The progress so far."""
        with self._lock:
            return ProgressUpdate(
                self._done, self._failed, self._total, self._clock() - self._started
            )

    def update(self, done: int = 1, failed: int = 0) -> None:
        """Count ``done`` more finished tasks, ``failed`` of which failed.

        Raises:
            Exception: whatever the callback raises.
        """
        with self._lock:
            self._done += done
            self._failed += failed
            if self._bar is not None:
                if failed:
                    self._bar.set_postfix_str(f"{self._failed} failed", refresh=False)
                self._bar.update(done)
            elif self.mode == "lines":
                self._maybe_line()
            if self._callback is not None:
                self._callback(self.snapshot())

    def tick(self) -> None:
        """Give the plain-lines mode a chance to print although nothing finished."""
        if self.mode == "lines":
            with self._lock:
                self._maybe_line()

    def set_total(self, total: int | None) -> None:
        """Change the expected number of tasks (e.g. once a stream's length is known)."""
        with self._lock:
            self._total = total
            if self._bar is not None:
                self._bar.total = total
                self._bar.refresh()

    def write(self, text: str) -> None:
        """Print a message line without tearing the bar."""
        with self._lock:
            if self._bar is not None:
                self._bar.write(text, file=self._stream)
            else:
                self._stream.write(text + "\n")
                self._stream.flush()

    def close(self, *, final_line: bool = True) -> None:
        """Stop drawing; in plain-lines mode print a last line (unless ``final_line`` is False)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._bar is not None:
                self._bar.close()
                self._bar = None
            elif self.mode == "lines" and final_line:
                self._print_line()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _maybe_line(self) -> None:
        now = self._clock()
        if now - self._last_line >= self._interval:
            self._last_line = now
            self._print_line()

    def _print_line(self) -> None:
        self._stream.write(f"{self._desc}: {self.snapshot().describe()}\n")
        self._stream.flush()


def progress_for(
    option: bool | Callable[[ProgressUpdate], object] | Progress | None,
    *,
    total: int | None = None,
    desc: str = "procpool",
    unit: str = "task",
) -> Progress | None:
    """Turn a ``progress=`` option into a reporter.

    ``None``/``False``: no reporting. ``True``: a bar on a terminal, else plain
    lines on stderr. A callable: called with a :class:`ProgressUpdate` on every
    update. A :class:`Progress`: used as it is.

    Raises:
        TypeError: for any other value.
    """
    if option is None or option is False:
        return None
    if option is True:
        return Progress(total, desc=desc, unit=unit)
    if isinstance(option, Progress):
        return option
    if callable(option):
        return Progress(total, callback=option, desc=desc, unit=unit)
    raise TypeError(f"progress must be a bool, a callable or a Progress, not {option!r}")


def _resolve_mode(mode: Mode, stream: TextIO) -> Mode:
    if mode != "auto":
        return "lines" if mode == "bar" and not _have_tqdm() else mode
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):
        tty = False
    if tty and os.environ.get("TERM") != "dumb" and _have_tqdm():
        return "bar"
    return "lines"


def _have_tqdm() -> bool:
    try:
        import tqdm  # noqa: F401
    except ImportError:
        return False
    return True


def _make_bar(total: int | None, desc: str, unit: str, stream: TextIO) -> Any:
    from tqdm import tqdm

    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        file=stream,
        dynamic_ncols=True,
        smoothing=0.05,
        mininterval=0.1,
        leave=True,
    )


# Public classes say they live in `procpool` (tracebacks, pickles, repr).
for _cls in (Progress, ProgressUpdate):
    _cls.__module__ = "procpool"
del _cls
