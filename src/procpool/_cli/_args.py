"""The command line: ``procpool run`` and its options, each documented with an example."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from .._version import __version__
from ._inputs import FORMATS

__all__ = ["RunOptions", "build_parser"]

RUN_DESCRIPTION = """\
Call a Python function on every record of INPUT, in parallel worker processes,
and write one JSON line per record to OUTPUT:

  {"index": 0, "result": ...}                                        on success
  {"index": 7, "error": {"type": ..., "message": ..., "traceback": ...}}  on failure

A SQLite journal beside OUTPUT (OUTPUT.journal) records every finished record.
If the run is interrupted or killed, the same command with --resume redoes
nothing that finished, loses nothing, and never writes a record twice.
"""

RUN_EPILOG = """\
examples:
  procpool run examples/wordcount/wordcount.py:count_words \
      examples/wordcount/input.jsonl -o out.jsonl
  procpool run mypkg.scoring:score rows.csv -o scores.jsonl -j 8 --task-timeout 60 --retries 2
  procpool run mypkg.scoring:score rows.csv -o scores.jsonl --resume      # after a crash or Ctrl-C
  cat urls.txt | procpool run fetch.py:fetch - --format lines -o pages.jsonl --ordered

exit status:
  0  every record succeeded        1  the run finished, but some records failed
  2  bad usage, TARGET, INPUT, OUTPUT or journal: found before any work (nothing ran), or an
     I/O error during the run (finished records are kept: fix it and use --resume)
  130  interrupted (Ctrl-C or SIGTERM); finished records are kept, see --resume
"""


@dataclass(frozen=True)
class RunOptions:
    """The parsed options of ``procpool run``; see ``procpool run --help``."""

    target: str
    input: str
    output: str
    jobs: int | None
    format: str | None
    delimiter: str | None
    encoding: str
    ordered: bool
    resume: bool
    retry_failed: bool
    overwrite: bool
    retries: int
    task_timeout: float | None
    chunksize: int
    seed: int | None
    prefix: bool
    quiet: bool
    progress_interval: float
    journal: str | None


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, not {text}")
    return value


def _one_char(text: str) -> str:
    text = {"\\t": "\t", "tab": "\t"}.get(text, text)
    if len(text) != 1:
        raise argparse.ArgumentTypeError(f"must be one character, not {text!r}")
    return text


def build_parser() -> argparse.ArgumentParser:
    """The ``procpool`` parser, with its ``run`` subcommand."""
    parser = argparse.ArgumentParser(
        prog="procpool",
        description="procpool: process pools that never hang, lose nothing, and show progress.",
        epilog="Run 'procpool run --help' for the batch-job command.",
    )
    parser.add_argument("--version", action="version", version=f"procpool {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    run = commands.add_parser(
        "run",
        help="run a function over every record of a file, durably",
        description=RUN_DESCRIPTION,
        epilog=RUN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_run_arguments(run)
    return parser


def _add_run_arguments(run: argparse.ArgumentParser) -> None:
    add = run.add_argument
    add(
        "target",
        metavar="TARGET",
        help="the function to call on each record: 'package.module:function' or "
        "'path/to/file.py:function' (e.g. mypkg.scoring:score, ./tasks.py:clean)",
    )
    add(
        "input",
        metavar="INPUT",
        nargs="?",
        default="-",
        help="the records: a JSONL, CSV or plain-lines file, or '-' for stdin (the default) "
        "(e.g. rows.csv)",
    )
    add(
        "-o",
        "--output",
        metavar="OUTPUT",
        required=True,
        help="JSONL file for the results, one line per record; '-' writes to stdout without "
        "a journal (e.g. -o results.jsonl)",
    )
    add(
        "-j",
        "--jobs",
        metavar="N",
        type=_positive_int,
        default=None,
        help="worker processes (default: one per CPU) (e.g. -j 8)",
    )
    add(
        "--format",
        choices=FORMATS,
        default=None,
        help="how INPUT is read: jsonl (one JSON value per line), csv (each row a dict keyed "
        "by the header), lines (each line a string). Default: from INPUT's extension "
        "(.csv/.tsv: csv, .txt: lines, anything else and stdin: jsonl) (e.g. --format lines)",
    )
    add(
        "--delimiter",
        metavar="C",
        type=_one_char,
        default=None,
        help="CSV field separator (default ',' or tab for .tsv) (e.g. --delimiter ';')",
    )
    add(
        "--encoding",
        metavar="NAME",
        default="utf-8",
        help="text encoding of CSV and lines input; JSONL is always UTF-8 "
        "(e.g. --encoding latin-1)",
    )
    add(
        "--ordered",
        action="store_true",
        help="write OUTPUT in input order (default: in the order records finish) (e.g. --ordered)",
    )
    add(
        "--resume",
        action="store_true",
        help="continue an interrupted run from its journal: finished records are kept, the "
        "rest run; refuses if INPUT or a result-changing option differs. Without a "
        "journal it simply starts (e.g. --resume)",
    )
    add(
        "--retry-failed",
        action="store_true",
        help="with --resume: also run again the records that failed last time "
        "(e.g. --resume --retry-failed)",
    )
    add(
        "--overwrite",
        action="store_true",
        help="discard an existing journal and OUTPUT and start from the beginning "
        "(e.g. --overwrite)",
    )
    add(
        "--retries",
        metavar="N",
        type=_non_negative_int,
        default=0,
        help="run a failing record up to N more times: if the function raises, if its worker "
        "crashes, or if it times out (e.g. --retries 2)",
    )
    add(
        "--task-timeout",
        metavar="S",
        type=_positive_float,
        default=None,
        help="seconds one record may take; its worker is then killed and replaced and the "
        "record fails with TaskTimeoutError (e.g. --task-timeout 30)",
    )
    add(
        "--chunksize",
        metavar="N",
        type=_positive_int,
        default=1,
        help="records sent to a worker at a time (default 1). Larger is faster for tiny "
        "records, but a worker crash then also fails the finished records of its chunk "
        "(e.g. --chunksize 32)",
    )
    add(
        "--seed",
        metavar="S",
        type=int,
        default=None,
        help="seed Python's random (and NumPy's, if installed) for each record from (S, record "
        "index), so results do not depend on workers or scheduling (e.g. --seed 42)",
    )
    add(
        "--no-prefix",
        dest="prefix",
        action="store_false",
        help="print worker output as is, without the '[w<pid> #<index>] ' tag (e.g. --no-prefix)",
    )
    add(
        "-q",
        "--quiet",
        action="store_true",
        help="no progress and no summary; errors are still reported (e.g. -q)",
    )
    add(
        "--progress-interval",
        metavar="S",
        type=_positive_float,
        default=5.0,
        help="seconds between progress lines when stderr is not a terminal (default 5) "
        "(e.g. --progress-interval 30)",
    )
    add(
        "--journal",
        metavar="PATH",
        default=None,
        help="where the journal lives (default: OUTPUT.journal) (e.g. --journal /fast/disk/run.db)",
    )


def run_options(ns: argparse.Namespace) -> RunOptions:
    """Turn the parsed namespace into :class:`RunOptions`."""
    return RunOptions(
        target=ns.target,
        input=ns.input,
        output=ns.output,
        jobs=ns.jobs,
        format=ns.format,
        delimiter=ns.delimiter,
        encoding=ns.encoding,
        ordered=ns.ordered,
        resume=ns.resume,
        retry_failed=ns.retry_failed,
        overwrite=ns.overwrite,
        retries=ns.retries,
        task_timeout=ns.task_timeout,
        chunksize=ns.chunksize,
        seed=ns.seed,
        prefix=ns.prefix,
        quiet=ns.quiet,
        progress_interval=ns.progress_interval,
        journal=ns.journal,
    )
