"""The parent side: one fresh subprocess per contender x workload case, with a time limit.

The subprocess leads a new session (so a process group of its own): when it ends, or when
its time is up, or when its memory passes the guard, the whole group is killed by the
subprocess's pid, which takes stray workers with it. Its output goes to files, never to a
pipe: a worker that outlives its parent would hold a pipe open and hang the reader.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent.parent
POLL_S = 0.05
MEMORY_GUARD_BYTES = 8 * 1024**3


@dataclass
class Record:
    """The outcome of one case. status: ok, n/a, hang, error."""

    contender: str
    workload: str
    case: str
    status: str
    figures: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    error: str = ""
    wall_s: float = 0.0
    limit_s: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Spec:
    contender: str
    workload: str
    case: str
    mode: str
    params: dict[str, Any]


def child_env() -> dict[str, str]:
    """The environment of a benchmark subprocess: ``bench`` importable by every worker of
    every library (spawned, forkserver'd, Dask's nannies, Ray's workers), no telemetry."""
    env = dict(os.environ)
    paths = [str(BENCH_DIR), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env["PYTHONUNBUFFERED"] = "1"
    # Every peer was installed by pip, which writes bytecode caches; procpool is an
    # editable install whose caches Python writes on first import. Without them
    # (PYTHONDONTWRITEBYTECODE, set on some machines) only procpool would compile
    # its sources in every timed start-up.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def compile_procpool(python: str) -> None:
    """Write procpool's bytecode caches, as installing it would, before anything is timed."""
    src = BENCH_DIR.parent / "src" / "procpool"
    if src.is_dir():
        subprocess.run([python, "-m", "compileall", "-q", str(src)], check=False, env=child_env())


def run_case(python: str, spec: Spec, limit_s: float) -> Record:
    """Run one case in a fresh subprocess and read back what it recorded."""
    with tempfile.TemporaryDirectory(prefix="procpool-bench-") as tmp:
        result_path, log_path = Path(tmp, "result.jsonl"), Path(tmp, "output.log")
        command = [python, "-m", "bench.child", json.dumps(asdict(spec)), str(result_path)]
        start = time.monotonic()
        semaphores = _named_semaphores()
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                command,
                cwd=tmp,
                env=child_env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            ending, peak = _watch(process, limit_s)
        finally:
            _kill_group(process)
            _remove_new_semaphores(semaphores)
        record = _read(spec, result_path, ending, peak, log_path)
        record.wall_s, record.limit_s = time.monotonic() - start, limit_s
        return record


def _watch(process: subprocess.Popen[bytes], limit_s: float) -> tuple[str, int]:
    """Wait for the subprocess: 'exited', 'hang' or 'memory'; also its last peak RSS."""
    deadline = time.monotonic() + limit_s
    peak = 0
    while process.poll() is None:
        rss, peak = _memory(process.pid, peak)
        if rss > MEMORY_GUARD_BYTES:
            return "memory", peak
        if time.monotonic() > deadline:
            return "hang", peak
        time.sleep(POLL_S)
    return "exited", peak


def _memory(pid: int, peak: int) -> tuple[int, int]:
    """The process's RSS and peak RSS (VmHWM, which the child may reset), in bytes."""
    values = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            name, _, rest = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                values[name] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return values.get("VmRSS", 0), values.get("VmHWM", peak)


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    # The group id is the subprocess's pid (it leads its own session); members live on
    # after the leader exits, so this also reaps orphaned workers.
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    process.wait()
    _remove_leftovers(process.pid)


def _remove_leftovers(pid: int) -> None:
    # A process group killed at once can leave in /dev/shm what its processes would
    # have removed on their way out, named after the measuring process's pid:
    # procpool's named segments in flight, where it falls back to names (no
    # memfd_create; docs/pools.md, Large arrays); loky's semaphores (its resource
    # tracker dies with the group: 8-16 a measurement); joblib's memmap folders.
    prefixes = (f"procpool-{pid}-", f"sem.loky-{pid}-", f"joblib_memmapping_folder_{pid}_")
    try:
        names = [n for n in os.listdir("/dev/shm") if n.startswith(prefixes)]
    except OSError:
        return
    for name in names:
        path = os.path.join("/dev/shm", name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
            continue
        try:
            os.unlink(path)
        except OSError:
            pass


def _named_semaphores() -> set[str]:
    """multiprocessing's named semaphores in /dev/shm (``sem.mp-`` and a random name)."""
    try:
        return {n for n in os.listdir("/dev/shm") if n.startswith("sem.mp-")}
    except OSError:
        return set()


def _remove_new_semaphores(before: set[str]) -> None:
    # A spawn or forkserver context's locks stay named in /dev/shm until their
    # process (or its resource tracker) unlinks them; a measurement killed at its
    # time limit (a peer that hangs in W7) leaves them: 5-6 each. Their names say
    # nothing of who made them, so only those that appeared during the measurement
    # go, and only where no living process still has one mapped.
    new = _named_semaphores() - before
    if not new:
        return
    in_use: set[str] = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            maps = Path("/proc", entry, "maps").read_text()
        except OSError:
            continue
        in_use.update(name for name in new if name in maps)
    for name in new - in_use:
        try:
            os.unlink(os.path.join("/dev/shm", name))
        except OSError:
            pass


def _read(spec: Spec, result_path: Path, ending: str, peak: int, log_path: Path) -> Record:
    record = Record(spec.contender, spec.workload, spec.case, status="error")
    partial: dict[str, Any] = {}
    lines = result_path.read_text().splitlines() if result_path.exists() else []
    for line in lines:
        entry = json.loads(line)
        partial.update(entry.get("partial", {}))
        if "result" in entry:
            record.status, record.figures, record.notes = "ok", entry["result"], entry["notes"]
        elif "na" in entry:
            record.status, record.error = "n/a", entry["na"]
        elif "error" in entry:
            record.error = entry["error"]
    if record.status == "ok" or record.error:
        return record
    if ending in ("hang", "memory"):
        record.status = "hang" if ending == "hang" else "error"
        record.error = (
            "time limit"
            if ending == "hang"
            else f"memory guard: RSS > {MEMORY_GUARD_BYTES >> 30} GiB"
        )
        record.figures = _at_kill(partial, peak)
        return record
    record.error = "died without a result: " + _tail(log_path)
    return record


def _at_kill(partial: dict[str, Any], peak: int) -> dict[str, Any]:
    """Figures that still mean something for a killed run: memory growth so far (W7)."""
    if "baseline_rss" in partial and peak:
        return {"growth_mb": max(0, peak - partial["baseline_rss"]) / 1e6}
    return {}


def _tail(log_path: Path, lines: int = 3) -> str:
    text = log_path.read_text(errors="replace").strip().splitlines() if log_path.exists() else []
    return " | ".join(text[-lines:]) or "(no output)"


def combine(records: list[Record]) -> Record:
    """One record from repeated runs of a case: the median of each numeric figure, if all
    runs succeeded; otherwise the first failure."""
    failures = [r for r in records if r.status != "ok"]
    if failures:
        return failures[0]
    merged = Record(**{**records[0].to_json(), "figures": dict(records[0].figures)})
    for key, value in records[0].figures.items():
        if isinstance(value, (int, float)):
            merged.figures[key] = statistics.median(r.figures[key] for r in records)
    merged.notes = [*records[0].notes, f"median of {len(records)} fresh processes"]
    merged.wall_s = sum(r.wall_s for r in records)
    return merged


def capture(python: str, *args: str, timeout_s: float = 120) -> str:
    """Run ``python -m bench.child ARGS`` and return its stdout (describe, calibrate)."""
    done = subprocess.run(
        [python, "-m", "bench.child", *args],
        cwd=BENCH_DIR,
        env=child_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=True,
    )
    return done.stdout
