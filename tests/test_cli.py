"""``procpool run`` driven as users drive it: a real subprocess, real files, real signals.

The kill-and-resume test is the heart of it: it SIGKILLs runs at random
moments (the whole process group, or only the parent) and checks after every
kill that nothing committed is lost or redone and that no record is written
twice, then that a final ``--resume`` completes the output exactly once.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

import procpool as procpool_lib

REPO = Path(__file__).resolve().parent.parent

TASKS = textwrap.dedent(
    """
    import json, logging, os, random, sys, time

    def double(record):
        return record["n"] * 2

    def logged_double(record):
        # One O_APPEND write per call: the test counts how often each record ran.
        line = f"{os.environ.get('ROUND', '-')} {record['n']}\\n".encode()
        fd = os.open(os.environ["CALLS_LOG"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        os.write(fd, line)
        os.close(fd)
        time.sleep(0.002)
        return record["n"] * 2

    def shuffled(record):
        time.sleep(random.Random(record["n"]).random() * 0.02)
        return record["n"]

    def chatty(record):
        print("working on", record["n"], "now")
        logging.getLogger("chatty").warning("warned %s", record["n"])
        return record["n"]

    def picky(record):
        if record["n"] == 3:
            raise ValueError("three is not allowed")
        if record["n"] == 4:
            return {1, 2}
        if record["n"] == 5:
            os._exit(9)
        if record["n"] == 6:
            time.sleep(60)
        return record["n"]

    def lucky(record):
        return [random.random() for _ in range(3)]

    def upper(text):
        return text.upper()

    def row_total(row):
        return int(row["a"]) + int(row["b"])

    def slow(record):
        time.sleep(0.01)
        return record["n"]

    NOT_CALLABLE = 42
    """
)


@pytest.fixture()
def job(tmp_path: Path) -> Path:
    """A working directory holding ``tasks.py``."""
    (tmp_path / "tasks.py").write_text(TASKS)
    return tmp_path


def write_jsonl(path: Path, n: int) -> Path:
    path.write_text("".join(json.dumps({"n": i}) + "\n" for i in range(n)))
    return path


def procpool(
    cwd: Path,
    *args: str,
    stdin: bytes | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 60,
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "procpool", *args],
        cwd=cwd,
        input=stdin.decode() if stdin is not None else None,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def read_rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def by_index(rows: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    indices = [row["index"] for row in rows]
    assert len(indices) == len(set(indices)), "a record appears twice"
    return {row["index"]: row for row in rows}


# ---------------------------------------------------------------- main job


def test_readme_first_command_runs_the_example(tmp_path: Path) -> None:
    proc = procpool(
        REPO,
        "run",
        "examples/wordcount/wordcount.py:count_words",
        "examples/wordcount/input.jsonl",
        "-o",
        str(tmp_path / "out.jsonl"),
    )
    assert proc.returncode == 0, proc.stderr
    records = (REPO / "examples/wordcount/input.jsonl").read_text().count("\n")
    rows = by_index(read_rows(tmp_path / "out.jsonl"))
    assert sorted(rows) == list(range(records))
    assert all("result" in row and row["result"]["words"] > 0 for row in rows.values())
    assert f"{records} records" in proc.stderr and "ok " in proc.stderr  # the summary
    assert (tmp_path / "out.jsonl.journal").exists()


# ------------------------------------------------------------ durability


def _committed(journal: Path) -> dict[int, str]:
    if not journal.exists():
        return {}
    conn = sqlite3.connect(journal)
    try:
        rows = conn.execute("SELECT idx, line FROM results").fetchall()
    except sqlite3.OperationalError:  # killed before the schema was committed
        return {}
    finally:
        conn.close()  # the next run needs the journal's lock
    return dict(rows)


def _wait_for_growth(path: Path, size: int, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if path.exists() and path.stat().st_size > size:
            return
        time.sleep(0.01)


def _wait_group_dead(pgid: int, seconds: float) -> bool:
    """Wait until no process of group ``pgid`` is alive (zombies awaiting reaping are dead)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        alive = []
        for proc in psutil.process_iter(["status"]):
            try:
                if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                    alive.append(proc)
            except (ProcessLookupError, psutil.Error):
                continue
        if not alive:
            return True
        time.sleep(0.02)
    return False


def test_kill_9_at_random_moments_then_resume_exactly_once(job: Path) -> None:
    n = 4000
    write_jsonl(job / "in.jsonl", n)
    out, journal, calls = job / "out.jsonl", job / "out.jsonl.journal", job / "calls.log"
    cmd = [
        sys.executable,
        "-m",
        "procpool",
        "run",
        "tasks.py:logged_double",
        "in.jsonl",
        "-o",
        "out.jsonl",
        "-j",
        "2",
        "--resume",
        "-q",
    ]
    rng = random.Random(1234)
    durable: dict[int, str] = {}
    committed_by_round: dict[int, int] = {}
    for round_no in range(10):
        env = {**os.environ, "CALLS_LOG": str(calls), "ROUND": str(round_no)}
        proc = subprocess.Popen(
            cmd,
            cwd=job,
            env=env,
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        if round_no % 3 == 0:
            time.sleep(rng.uniform(0.0, 0.6))  # start-up: opening, checking, repairing
        else:
            _wait_for_growth(out, out.stat().st_size if out.exists() else 0)
            time.sleep(rng.uniform(0.0, 0.4))  # mid-run: between and during commits
        if round_no % 2:
            os.kill(proc.pid, signal.SIGKILL)  # the parent alone: workers must notice
            proc.wait()
            assert _wait_group_dead(proc.pid, 5.0), "workers outlived their killed parent"
        else:
            os.killpg(proc.pid, signal.SIGKILL)  # everything at once, like a power cut
            proc.wait()
        now = _committed(journal)
        # Nothing committed is ever lost or changed.
        assert all(now.get(idx) == line for idx, line in durable.items())
        for idx in now.keys() - durable.keys():
            committed_by_round[idx] = round_no
        durable = now
        # The output holds each record at most once, each line one the journal
        # vouches for; only the very last line may be torn by the kill.
        data = out.read_bytes() if out.exists() else b""
        whole = data[: data.rfind(b"\n") + 1].decode().splitlines()
        indices = [json.loads(line)["index"] for line in whole]
        assert len(indices) == len(set(indices)), f"round {round_no}: duplicate record"
        assert all(durable.get(i) == line for i, line in zip(indices, whole))

    assert 0 < len(durable) < n, "the kills should land while work is going on"
    final = procpool(job, *cmd[3:], env={"CALLS_LOG": str(calls), "ROUND": "final"})
    assert final.returncode == 0, final.stderr
    rows = by_index(read_rows(out))
    assert sorted(rows) == list(range(n))
    assert all(row["result"] == 2 * i for i, row in rows.items())
    assert out.read_bytes().endswith(b"\n")
    # Nothing committed was redone: no call of a record after the round that committed it.
    for line in calls.read_text().splitlines():
        round_tag, idx = line.split()
        if int(idx) in committed_by_round and round_tag != "final":
            assert int(round_tag) <= committed_by_round[int(idx)], line
        if round_tag == "final":
            assert int(idx) not in committed_by_round, f"record {idx} ran again after commit"


def test_ctrl_c_stops_cleanly_and_says_how_to_resume(job: Path) -> None:
    write_jsonl(job / "in.jsonl", 400)
    args = ["run", "tasks.py:slow", "in.jsonl", "-o", "out.jsonl", "-j", "2"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "procpool", *args],
        cwd=job,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + 30
    while not (job / "out.jsonl").exists() or not (job / "out.jsonl").stat().st_size:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
    _, err = proc.communicate(timeout=10)
    assert proc.returncode == 130, err
    assert "procpool run tasks.py:slow in.jsonl -o out.jsonl -j 2 --resume" in err
    assert _wait_group_dead(proc.pid, 5.0)
    done_before = len(read_rows(job / "out.jsonl"))
    assert 0 < done_before < 400
    again = procpool(job, *args, "--resume")
    assert again.returncode == 0, again.stderr
    assert f"skipped by resume {done_before}" in again.stderr
    assert sorted(by_index(read_rows(job / "out.jsonl"))) == list(range(400))


def test_resume_refuses_a_changed_input_or_options(job: Path) -> None:
    write_jsonl(job / "in.jsonl", 20)
    args = ["run", "tasks.py:double", "in.jsonl", "-o", "out.jsonl", "-q"]
    assert procpool(job, *args).returncode == 0
    again = procpool(job, *args)
    assert again.returncode == 2 and "--resume" in again.stderr  # never clobbers silently

    other_seed = procpool(job, *args, "--resume", "--seed", "3")
    assert other_seed.returncode == 2 and "--seed" in other_seed.stderr

    text = (job / "in.jsonl").read_text()
    (job / "in.jsonl").write_text(text.replace('{"n": 7}', '{"n": 8}'))
    changed = procpool(job, *args, "--resume")
    assert changed.returncode == 2
    assert "changed since the journal" in changed.stderr
    assert len(changed.stderr.strip().splitlines()) == 1

    fresh = procpool(job, *args, "--overwrite")
    assert fresh.returncode == 0
    assert by_index(read_rows(job / "out.jsonl"))[7]["result"] == 16


def test_resume_repairs_a_torn_output_and_retries_failures(job: Path) -> None:
    (job / "in.jsonl").write_text("".join(json.dumps({"n": i}) + "\n" for i in range(6)))
    args = [
        "run",
        "tasks.py:picky",
        "in.jsonl",
        "-o",
        "out.jsonl",
        "-q",
        "--ordered",
        "--task-timeout",
        "2",
    ]
    first = procpool(job, *args)
    assert first.returncode == 1
    before = (job / "out.jsonl").read_bytes()
    # A crash mid-write: a torn last line and a missing one.
    lines = before.splitlines(keepends=True)
    (job / "out.jsonl").write_bytes(b"".join(lines[:-2]) + lines[-2][:7])
    resumed = procpool(job, *args, "--resume")
    assert resumed.returncode == 1
    assert (job / "out.jsonl").read_bytes() == before
    retried = procpool(job, *args, "--resume", "--retry-failed")
    assert retried.returncode == 1  # the same records fail again, deterministically
    assert "3 failed records will run again" in retried.stderr or retried.stderr == ""

    def kinds(rows: list[dict[str, Any]]) -> list[str]:
        return [row["error"]["type"] if "error" in row else "ok" for row in rows]

    assert kinds(read_rows(job / "out.jsonl")) == kinds(read_rows_text(before.decode()))


# ------------------------------------------------------------ bad input


def test_malformed_jsonl_lines_become_error_rows_naming_the_line(job: Path) -> None:
    (job / "in.jsonl").write_text(
        '{"n": 1}\n'
        "not json\n"
        "\n"  # blank lines are skipped, not records
        '{"n": 2}\n'
        '{"n": 3,}\n'
        '{"n": 4}\n'
        '{"n": 5'  # torn last line, no newline
    )
    proc = procpool(job, "run", "tasks.py:double", "in.jsonl", "-o", "out.jsonl", "--ordered")
    assert proc.returncode == 1, proc.stderr
    rows = read_rows(job / "out.jsonl")
    assert [row["index"] for row in rows] == [0, 1, 2, 3, 4, 5]
    assert [row.get("result") for row in rows] == [2, None, 4, None, 8, None]
    for row, line in ((rows[1], 2), (rows[3], 5), (rows[5], 7)):
        assert row["error"]["type"] == "InputError"
        assert row["error"]["line"] == line
        assert row["error"]["message"].startswith(f"line {line}")


def test_malformed_csv_rows_become_error_rows(job: Path) -> None:
    (job / "in.csv").write_bytes(
        b"a,b\n"
        b"1,2\n"
        b"3,4,5\n"  # one field too many
        b'6,"7"x\n'  # bad quoting
        b"8\n"  # one too few
        b"\xff,1\n"  # not UTF-8
        b"9,10\n"
    )
    proc = procpool(job, "run", "tasks.py:row_total", "in.csv", "-o", "out.jsonl", "--ordered")
    assert proc.returncode == 1, proc.stderr
    rows = read_rows(job / "out.jsonl")
    assert rows[0]["result"] == 3 and rows[-1]["result"] == 19
    assert [row["error"]["line"] for row in rows[1:-1]] == [3, 4, 5, 6]


def test_results_that_are_not_json_and_crashes_are_error_rows(job: Path) -> None:
    write_jsonl(job / "in.jsonl", 8)
    proc = procpool(
        job, "run", "tasks.py:picky", "in.jsonl", "-o", "out.jsonl", "--task-timeout", "1.5"
    )
    assert proc.returncode == 1, proc.stderr
    rows = by_index(read_rows(job / "out.jsonl"))
    assert sorted(rows) == list(range(8))
    assert rows[3]["error"]["type"] == "ValueError"
    assert "three is not allowed" in rows[3]["error"]["traceback"]
    assert "not JSON-serialisable" in rows[4]["error"]["message"]
    assert rows[5]["error"]["type"] == "procpool.WorkerCrashedError"
    assert "record 5" in rows[5]["error"]["message"]
    assert rows[6]["error"]["type"] == "procpool.TaskTimeoutError"
    assert [rows[i]["result"] for i in (0, 1, 2, 7)] == [0, 1, 2, 7]


BAD_TARGETS = [
    ("nosuchmodule:f", "No module named 'nosuchmodule'"),
    ("tasks.py:missing", "no attribute 'missing'"),
    ("tasks.py:NOT_CALLABLE", "not a callable"),
    ("nosuch.py:f", "no such file"),
    ("tasks.py", "must look like"),
    ("broken.py:f", "SyntaxError"),
]


@pytest.mark.parametrize(("target", "message"), BAD_TARGETS)
def test_bad_target_exits_2_before_any_work(job: Path, target: str, message: str) -> None:
    (job / "broken.py").write_text("def f(:\n")
    write_jsonl(job / "in.jsonl", 3)
    proc = procpool(job, "run", target, "in.jsonl", "-o", "out.jsonl")
    assert proc.returncode == 2
    assert message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (job / "out.jsonl").exists() and not (job / "out.jsonl.journal").exists()


def test_unreadable_input_and_unwritable_output_exit_2(job: Path) -> None:
    write_jsonl(job / "in.jsonl", 3)
    missing = procpool(job, "run", "tasks.py:double", "nope.jsonl", "-o", "out.jsonl")
    assert missing.returncode == 2 and "cannot read INPUT" in missing.stderr
    nowhere = procpool(job, "run", "tasks.py:double", "in.jsonl", "-o", "no/such/dir/out.jsonl")
    assert nowhere.returncode == 2 and "cannot write OUTPUT" in nowhere.stderr


# ------------------------------------------------------------ streams


def test_stdin_input_and_stdout_output(job: Path) -> None:
    proc = procpool(
        job,
        "run",
        "tasks.py:upper",
        "-",
        "--format",
        "lines",
        "-o",
        "-",
        "--ordered",
        stdin=b"alpha\nbeta\n\ngamma\n",
    )
    assert proc.returncode == 0, proc.stderr
    assert read_rows_text(proc.stdout) == [
        {"index": 0, "result": "ALPHA"},
        {"index": 1, "result": "BETA"},
        {"index": 2, "result": "GAMMA"},
    ]


def read_rows_text(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines()]


def test_stdin_resume_checks_it_is_the_same_stream(job: Path) -> None:
    data = "".join(json.dumps({"n": i}) + "\n" for i in range(30)).encode()
    args = ["run", "tasks.py:double", "-o", "out.jsonl", "-q"]
    assert procpool(job, *args, stdin=data).returncode == 0
    same = procpool(job, *args, "--resume", stdin=data)
    assert same.returncode == 0 and len(read_rows(job / "out.jsonl")) == 30
    other = procpool(job, *args, "--resume", stdin=data.replace(b'"n": 3}', b'"n": 4}'))
    assert other.returncode == 2 and "changed since the journal" in other.stderr


def test_progress_on_a_non_terminal_is_plain_lines(job: Path) -> None:
    write_jsonl(job / "in.jsonl", 150)
    proc = procpool(
        job,
        "run",
        "tasks.py:slow",
        "in.jsonl",
        "-o",
        "out.jsonl",
        "-j",
        "2",
        "--progress-interval",
        "0.2",
    )
    assert proc.returncode == 0, proc.stderr
    progress = [ln for ln in proc.stderr.splitlines() if ln.startswith("procpool run: ")]
    assert len(progress) >= 2, proc.stderr
    assert "/150 (" in progress[0] and "failed" in progress[0] and "/s" in progress[0]
    assert "\r" not in proc.stderr and "\x1b" not in proc.stderr
    assert "ok 150, failed 0, skipped by resume 0" in proc.stderr
    for column in ("in function", "JSON", "transfer", "waiting"):
        assert column in proc.stderr  # per-worker time use

    quiet = procpool(job, "run", "tasks.py:slow", "in.jsonl", "-o", "q.jsonl", "-q")
    assert quiet.returncode == 0 and quiet.stderr == ""


def test_ordered_output_follows_the_input(job: Path) -> None:
    write_jsonl(job / "in.jsonl", 60)
    proc = procpool(
        job, "run", "tasks.py:shuffled", "in.jsonl", "-o", "out.jsonl", "--ordered", "-j", "2", "-q"
    )
    assert proc.returncode == 0, proc.stderr
    assert [row["index"] for row in read_rows(job / "out.jsonl")] == list(range(60))


def test_worker_output_is_tagged_with_worker_and_record(job: Path) -> None:
    write_jsonl(job / "in.jsonl", 4)
    proc = procpool(job, "run", "tasks.py:chatty", "in.jsonl", "-o", "out.jsonl", "-q")
    assert proc.returncode == 0, proc.stderr
    lines = sorted(proc.stdout.splitlines())
    assert len(lines) == 4
    for line in lines:
        tag, text = line.split("] ", 1)
        assert tag.startswith("[w") and text == f"working on {tag.split('#')[1]} now"
    assert sum("] warned " in line for line in proc.stderr.splitlines()) == 4
    plain = procpool(
        job, "run", "tasks.py:chatty", "in.jsonl", "-o", "p.jsonl", "-q", "--no-prefix"
    )
    assert sorted(plain.stdout.splitlines()) == [f"working on {i} now" for i in range(4)]


def test_seed_makes_results_independent_of_workers(job: Path) -> None:
    write_jsonl(job / "in.jsonl", 12)
    outs = []
    for jobs in ("1", "2"):
        proc = procpool(
            job,
            "run",
            "tasks.py:lucky",
            "in.jsonl",
            "-o",
            f"o{jobs}.jsonl",
            "-j",
            jobs,
            "--seed",
            "7",
            "--ordered",
            "-q",
        )
        assert proc.returncode == 0, proc.stderr
        outs.append((job / f"o{jobs}.jsonl").read_text())
    assert outs[0] == outs[1]
    results = [row["result"] for row in read_rows(job / "o1.jsonl")]
    assert len({json.dumps(r) for r in results}) == 12
    # The same streams as the library's Pool(seed=7) gives tasks 0..11.
    with procpool_lib.Pool(2, seed=7) as pool:
        expected = pool.map(lambda _: [random.random() for _ in range(3)], range(12))
    assert results == expected


def test_help_documents_every_option_with_an_example() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "procpool", "run", "--help"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())
    for option in (
        "--output",
        "--jobs",
        "--format",
        "--delimiter",
        "--encoding",
        "--ordered",
        "--resume",
        "--retry-failed",
        "--overwrite",
        "--retries",
        "--task-timeout",
        "--chunksize",
        "--seed",
        "--no-prefix",
        "--quiet",
        "--progress-interval",
        "--journal",
    ):
        assert option in text
    assert text.count("(e.g.") >= 19  # TARGET, INPUT and every option
    assert "examples:" in text and "exit status:" in text


def test_main_is_callable_in_process(job: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from procpool.__main__ import main

    assert main(["run", "nosuchmodule:f", str(job / "x.jsonl"), "-o", str(job / "o")]) == 2
    assert "No module named" in capsys.readouterr().err
    assert main(["run", "tasks.py:double"]) == 2  # usage error: no -o
    assert "required" in capsys.readouterr().err
    assert main(["--version"]) == 0
