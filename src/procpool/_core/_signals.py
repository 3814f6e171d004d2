"""Keeping signal handlers that raise out of the engine's critical sections.

Python runs a signal handler on the main thread between two bytecodes, and
Ctrl-C's raises KeyboardInterrupt there. The dispatcher thread never runs one.
But on the direct path (``_direct.py``),
engine code runs on the caller's thread, and an exception raised between the
reads of one message, or in the middle of handling it, would tear the message
or lose a result: a later ``get()`` would wait forever.

So on the main thread, for the length of such a section, every watched signal
that has a Python handler gets a stand-in that only notes the signal; then the
handlers go back and each noted signal is raised again, at a point where the
engine's state is whole. Blocking the signals instead (``pthread_sigmask``)
would not do: the kernel then hands a process-wide signal to another thread
(procpool's own, NumPy's, a notebook kernel's), whose C-level handler still
has the main thread run the Python one. A thread that waits for a reply in
such a section asks :func:`pending` every tick of its wait, so Ctrl-C still
interrupts a long ``get()`` within ``_pipewait.TICK_S``.

The C module ``_signal`` is used directly: ``signal``'s wrappers convert to and
from enums, ~2 us a call; a section's swap costs ~1 us in all.
"""

from __future__ import annotations

import threading

TYPE_CHECKING = False  # not typing's (see _core/_generic.py)
if TYPE_CHECKING:
    from typing import Any

_sig: Any
try:
    import _signal as _sig  # type: ignore[import-not-found,no-redef]
except ImportError:  # pragma: no cover - not CPython
    import signal as _sig  # type: ignore[no-redef]

__all__ = ["defer", "deliver", "pending"]

# Signals whose Python handler may raise, in practice: Ctrl-C, termination
# requests, and the timers that timeout helpers use.
_WATCHED = tuple(
    getattr(_sig, name)
    for name in ("SIGINT", "SIGTERM", "SIGALRM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2")
    if hasattr(_sig, name)
)

if TYPE_CHECKING:
    Saved = list[tuple[int, Any]]  # (signal, the handler that was there)

_noted: list[int] = []  # signals that came during a section (main thread only)


def _note(signum: int, frame: Any) -> None:
    _noted.append(signum)


def defer() -> Saved | None:
    """On the main thread, note the watched signals instead of running their
    handlers, until :func:`deliver`; return what it needs (None: nothing to do)."""
    if threading.get_ident() != threading.main_thread().ident:
        return None
    saved: Saved = []
    try:
        for signum in _WATCHED:
            handler = _sig.getsignal(signum)
            if callable(handler) and handler is not _note:  # not in a section already
                # Noted before the swap: a handler that raises as the swap returns
                # (another signal's, not swapped yet) must not leave this one swapped.
                saved.append((signum, handler))
                _sig.signal(signum, _note)
    except BaseException:
        _restore(saved)  # a handler ran before its stand-in was in place, and raised
        raise
    return saved or None


def deliver(saved: Saved | None) -> None:
    """Put the handlers back and raise again each signal noted meanwhile: its
    handler runs now (and may raise)."""
    if saved is None:
        return
    try:
        _restore(saved)
    finally:
        noted = list(dict.fromkeys(_noted))
        _noted.clear()
        for signum in noted:
            _sig.raise_signal(signum)


def pending() -> bool:
    """Whether a signal was noted in the current section."""
    return bool(_noted)


def _restore(saved: Saved) -> None:
    error: BaseException | None = None
    for signum, handler in saved:
        try:
            _sig.signal(signum, handler)
        except BaseException as exc:  # the handler ran for a signal still pending
            error = error or exc
    if error is not None:
        raise error
