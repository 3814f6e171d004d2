"""OUTPUT: the JSONL file of result and error rows, kept equal to the journal.

Lines are appended only after the journal has committed them, so after a
crash the file holds a prefix of the journal's projection, possibly ending in
a torn line. :meth:`OutputFile.repair` (run by ``--resume``) walks the file
and the projection side by side, truncates the file at the first byte where
they differ and appends the rest from the journal. The result is whole and
has every committed record exactly once, whatever the moment of the crash.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass

TYPE_CHECKING = False  # not typing's (see _core/_generic.py)
if TYPE_CHECKING:
    from typing import IO

__all__ = ["OutputError", "OutputFile", "Repair"]


class OutputError(Exception):
    """OUTPUT cannot be opened or written."""


@dataclass(frozen=True)
class Repair:
    """What :meth:`OutputFile.repair` did.

    Attributes:
        kept: Lines of the file that matched the journal.
        appended: Lines written from the journal (lost in the crash, or after a gap).
        dropped_bytes: Bytes cut from the end of the file (a torn line, or lines
            the journal does not vouch for).
    """

    kept: int
    appended: int
    dropped_bytes: int

    @property
    def changed(self) -> bool:
        return bool(self.appended or self.dropped_bytes)


class OutputFile:
    """Appends whole lines to OUTPUT (a path, or ``-`` for stdout)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._file: IO[bytes] | None = None

    @property
    def is_stdout(self) -> bool:
        return self.path == "-"

    def check_writable(self) -> None:
        """Fail early, before any work, if OUTPUT cannot be written.

        Raises:
            OutputError: with the reason.
        """
        if self.is_stdout:
            return
        # Checked without creating anything: a run refused later must leave no trace.
        path = self.path
        if os.path.isdir(path):
            raise OutputError(f"cannot write OUTPUT {path}: it is a directory")
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise OutputError(f"cannot write OUTPUT {path}: no directory {folder}")
        if not os.access(path if os.path.exists(path) else folder, os.W_OK):
            raise OutputError(f"cannot write OUTPUT {path}: permission denied")

    def start_fresh(self) -> None:
        """Empty the file and open it for appending."""
        if self.is_stdout:
            self._file = sys.stdout.buffer
            return
        self._open("wb")

    def repair(self, lines: Iterable[str]) -> Repair:
        """Make the file equal ``lines`` (the journal's projection); open it for appending.

        Raises:
            OutputError: if the file cannot be read, truncated or written.
        """
        assert not self.is_stdout
        rows = iter(lines)
        kept = good = 0
        differing: str | None = None
        try:
            with open(self.path, "r+b" if os.path.exists(self.path) else "w+b") as f:
                for line in rows:
                    expected = line.encode() + b"\n"
                    if f.read(len(expected)) != expected:
                        differing = line
                        break
                    kept += 1
                    good += len(expected)
                size = f.seek(0, os.SEEK_END)
                f.truncate(good)
        except OSError as exc:
            raise OutputError(f"cannot repair OUTPUT {self.path}: {exc.strerror or exc}") from exc
        self._open("ab")
        appended = 0
        batch = [] if differing is None else [differing]
        for line in rows:
            batch.append(line)
            if len(batch) >= 4096:
                self.write(batch)
                appended += len(batch)
                batch = []
        self.write(batch)
        appended += len(batch)
        return Repair(kept, appended, size - good)

    def write(self, lines: list[str]) -> None:
        """Append ``lines``, each with a newline, in one write, and flush."""
        if lines:
            self._write_bytes(("\n".join(lines) + "\n").encode())

    def _write_bytes(self, data: bytes) -> None:
        assert self._file is not None, "OutputFile not opened"
        try:
            self._file.write(data)
            self._file.flush()
        except OSError as exc:
            raise OutputError(f"cannot write OUTPUT {self.path}: {exc.strerror or exc}") from exc

    def close(self) -> None:
        """Flush and close (stdout is only flushed). Safe to call twice."""
        f, self._file = self._file, None
        if f is None:
            return
        if self.is_stdout:
            f.flush()
        else:
            f.close()

    def _open(self, mode: str) -> None:
        try:
            self._file = open(self.path, mode)  # noqa: SIM115 - held open for the run
        except OSError as exc:
            raise OutputError(f"cannot write OUTPUT {self.path}: {exc.strerror or exc}") from exc
