"""The progress reporter: plain lines on a clock, a tqdm bar on a terminal, callbacks."""

from __future__ import annotations

import io

import pytest

from procpool._progress import Progress, ProgressUpdate, format_seconds, progress_for


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_lines_come_every_interval_not_every_update() -> None:
    clock, out = FakeClock(), io.StringIO()
    progress = Progress(10, stream=out, interval=5.0, desc="job", clock=clock)
    assert progress.mode == "lines"
    for _ in range(3):
        clock.now += 1
        progress.update()
    assert out.getvalue() == ""
    clock.now += 2  # 5 s since the start
    progress.update(1, failed=1)
    assert out.getvalue() == "job: 4/10 (40.0%), 1 failed, 0.8/s, elapsed 5.0s, ETA 7.5s\n"
    clock.now += 4
    progress.update()
    assert out.getvalue().count("\n") == 1
    clock.now += 1
    progress.tick()  # nothing finished, but a line is due: slow tasks still show life
    assert out.getvalue().count("\n") == 2
    progress.close()
    progress.close()  # twice is harmless
    assert out.getvalue().splitlines()[-1].startswith("job: 5/10 (50.0%), 1 failed")


def test_a_bar_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("tqdm")
    monkeypatch.delenv("TERM", raising=False)
    out = Terminal()
    with Progress(4, stream=out, desc="job", unit="rec") as progress:
        assert progress.is_bar
        progress.update(3, failed=1)
        progress.write("a message")
    text = out.getvalue()
    assert "job:" in text and "3/4" in text and "1 failed" in text
    assert "a message\n" in text


def test_dumb_terminal_gets_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TERM", "dumb")
    assert Progress(stream=Terminal()).mode == "lines"


def test_callback_gets_snapshots_and_its_errors_propagate() -> None:
    seen: list[ProgressUpdate] = []
    clock = FakeClock()
    progress = Progress(3, callback=seen.append, clock=clock)
    clock.now += 2
    progress.update()
    progress.update(2, failed=1)
    assert [(u.done, u.failed, u.total) for u in seen] == [(1, 0, 3), (3, 1, 3)]
    assert seen[-1].rate == 1.5 and seen[-1].eta == 0.0

    def broken(update: ProgressUpdate) -> None:
        raise RuntimeError("listener failed")

    with pytest.raises(RuntimeError, match="listener failed"):
        Progress(callback=broken).update()


def test_unknown_total_can_be_set_later() -> None:
    clock, out = FakeClock(), io.StringIO()
    progress = Progress(stream=out, interval=1.0, clock=clock)
    progress.update(5)
    assert progress.snapshot().eta is None
    progress.set_total(10)
    clock.now += 1
    progress.update()
    assert "6/10 (60.0%)" in out.getvalue()


def test_progress_for_turns_options_into_reporters() -> None:
    assert progress_for(None) is None and progress_for(False) is None
    assert isinstance(progress_for(True), Progress)
    ready = Progress(mode="off")
    assert progress_for(ready) is ready
    assert progress_for(lambda update: None).mode == "off"  # type: ignore[union-attr]
    with pytest.raises(TypeError):
        progress_for("yes")  # type: ignore[arg-type]


def test_bad_options_are_rejected() -> None:
    with pytest.raises(ValueError, match="mode"):
        Progress(mode="fancy")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="interval"):
        Progress(interval=0)


@pytest.mark.parametrize(
    ("seconds", "text"), [(3.21, "3.2s"), (42, "42s"), (245, "4m05s"), (7380, "2h03m")]
)
def test_format_seconds(seconds: float, text: str) -> None:
    assert format_seconds(seconds) == text
