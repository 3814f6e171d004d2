"""Whole-line stdout/stderr: lines of processes printing at once never tear."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import textwrap
import threading
from collections.abc import Iterator

import pytest

from procpool._core import _stdio
from procpool._core._stdio import PIPE_BUF, LineWriter, split_lines
from tests import helpers


@pytest.fixture
def pipe() -> Iterator[tuple[int, LineWriter]]:
    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    writer = LineWriter(write_fd, name="<test>")
    yield read_fd, writer
    writer.close()
    os.close(read_fd)
    os.close(write_fd)


def pending(read_fd: int) -> bytes:
    try:
        return os.read(read_fd, 1 << 20)
    except BlockingIOError:
        return b""


def test_partial_line_held_until_newline(pipe: tuple[int, LineWriter]) -> None:
    read_fd, writer = pipe
    assert writer.write("hello ") == 6
    assert pending(read_fd) == b""
    writer.write("world\nnext")
    assert pending(read_fd) == b"hello world\n"
    writer.flush()
    assert pending(read_fd) == b"next"


def test_print_writes_each_line_in_one_call(
    pipe: tuple[int, LineWriter], monkeypatch: pytest.MonkeyPatch
) -> None:
    read_fd, writer = pipe
    calls: list[bytes] = []
    real_write = os.write
    monkeypatch.setattr(
        _stdio.os, "write", lambda fd, data: calls.append(bytes(data)) or real_write(fd, data)
    )
    print("a", "b", "c", file=writer)  # four write() calls on the text stream
    writer.writelines(["x\n", "y\n"])
    writer.write("one\ntwo\nthree\n")  # several lines, one system call
    assert calls == [b"a b c\n", b"x\n", b"y\n", b"one\ntwo\nthree\n"]
    assert pending(read_fd) == b"a b c\nx\ny\none\ntwo\nthree\n"


def test_split_lines_groups_up_to_pipe_buf() -> None:
    lines = [b"%04d" % i + b"." * 95 + b"\n" for i in range(200)]  # 100 bytes each
    chunks = list(split_lines(b"".join(lines), PIPE_BUF))
    assert b"".join(chunks) == b"".join(lines)
    assert all(len(c) <= PIPE_BUF and c.endswith(b"\n") for c in chunks)
    assert len(chunks) == -(-len(lines) * 100 // (PIPE_BUF // 100 * 100))


def test_split_lines_keeps_a_long_line_whole() -> None:
    long = b"L" * (3 * PIPE_BUF) + b"\n"
    assert list(split_lines(b"a\n" + long + b"b\n", PIPE_BUF)) == [b"a\n", long, b"b\n"]
    assert list(split_lines(b"x" * (2 * PIPE_BUF), PIPE_BUF)) == [b"x" * (2 * PIPE_BUF)]


def test_prefix_marks_every_line_once(pipe: tuple[int, LineWriter]) -> None:
    read_fd, writer = pipe
    assert writer.prefix is None
    writer.prefix = "[w1] "
    writer.write("first\nsecond ")
    writer.flush()  # a partial line goes out with its prefix ...
    writer.write("continued\n")  # ... and its rest without another one
    assert pending(read_fd) == b"[w1] first\n[w1] second continued\n"
    writer.prefix = None
    writer.write("plain\n")
    assert pending(read_fd) == b"plain\n"


def test_long_partial_line_is_not_held_for_ever() -> None:
    with tempfile.TemporaryFile() as out:
        writer = LineWriter(out.fileno())
        writer.buffer.write(b"z" * _stdio.MAX_HELD)
        assert os.fstat(out.fileno()).st_size == 0
        writer.buffer.write(b"z")
        assert os.fstat(out.fileno()).st_size == _stdio.MAX_HELD + 1


def test_behaves_like_a_text_stream(pipe: tuple[int, LineWriter]) -> None:
    read_fd, writer = pipe
    assert writer.writable() and not writer.readable() and not writer.seekable()
    assert writer.isatty() is False
    assert writer.line_buffering and writer.mode == "w" and writer.name == "<test>"
    assert writer.errors == "backslashreplace" and writer.newlines is None
    assert writer.write("é€\n") == 3
    assert writer.write("lone \udc80 surrogate\n") > 0  # no UnicodeEncodeError
    writer.buffer.write(b"raw\n")
    assert pending(read_fd) == "é€\n".encode() + b"lone \\udc80 surrogate\n" + b"raw\n"
    with pytest.raises(TypeError, match="must be str"):
        writer.write(b"bytes")  # type: ignore[arg-type]
    writer.reconfigure(errors="replace", line_buffering=True)
    assert writer.errors == "replace"
    writer.write("tail")
    writer.close()
    assert pending(read_fd) == b"tail" and writer.closed
    writer.close()  # twice is fine
    with pytest.raises(ValueError, match="closed"):
        writer.write("x\n")


def test_threads_never_tear_lines() -> None:
    with tempfile.TemporaryFile() as out:
        writer = LineWriter(out.fileno())

        def spam(char: str) -> None:
            for i in range(300):
                print(char * 200, i, file=writer)

        threads = [threading.Thread(target=spam, args=(c,)) for c in "abcdef"]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        writer.close()
        out.seek(0)
        lines = out.read().decode().splitlines()
    assert len(lines) == 6 * 300
    assert all(re.fullmatch(r"([a-f])\1{199} \d+", line) for line in lines)


def test_flushes_from_other_threads_lose_and_repeat_nothing() -> None:
    # A thread keeps the pieces of its line (print's arguments, separators) as
    # text, appending without the lock; flushes from another thread take them
    # out in place. Every character written must come out exactly once.
    # Threads switch every microsecond here, to meet the races.
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        text = _printed_while_flushed()
    finally:
        sys.setswitchinterval(interval)
    assert {c: text.count(c) for c in "abcd"} == dict.fromkeys("abcd", 2000 * 15)
    assert text.count("\n") == 4 * 2000
    assert sum(text.count(str(d)) for d in range(10)) == 4 * 2000


def _printed_while_flushed() -> str:
    with tempfile.TemporaryFile() as out:
        writer = LineWriter(out.fileno())
        done = threading.Event()

        def spam(char: str) -> None:
            for i in range(2000):
                print(char * 10, char * 5, i % 10, sep="", file=writer)

        def flusher() -> None:
            while not done.is_set():
                writer.flush()

        threads = [threading.Thread(target=spam, args=(c,)) for c in "abcd"]
        flushing = threading.Thread(target=flusher)
        flushing.start()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        done.set()
        flushing.join()
        writer.close()
        out.seek(0)
        return out.read().decode()


def test_text_and_bytes_of_one_line_stay_in_order(pipe: tuple[int, LineWriter]) -> None:
    read_fd, writer = pipe
    writer.write("text, ")
    writer.buffer.write(b"then bytes, ")
    writer.write("then text\n")
    assert pending(read_fd) == b"text, then bytes, then text\n"


def test_a_line_of_many_pieces_comes_out_whole(pipe: tuple[int, LineWriter]) -> None:
    read_fd, writer = pipe
    pieces = [str(i % 10) for i in range(3 * _stdio.MAX_PIECES)]
    for piece in pieces:
        writer.write(piece)
    assert pending(read_fd) == b""
    writer.write("\n")
    assert pending(read_fd) == "".join(pieces).encode() + b"\n"


def test_ended_threads_leave_nothing_behind(pipe: tuple[int, LineWriter]) -> None:
    # Each thread that writes gets a list for its pieces; a flush forgets those
    # of threads that have ended. All alive at once here, so no two share an id.
    read_fd, writer = pipe
    count = 3 * _stdio.MAX_THREADS
    printed = threading.Barrier(count + 1)
    release = threading.Event()

    def say() -> None:
        print("x", file=writer)
        printed.wait(timeout=30)
        release.wait(timeout=30)

    threads = [threading.Thread(target=say) for _ in range(count)]
    for thread in threads:
        thread.start()
    printed.wait(timeout=30)
    assert len(writer._buffer._text) >= count
    release.set()
    for thread in threads:
        thread.join()
    writer.flush()
    assert pending(read_fd) == b"x\n" * count
    assert len(writer._buffer._text) <= _stdio.MAX_THREADS


def test_a_closed_writer_refuses_even_a_partial_line(pipe: tuple[int, LineWriter]) -> None:
    _, writer = pipe
    writer.close()
    with pytest.raises(ValueError, match="closed"):
        writer.write("no newline")


def run_python(code: str, *, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
        check=True,
    )


def test_install_replaces_streams_and_moves_logging_handlers() -> None:
    out = run_python(
        """
        import logging, sys
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        old = sys.stderr
        from procpool._core._stdio import install_line_writers, LineWriter
        install_line_writers()
        install_line_writers()  # idempotent
        assert isinstance(sys.stdout, LineWriter) and isinstance(sys.stderr, LineWriter)
        assert sys.stdout.fileno() == 1 and sys.stderr.fileno() == 2
        assert logging.getLogger().handlers[0].stream is sys.stderr
        logging.info("logged")
        print("out")
        sys.stdout.write("partial, flushed at exit")
        """
    )
    assert out.stdout == "out\npartial, flushed at exit"
    assert out.stderr == "logged\n"


def test_install_leaves_odd_streams_alone() -> None:
    out = run_python(
        """
        import io, sys
        fake = io.StringIO()
        sys.stdout, sys.stderr = fake, None
        from procpool._core._stdio import install_line_writers
        install_line_writers()
        assert sys.stdout is fake and sys.stderr is None
        sys.__stdout__.write("ok")
        """
    )
    assert out.stdout == "ok"


TWO_PRINTERS = """
import sys
import procpool

def spam(char):
    for i in range(2000):
        print(char * 3000, i)

if __name__ == "__main__":
    ctx = procpool.get_context(sys.argv[1])
    procs = [ctx.Process(target=spam, args=(c,)) for c in "ab"]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    assert [p.exitcode for p in procs] == [0, 0]
"""


def test_two_processes_printing_long_lines_never_tear(
    start_method: str, tmp_path: os.PathLike[str]
) -> None:
    # Unbuffered, the stdlib writes each line's text and its newline apart;
    # the other process's line often lands in between (a few percent of lines).
    lines = helpers.script_output(tmp_path, TWO_PRINTERS, start_method, PYTHONUNBUFFERED="1")
    lines = lines.split("\n")
    assert lines.pop() == ""
    torn = [line[:40] for line in lines if not re.fullmatch(r"(a{3000}|b{3000}) \d+", line)]
    assert torn == []
    assert len(lines) == 4000


STREAMS_CHANGED_BETWEEN_STARTS = """
import sys
import procpool

def say(text):
    print(text)

def start(text):
    proc = procpool.get_context("fork").Process(target=say, args=(text,))
    proc.start()
    proc.join()
    assert proc.exitcode == 0

if __name__ == "__main__":
    start("\\u00e9 utf-8")
    sys.stdout.reconfigure(encoding="latin-1")
    start("\\u00e9 latin-1")
    sys.stdout.flush()
    with open(sys.argv[1], "w", encoding="utf-8") as sys.stdout:
        start("\\u00e9 to the file")
"""


def test_a_forked_child_writes_to_the_parents_stream_as_it_is_at_start(
    tmp_path: os.PathLike[str],
) -> None:
    # A forking parent makes its children's line writers ahead of the fork,
    # for the stream it has then; one reconfigured or replaced since must be
    # seen for what it is now.
    target = os.path.join(tmp_path, "out.txt")
    out = helpers.script_output(
        tmp_path, STREAMS_CHANGED_BETWEEN_STARTS, target, PYTHONIOENCODING="utf-8"
    )
    assert out.encode("utf-8", "surrogateescape") == b"\xc3\xa9 utf-8\n\xe9 latin-1\n"
    with open(target, encoding="utf-8") as f:
        assert f.read() == "\u00e9 to the file\n"


def test_a_partial_line_is_not_printed_again_by_a_grandchild() -> None:
    # The child's line writer (made ahead, by its parent) holds a partial line
    # when the child forks: the grandchild must start with nothing held.
    out = run_python(
        """
        import os, sys
        import procpool

        def child():
            print("partial", end="")
            pid = os.fork()
            if pid == 0:
                print("grandchild")
                sys.stdout.flush()
                os._exit(0)
            os.waitpid(pid, 0)
            print(" line")

        if __name__ == "__main__":
            proc = procpool.get_context("fork").Process(target=child)
            proc.start()
            proc.join()
            assert proc.exitcode == 0
        """
    )
    assert sorted(out.stdout.splitlines()) == ["grandchild", "partial line"]
