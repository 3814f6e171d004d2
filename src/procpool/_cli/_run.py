"""``procpool run``: the parent's side of a batch job.

::

    INPUT ──read_records──▶ feed() ──(index, record)──▶ Pool.imap_unordered(run_record)
      │  skips indices the journal        │                          │  one Outcome per record,
      │  already holds; bad lines         │                          ▼  as records finish
      └─▶ error rows ─────────────────────┴──────────────▶ pending rows ──commit──▶ journal
                                                                               │ (one transaction
                                                          output file ◀────────┘  per batch)
                                                          written after the commit

Records are submitted lazily (bounded memory) and results are taken as they
finish. Each result is marked done in an in-memory bitmap (so a duplicate
could never be written), buffered, and committed to the journal in batches of
up to :data:`COMMIT_ROWS` rows or :data:`COMMIT_SECONDS` seconds; only then are
the lines appended to the output (in commit order, or with ``--ordered`` in
index order as the committed prefix grows). See ``_journal`` and ``_output``
for why a kill at any moment leaves a state ``--resume`` can finish exactly.

Which record an outcome belongs to: a normal outcome carries its index (the
worker returns it). A pool-level failure (a worker crash, a timeout) comes back
in place of a result with ``task_index``, the position among the records fed
to the pool, which ``fed`` maps back to the record index. A pool error that
names no position is never guessed at: the record stays undone, is reported,
and runs again on ``--resume``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shlex
import signal
import sqlite3
import sys
import threading
import time
from array import array
from collections.abc import Iterator
from multiprocessing import TimeoutError as MPTimeoutError

from procpool import Pool, Progress  # the public API, as the layering asks

from ._args import RunOptions
from ._inputs import (
    Fingerprint,
    InputError,
    LineSource,
    default_delimiter,
    detect_format,
    fingerprint_stream,
    hash_prefix,
    read_records,
    spool_stdin,
)
from ._journal import Journal, JournalError
from ._output import OutputError, OutputFile
from ._summary import RunStats
from ._target import TargetError, load_target, parse_target
from ._task import TaskContext, error_line, run_record, type_name

TYPE_CHECKING = False  # not typing's (see _core/_generic.py)
if TYPE_CHECKING:
    from typing import IO, Any

__all__ = ["CliError", "run"]

# A journal commit happens after this many rows, or this long after the first
# uncommitted one arrived, whichever comes first.
COMMIT_ROWS = 1000
COMMIT_SECONDS = 0.25
# How often the loop wakes up with no result: commit timer, progress line, Ctrl-C.
TICK = 0.1

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

# Options that change what a record's output line is: --resume refuses to mix runs
# that differ in any of them. (-j, --retries, --task-timeout, --chunksize may change.)
RESULT_OPTIONS = {
    "target": "TARGET",
    "format": "--format",
    "delimiter": "--delimiter",
    "encoding": "--encoding",
    "seed": "--seed",
    "ordered": "--ordered",
}


class CliError(Exception):
    """A problem found before any work started; exits with status 2 and one line."""


class _Input:
    """The opened INPUT: its line source, fingerprint, and what to record in the journal."""

    def __init__(self, name: str, stream: IO[bytes], fingerprint: Fingerprint | None) -> None:
        self.name = name
        self.stream = stream
        self.source = LineSource(stream)
        self.fingerprint = fingerprint

    @property
    def is_stdin(self) -> bool:
        return self.name == "-"

    def meta(self) -> dict[str, Any]:
        """Identity of the input for the journal (stdin: the prefix read so far)."""
        if self.is_stdin:
            return {
                "name": "-",
                "read_bytes": self.source.consumed,
                "read_digest": self.source.digest(),
                "complete": self.source.at_eof,
            }
        assert self.fingerprint is not None
        fp = self.fingerprint
        return {"name": self.name, "size": fp.size, "mtime_ns": fp.mtime_ns, "digest": fp.digest}

    def close(self) -> None:
        if self.stream is not sys.stdin.buffer:
            self.stream.close()


class _Stop:
    """Turns SIGINT/SIGTERM into a flag the loop checks; a second Ctrl-C is immediate."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._saved: dict[int, Any] = {}

    def __enter__(self) -> _Stop:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._saved[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for sig, handler in self._saved.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: object) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum


def run(opts: RunOptions, argv: list[str]) -> int:
    """Run the job described by ``opts``; returns the exit status.

    Raises:
        CliError: for problems found before work starts (the caller prints it, exits 2).
    """
    began = time.monotonic()
    target = _check_target(opts.target)
    fmt = opts.format or ("jsonl" if opts.input == "-" else detect_format(opts.input))
    settings = {
        "target": opts.target,
        "format": fmt,
        "delimiter": (opts.delimiter or default_delimiter(opts.input)) if fmt == "csv" else None,
        "encoding": opts.encoding if fmt != "jsonl" else None,
        "seed": opts.seed,
        "ordered": opts.ordered,
    }
    if fmt != "jsonl":
        _check_encoding(opts.encoding)
    output = OutputFile(opts.output)
    try:
        output.check_writable()
    except OutputError as exc:
        raise CliError(str(exc)) from None
    job = _Job(opts, argv, target, settings, output)
    try:
        job.prepare()
        return job.execute(began)
    finally:
        job.close()


def _check_target(spec: str) -> Any:
    try:
        target = parse_target(spec)
        # Whatever the module prints on import goes to stderr: stdout may be OUTPUT.
        with contextlib.redirect_stdout(sys.stderr):
            load_target(target)
    except TargetError as exc:
        raise CliError(str(exc)) from None
    return target


def _check_encoding(name: str) -> None:
    try:
        "".encode(name)
    except LookupError:
        raise CliError(f"unknown --encoding {name!r}") from None


class _Job:
    """One ``procpool run``: prepare (open everything, check a resume), then execute."""

    def __init__(
        self,
        opts: RunOptions,
        argv: list[str],
        target: Any,
        settings: dict[str, Any],
        output: OutputFile,
    ) -> None:
        self.opts = opts
        self.argv = argv
        self.target = target
        self.settings = settings
        self.output = output
        self.journal: Journal | None = None
        self.input: _Input | None = None
        self.stats = RunStats()
        self.done = bytearray()
        self.frontier = 0  # --ordered: every index below it is in OUTPUT
        self.notes: list[str] = []
        self.journal_path = opts.journal or (opts.output + ".journal")

    # ------------------------------------------------------------ prepare

    def prepare(self) -> None:
        """Open INPUT, the journal and OUTPUT; on --resume, check and repair. Raises CliError."""
        opts = self.opts
        if self.output.is_stdout:
            if opts.resume:
                raise CliError("--resume needs an OUTPUT file (with '-o -' there is no journal)")
            self.input = self._open_input(spool=False)
            self.output.start_fresh()
            return
        if opts.input != "-":
            self.input = self._open_input(spool=False)
        try:
            journal = (
                Journal.open(self.journal_path) if (opts.resume or not opts.overwrite) else None
            )
        except JournalError as exc:
            raise CliError(str(exc)) from None
        if journal is not None and not opts.resume:
            journal.close()
            raise CliError(
                f"{self.journal_path} holds an earlier run of this job: add --resume to continue "
                f"it, or --overwrite to start again from scratch"
            )
        if self.input is None:  # stdin: to resume, it must be read whole and checked first
            self.input = self._open_input(spool=journal is not None)
        if journal is None:
            if opts.resume:
                self.notes.append(f"no journal at {self.journal_path}: starting from the beginning")
            self._start_fresh()
        else:
            self.journal = journal
            self._resume()

    def _open_input(self, *, spool: bool) -> _Input:
        name = self.opts.input
        try:
            if name == "-":
                stream = spool_stdin() if spool else sys.stdin.buffer
                fingerprint = fingerprint_stream(stream) if spool else None
                return _Input(name, stream, fingerprint)
            if os.path.isdir(name):
                raise CliError(f"cannot read INPUT {name}: it is a directory")
            stream = open(name, "rb")  # noqa: SIM115 - held open for the run
            # Hashed through the same open file it is read from: no window
            # in which another file could take its name.
            return _Input(name, stream, fingerprint_stream(stream))
        except OSError as exc:
            raise CliError(f"cannot read INPUT {name}: {exc.strerror or exc}") from None

    def _start_fresh(self) -> None:
        assert self.input is not None
        meta = {
            **self.settings,
            "input": self.input.meta(),
            "argv": self.argv,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        try:
            self.journal = Journal.create(self.journal_path, meta)
            self.output.start_fresh()
        except (JournalError, OutputError) as exc:
            raise CliError(str(exc)) from None

    def _resume(self) -> None:
        journal, opts = self.journal, self.opts
        assert journal is not None and self.input is not None
        self._check_settings(journal.meta)
        self._check_input(journal.meta.get("input") or {})
        if opts.retry_failed:
            again = journal.forget_failed()
            if again:
                self.notes.append(f"--retry-failed: {again} failed records will run again")
        for idx, ok in journal.done():
            self._mark(idx)
            if ok:
                self.stats.skipped_ok += 1
            else:
                self.stats.skipped_failed += 1
        try:
            repair = self.output.repair(journal.projection(ordered=opts.ordered))
        except OutputError as exc:
            raise CliError(str(exc)) from None
        self.frontier = repair.kept + repair.appended
        skipped = self.stats.skipped
        self.notes.append(
            f"resuming: {skipped} records already done, kept from {self.journal_path}"
        )
        if repair.changed:
            self.notes.append(
                f"repaired {opts.output} from the journal: kept {repair.kept} lines, "
                f"cut {repair.dropped_bytes} bytes, wrote {repair.appended} lines"
            )

    def _check_settings(self, meta: dict[str, Any]) -> None:
        differ = [
            f"{flag} was {meta.get(key)!r}, now {self.settings[key]!r}"
            for key, flag in RESULT_OPTIONS.items()
            if meta.get(key) != self.settings[key]
        ]
        if differ:
            raise CliError(
                f"cannot resume: the journal {self.journal_path} was written with other options "
                f"({'; '.join(differ)}); use the same options, or --overwrite to start again"
            )

    def _check_input(self, before: dict[str, Any]) -> None:
        assert self.input is not None
        now = self.input.fingerprint
        assert now is not None  # a resumed stdin was spooled and fingerprinted
        problem = None
        if "digest" in before:
            if before["digest"] != now.digest:
                problem = (
                    f"size {before.get('size')} -> {now.size} bytes"
                    if before.get("size") != now.size
                    else "same size, different content"
                )
        else:
            self.input.stream.seek(0)
            digest, got = hash_prefix(self.input.stream, before.get("read_bytes", 0))
            self.input.stream.seek(0)
            if got != before.get("read_bytes", 0) or digest != before.get("read_digest"):
                problem = "the first records differ from those the journal recorded"
            elif before.get("complete") and now.size != got:
                problem = f"it had {got} bytes, now {now.size}"
        if problem:
            name = "stdin" if self.input.is_stdin else self.input.name
            raise CliError(
                f"cannot resume: INPUT {name} changed since the journal {self.journal_path} was "
                f"written ({problem}); give the original input, or use --overwrite to start again"
            )

    # ------------------------------------------------------------ execute

    def execute(self, began: float) -> int:
        """Run every record not yet done; returns the exit status."""
        opts = self.opts
        progress = self._progress()
        for note in self.notes:
            self._say(note, progress)
        loop = _Loop(self, progress)
        ctx = TaskContext(
            target=self.target,
            seed=opts.seed,
            retries=opts.retries,
            prefix=opts.prefix,
            clear_line=bool(progress and progress.is_bar and os.isatty(1) and os.isatty(2)),
            stdout_to_stderr=self.output.is_stdout,
        )
        with _Stop() as stop:
            try:
                with Pool(opts.jobs, task_timeout=opts.task_timeout, retries=opts.retries) as pool:
                    results = pool.imap_unordered(
                        functools.partial(run_record, ctx),
                        loop.feed(),
                        chunksize=opts.chunksize,
                        return_exceptions=True,
                    )
                    loop.consume(results, stop)
                    results.close()
                    self.stats.pool = pool.statistics()
                loop.flush()
            except (OutputError, sqlite3.Error, OSError) as exc:
                # What was committed stays committed; --resume repairs OUTPUT.
                loop.fatal = f"cannot record results: {exc}"
            except BaseException:
                with contextlib.suppress(Exception):  # a second Ctrl-C: keep what we can
                    loop.flush()
                raise
        if progress is not None:
            progress.close()  # plain lines: a last one, so even a short run shows one
        return self._finish(loop, stop, time.monotonic() - began)

    def _progress(self) -> Progress | None:
        if self.opts.quiet:
            return None
        assert self.input is not None
        estimate = None
        fp = self.input.fingerprint
        if fp is not None:
            estimate = max(0, fp.lines - (1 if self.settings["format"] == "csv" else 0))
            estimate = max(0, estimate - self.stats.skipped)
        return Progress(
            estimate, desc="procpool run", unit="rec", interval=self.opts.progress_interval
        )

    def _finish(self, loop: _Loop, stop: _Stop, wall: float) -> int:
        stats, opts = self.stats, self.opts
        interrupted = stop.signal is not None
        if not opts.quiet:
            print(stats.render(wall, interrupted=interrupted), file=sys.stderr)
        if loop.fatal is not None:
            print(f"procpool run: error: {loop.fatal}", file=sys.stderr)
        resume = self._resume_command()
        if interrupted or loop.fatal is not None or stats.unattributed:
            if resume:
                print(
                    f"procpool run: {stats.done + stats.skipped} records are safe in "
                    f"{self.journal_path}; to finish the job run:\n  {resume}",
                    file=sys.stderr,
                )
            if interrupted:
                return EXIT_INTERRUPTED
            return EXIT_USAGE if loop.fatal is not None else EXIT_FAILED
        if self.journal is not None:
            self.journal.set_meta(finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        failed = stats.failed + stats.skipped_failed
        return EXIT_FAILED if failed else EXIT_OK

    def _resume_command(self) -> str | None:
        if self.journal is None:
            return None
        args = [a for a in self.argv if a not in ("--overwrite", "--resume", "--retry-failed")]
        command = shlex.join(["procpool", *args, "--resume"])
        return f"<the same input> | {command}" if self.opts.input == "-" else command

    def _say(self, text: str, progress: Progress | None) -> None:
        if self.opts.quiet:
            return
        if progress is not None:
            progress.write(f"procpool run: {text}")
        else:
            print(f"procpool run: {text}", file=sys.stderr)

    def _mark(self, idx: int) -> None:
        if idx >= len(self.done):
            self.done.extend(bytes(max(idx + 1 - len(self.done), len(self.done) // 2, 1024)))
        self.done[idx] = 1

    def is_done(self, idx: int) -> bool:
        return idx < len(self.done) and self.done[idx] == 1

    def close(self) -> None:
        self.output.close()
        if self.journal is not None:
            self.journal.close()
        if self.input is not None:
            self.input.close()


class _Loop:
    """The running part: feeds records, takes outcomes, commits and writes."""

    def __init__(self, job: _Job, progress: Progress | None) -> None:
        self.job = job
        self.progress = progress
        self.fed = array("q")  # position in the pool's input -> record index
        self.input_errors: list[tuple[int, str]] = []
        self.pending: list[tuple[int, bool, str]] = []
        self.pending_since = 0.0
        self.fatal: str | None = None
        self.seen = 0  # records read from INPUT so far

    def feed(self) -> Iterator[tuple[int, Any]]:
        """The records still to do, as ``(index, record)``; runs on the consumer's thread."""
        job = self.job
        assert job.input is not None
        settings = job.settings
        records = read_records(
            job.input.source,
            settings["format"],
            delimiter=settings["delimiter"] or ",",
            encoding=settings["encoding"] or "utf-8",
        )
        try:
            for index, record, problem in records:
                self.seen = index + 1
                if job.is_done(index):
                    continue
                if problem is not None:
                    self.input_errors.append((index, problem))
                    continue
                self.fed.append(index)
                yield index, record
        except (InputError, OSError) as exc:
            name = "stdin" if job.input.is_stdin else job.input.name
            self.fatal = f"reading INPUT {name} stopped after {self.seen} records: {exc}"
            return
        if self.progress is not None:
            self.progress.set_total(self.seen - job.stats.skipped)

    def consume(self, results: Any, stop: _Stop) -> None:
        """Take outcomes until the input is done, a stop is requested, or reading failed."""
        while stop.signal is None:
            try:
                item = results.next(timeout=TICK)
            except MPTimeoutError:
                item = None
            except StopIteration:
                self._take_input_errors()
                return
            if item is not None:
                self._take(item)
            self._take_input_errors()
            if self.pending and (
                len(self.pending) >= COMMIT_ROWS
                or time.monotonic() - self.pending_since >= COMMIT_SECONDS
            ):
                self.flush()
            if self.progress is not None:
                self.progress.tick()

    def _take(self, item: Any) -> None:
        job = self.job
        if isinstance(item, BaseException):
            self._take_pool_error(item)
            return
        index, ok, line, pid, in_task, encoding, between = item
        if job.is_done(index):
            return  # cannot happen (each record is fed once); never write it twice
        job.stats.time_worker(pid, in_task, encoding, between, len(line) + 1)
        self._add(index, ok, line, None if ok else _message_of(line))

    def _take_pool_error(self, exc: BaseException) -> None:
        position = getattr(exc, "task_index", None)
        if not isinstance(position, int) or not 0 <= position < len(self.fed):
            self.job.stats.unattributed += 1
            if self.job.stats.unattributed == 1:
                self.job._say(
                    f"a pool error names no record: {type(exc).__name__}: {exc}", self.progress
                )
            return
        index = self.fed[position]
        if self.job.is_done(index):
            return
        # The pool numbers tasks by position among the records it was fed; on a
        # resumed run that is not the record index, so name the record instead.
        message = str(exc).replace(f"task {position}", f"record {index}")
        line = error_line(index, type_name(exc), message, None)
        self._add(index, False, line, f"{type_name(exc)}: {message}")

    def _take_input_errors(self) -> None:
        errors, self.input_errors = self.input_errors, []
        for index, problem in errors:
            if not self.job.is_done(index):
                line = error_line(index, "InputError", problem, None, line=_line_number(problem))
                self._add(index, False, line, f"InputError: {problem}")

    def _add(self, index: int, ok: bool, line: str, message: str | None) -> None:
        self.job._mark(index)
        if not self.pending:
            self.pending_since = time.monotonic()
        self.pending.append((index, ok, line))
        self.job.stats.count(index, ok, message)
        if self.progress is not None:
            self.progress.update(1, 0 if ok else 1)

    def flush(self) -> None:
        """Commit the pending rows, then write them to OUTPUT."""
        job = self.job
        rows, self.pending = self.pending, []
        if not rows:
            return
        began = time.monotonic()
        if job.journal is not None:
            assert job.input is not None
            meta = {"input": job.input.meta()} if job.input.is_stdin else None
            job.journal.add(rows, meta)
        if job.opts.ordered:
            self._write_ordered(rows)
        else:
            job.output.write([line for _, _, line in rows])
        job.stats.parent_io += time.monotonic() - began

    def _write_ordered(self, rows: list[tuple[int, bool, str]]) -> None:
        job = self.job
        if job.journal is None:  # stdout: hold lines until their turn
            self._held = getattr(self, "_held", {})
            self._held.update((idx, line) for idx, _, line in rows)
            lines = []
            while job.frontier in self._held:
                lines.append(self._held.pop(job.frontier))
                job.frontier += 1
            job.output.write(lines)
            return
        while job.is_done(job.frontier):
            lines = []
            for idx, line in job.journal.lines_from(job.frontier, 4096):
                if idx != job.frontier:
                    break
                lines.append(line)
                job.frontier += 1
            job.output.write(lines)
            if not lines:
                break


def _line_number(problem: str) -> int | None:
    """The (first) line number a reader's problem message starts with."""
    digits = problem.removeprefix("line ").split(",")[0].split(":")[0].split("-")[0]
    return int(digits) if digits.isdigit() else None


def _message_of(line: str) -> str:
    with contextlib.suppress(ValueError, KeyError, TypeError):
        error = json.loads(line)["error"]
        return f"{error['type']}: {error['message']}"
    return "failed"
