"""INPUT: records read lazily from a JSONL, CSV or plain-lines file, or stdin.

Every reader yields ``(index, record, problem)``: ``problem`` is None for a good
record, else a message naming the line (``"line 7, column 12: invalid JSON:
..."``), and the run turns it into an error row instead of stopping. Blank lines
are skipped in every format and are not records; ``index`` counts records from 0.

Reading goes through :class:`LineSource`, which hashes the bytes it hands out,
so a run from stdin can record which prefix of the stream it has seen and a
resumed run can check that it was given the same stream (see ``_run``).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

TYPE_CHECKING = False  # not typing's (see _core/_generic.py)
if TYPE_CHECKING:
    from typing import IO, Any

__all__ = [
    "FORMATS",
    "Fingerprint",
    "InputError",
    "LineSource",
    "detect_format",
    "fingerprint_file",
    "fingerprint_stream",
    "read_records",
    "spool_stdin",
]

FORMATS = ("jsonl", "csv", "lines")

Problem = str | None
if TYPE_CHECKING:
    RecordTuple = tuple[int, Any, Problem]

_CSV_SUFFIXES = {".csv": ",", ".tsv": "\t"}
_LINES_SUFFIXES = {".txt", ".lst", ".lines"}


class InputError(Exception):
    """INPUT cannot be opened or read at all (not a bad record: those become error rows)."""


def detect_format(path: str) -> str:
    """The format implied by INPUT's name: ``.csv``/``.tsv`` CSV, ``.txt`` lines, else JSONL."""
    suffix = os.path.splitext(path)[1].lower()
    if suffix in _CSV_SUFFIXES:
        return "csv"
    if suffix in _LINES_SUFFIXES:
        return "lines"
    return "jsonl"


def default_delimiter(path: str) -> str:
    return _CSV_SUFFIXES.get(os.path.splitext(path)[1].lower(), ",")


@dataclass(frozen=True)
class Fingerprint:
    """What identifies an input file's content: size, mtime and a BLAKE2b hash.

    ``lines`` (newline count) is a by-product used to estimate the record count.
    """

    size: int
    mtime_ns: int
    digest: str
    lines: int


def fingerprint_file(path: str) -> Fingerprint:
    """Hash the whole file (one sequential read; ~1 GB/s).

    Raises:
        InputError: if the file cannot be read.
    """
    try:
        with open(path, "rb") as f:
            return fingerprint_stream(f)
    except OSError as exc:
        raise InputError(f"cannot read INPUT {path}: {exc.strerror or exc}") from exc


def fingerprint_stream(f: IO[bytes]) -> Fingerprint:
    """Fingerprint a seekable binary stream from its start, leaving it rewound.

    Raises:
        OSError: if it cannot be read.
    """
    hasher = hashlib.blake2b(digest_size=20)
    lines = 0
    last = b"\n"
    f.seek(0)
    stat = os.fstat(f.fileno())
    while block := f.read(1 << 20):
        hasher.update(block)
        lines += block.count(b"\n")
        last = block
    f.seek(0)
    if not last.endswith(b"\n"):
        lines += 1
    return Fingerprint(stat.st_size, stat.st_mtime_ns, hasher.hexdigest(), lines)


class LineSource:
    """Binary lines of a stream, counted and hashed as they are handed out.

    ``consumed`` and :meth:`digest` describe exactly the prefix read so far.
    """

    def __init__(self, stream: IO[bytes]) -> None:
        self._stream = stream
        self._hasher = hashlib.blake2b(digest_size=20)
        self.consumed = 0
        self.line_no = 0
        self.at_eof = False

    def __iter__(self) -> Iterator[bytes]:
        update = self._hasher.update
        for raw in self._stream:
            update(raw)
            self.consumed += len(raw)
            self.line_no += 1
            yield raw
        self.at_eof = True

    def digest(self) -> str:
        return self._hasher.copy().hexdigest()


def hash_prefix(stream: IO[bytes], size: int) -> tuple[str, int]:
    """BLAKE2b of the first ``size`` bytes of ``stream`` (as LineSource computes it)."""
    hasher = hashlib.blake2b(digest_size=20)
    left = size
    while left > 0:
        block = stream.read(min(left, 1 << 20))
        if not block:
            break
        hasher.update(block)
        left -= len(block)
    return hasher.hexdigest(), size - left


def spool_stdin() -> IO[bytes]:
    """Copy all of stdin to an anonymous temporary file, rewound, so it can be checked first."""
    spool = tempfile.TemporaryFile(prefix="procpool-stdin-")  # noqa: SIM115 - returned open
    shutil.copyfileobj(sys.stdin.buffer, spool, 1 << 20)
    spool.seek(0)
    return spool


def read_records(
    source: LineSource, fmt: str, *, delimiter: str = ",", encoding: str = "utf-8"
) -> Iterator[RecordTuple]:
    """Yield ``(index, record, problem)`` for every record of ``source`` in ``fmt``."""
    if fmt == "jsonl":
        return _jsonl(source)
    if fmt == "lines":
        return _lines(source, encoding)
    if fmt == "csv":
        return _csv(source, delimiter, encoding)
    raise ValueError(f"unknown format {fmt!r}")


def _jsonl(source: LineSource) -> Iterator[RecordTuple]:
    index = 0
    loads = json.loads
    for raw in source:
        if raw.isspace() or not raw:
            continue
        try:
            record, problem = loads(raw), None
        except json.JSONDecodeError as exc:
            record = None
            problem = f"line {source.line_no}, column {exc.colno}: invalid JSON: {exc.msg}"
        except UnicodeDecodeError as exc:
            record, problem = None, f"line {source.line_no}: not valid UTF-8 ({exc.reason})"
        except (ValueError, RecursionError) as exc:
            record, problem = None, f"line {source.line_no}: invalid JSON: {exc}"
        yield index, record, problem
        index += 1


def _lines(source: LineSource, encoding: str) -> Iterator[RecordTuple]:
    index = 0
    for raw in source:
        if raw.isspace() or not raw:
            continue
        text = raw.rstrip(b"\r\n")
        try:
            record, problem = text.decode(encoding), None
        except UnicodeDecodeError as exc:
            record = None
            problem = (
                f"line {source.line_no}: not valid {encoding} ({exc.reason} at byte {exc.start})"
            )
        yield index, record, problem
        index += 1


def _csv(source: LineSource, delimiter: str, encoding: str) -> Iterator[RecordTuple]:
    # Lines are decoded with surrogateescape so that one bad byte makes one
    # bad row (reported below) rather than a decode error that stops the file.
    first = [True]

    def decoded() -> Iterator[str]:
        for raw in source:
            if first[0]:
                first[0] = False
                raw = raw.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 BOM, as Excel writes
            yield raw.decode(encoding, "surrogateescape")

    reader = csv.reader(decoded(), delimiter=delimiter, strict=True)
    header: list[str] | None = None
    index = 0
    while True:
        start = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            yield index, None, f"line {_span(start, reader.line_num)}: malformed CSV: {exc}"
            index += 1
            continue
        if not row or (len(row) == 1 and not row[0].strip()):
            continue  # a blank line
        where = _span(start, reader.line_num)
        if any(_has_surrogates(field) for field in row):
            problem: Problem = f"line {where}: not valid {encoding}"
        elif header is None:
            header = row
            continue
        elif len(row) != len(header):
            problem = (
                f"line {where}: expected {len(header)} fields (as in the header), found {len(row)}"
            )
        else:
            problem = None
        if header is None:  # a bad header: nothing after it can be read as records
            raise InputError(f"the CSV header (line {where}) is not valid {encoding}")
        yield index, (None if problem else dict(zip(header, row))), problem
        index += 1


def _span(start: int, end: int) -> str:
    return str(end) if end <= start else f"{start}-{end}"


def _has_surrogates(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False
