"""Waiting, on a caller's thread, for a worker's next message (the direct path);
and reading one on the dispatcher's only if it has begun to arrive.

The dispatcher lends a worker's pipe to the thread that waits for a result
(see ``_direct.py``). That thread must notice a message, the
worker's exit, and its own deadline; how it waits costs more than anything
else in a round trip:

- ``poll()`` on the pipe and the worker's sentinel, then ``read()``: the
  obvious way, and 30-40 us slower per round trip on a virtual machine than a
  blocking read (measured; the likely reason, not verified: a thread asleep
  in ``read()`` on a socket gets the kernel's synchronous wake-up, on the
  writer's CPU, and one asleep in ``poll()`` does not).
- So on Linux, where ``multiprocessing.Pipe`` is a socket pair, it sleeps in a
  blocking ``recv(MSG_PEEK)`` with a receive timeout (SO_RCVTIMEO). The peek
  takes nothing from the pipe, so the message is then read whole by the usual
  ``Connection``, with the timeout cleared: a timeout in the middle of a large
  message would tear it. Every TICK_S without a message, it looks at the
  sentinel, in case a process the worker started holds the pipe open after the
  worker's death (else that death reaches it at once, as end of file).
- Elsewhere, ``poll()``.

Before it sleeps at all, it spins for up to SPIN_S, looking at the pipe
without blocking, if the last reply it waited for came within that long. On
a virtual machine most of a short round trip is the hypervisor waking idle
CPUs (a bare ``Pipe`` echo: ~45 us asleep, ~20 us spinning on the machine
this was tuned on). The spin costs at most SPIN_S of one core per call, and
only while replies come that fast: a slower one stops it until a fast one
is seen again. A machine with one usable core never spins: the worker needs
that core.
"""

from __future__ import annotations

import os
import select
import socket
import struct
import sys
import time
from collections.abc import Callable

from . import _protocol as P
from . import usable_cpus

TYPE_CHECKING = False  # not typing's (see _core/_generic.py)
if TYPE_CHECKING:
    from multiprocessing.connection import Connection
    from typing import Any

__all__ = ["PipeWait"]

# How long a wait sleeps before it looks at the worker's sentinel.
TICK_S = 0.02
# How long a wait spins before it sleeps (see the module docstring).
SPIN_S = 100e-6
_PEEKABLE = sys.platform.startswith("linux")


_SPIN = usable_cpus() > 1


class PipeWait:
    """Waits for the next message on a worker's pipe, or for the worker's exit."""

    __slots__ = ("_conn_fd", "_conn_poll", "_poll", "_quick", "_sentinel", "_sock")

    def __init__(self, conn_fd: int, sentinel: int) -> None:
        self._conn_fd = conn_fd
        self._conn_poll = select.poll()
        self._conn_poll.register(conn_fd, select.POLLIN)
        self._quick = _SPIN  # whether the last reply came within SPIN_S
        self._sentinel = sentinel
        self._poll = select.poll()
        self._poll.register(sentinel, select.POLLIN)
        self._sock: socket.socket | None = None
        if _PEEKABLE:
            dup = os.dup(conn_fd)  # its own descriptor: closing it never closes the pipe
            try:
                self._sock = socket.socket(fileno=dup)
            except OSError:
                os.close(dup)  # not a socket: poll() then
            else:
                # Blocking, whatever socket.setdefaulttimeout() says: a socket made
                # with a default timeout turns O_NONBLOCK on for the descriptor it
                # shares with the pipe. The pipe's blocking reads then failed
                # mid-wait (EAGAIN, taken for the worker's end), and a reply
                # that came after the timeout was lost: get() waited forever.
                self._sock.setblocking(True)
        if self._sock is None:
            self._poll.register(conn_fd, select.POLLIN)

    def wait(self, deadline: float | None, stop: Callable[[], bool] | None = None) -> bool:
        """Wait until a message (or end of file) can be read: True; or until ``deadline``
        (``time.monotonic()``) passes, the worker exits, or ``stop()``, asked every
        TICK_S, says so: False."""
        start = time.perf_counter()
        spin = SPIN_S if deadline is None else min(SPIN_S, deadline - time.monotonic())
        if self._quick and self._spin(start + spin):
            return True
        if self._sleep(deadline, stop):
            self._quick = _SPIN and time.perf_counter() - start < SPIN_S
            return True
        return False

    def _spin(self, until: float) -> bool:
        poll = self._conn_poll.poll
        while not poll(0):
            if time.perf_counter() > until:
                return False
        return True

    def _sleep(self, deadline: float | None, stop: Callable[[], bool] | None) -> bool:
        while True:
            left = TICK_S if deadline is None else min(TICK_S, deadline - time.monotonic())
            if left <= 0:
                return False
            if self._sock is None:
                ready = {fd for fd, _ in self._poll.poll(left * 1e3)}
                if self._conn_fd in ready:
                    return True
                if self._sentinel in ready:
                    return False
            elif self._peek(left):
                return True
            elif self._poll.poll(0):
                return False  # the sentinel: the worker exited
            if stop is not None and stop():
                return False

    def recv_begun(self, conn: Connection) -> tuple[Any, ...] | None:
        """The next message on ``conn`` (this pipe) if it has begun to arrive, else
        None at once. The dispatcher reads on so while a worker's replies queue
        up (Dispatcher._on_message)."""
        if self._sock is not None:
            return P.recv_begun(conn, self._sock)
        return P.recv(conn) if self._conn_poll.poll(0) else None

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()

    def _peek(self, seconds: float) -> bool:
        sock = self._sock
        assert sock is not None
        usec = max(1, int(seconds * 1e6))
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(usec))
            try:
                sock.recv(1, socket.MSG_PEEK)
            finally:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _NO_TIMEOUT)
        except (BlockingIOError, InterruptedError):
            return False  # nothing yet
        except OSError:
            return True  # closed under us: the reader finds out why
        return True


def _timeval(usec: int) -> bytes:
    return struct.pack("ll", usec // 1_000_000, usec % 1_000_000)


_NO_TIMEOUT = _timeval(0)
