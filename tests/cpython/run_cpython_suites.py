"""Run CPython's own pool test suites against procpool.

The multiprocessing Pool tests (``_TestPool``, ``_TestPoolWorkerErrors``,
``_TestPoolWorkerLifetime`` with the ``processes`` mixin, and the few other
tests of ``Lib/test/_test_multiprocessing.py`` that build a Pool) and the
ProcessPoolExecutor tests of ``Lib/test/test_concurrent_futures`` run
unmodified, from the interpreter's own test package, with procpool's classes
substituted for the stdlib's before the test modules are imported (see
``_substitute.py``). Tests that inspect private attributes of the stdlib's
implementation are left out and listed, with the attribute.

Usage::

    python tests/cpython/run_cpython_suites.py [--python 3.13] [--suite mp|cf]
        [--start-method fork|forkserver|spawn ...] [-k REGEX ...]
        [--test-timeout S] [--timeout S] [--json PATH] [--src DIR] [-v]

``--python`` takes a version (found in ``~/.pyenv/versions`` or on PATH) or a
path. Where that interpreter's test package lacks a suite module (pyenv's 3.11
build has no ``test_concurrent_futures``), ``/usr/lib/pythonX.Y/test`` of the
same minor version fills the gap if present (Debian's
``libpython3.X-testsuite``); what is still missing is reported, and the exit
status says so. procpool comes from this checkout's ``src`` (or ``--src``);
cloudpickle, if the interpreter lacks it, is borrowed from the one running
this script (it is pure Python).

Each test module runs in a child process of its own session; a test that runs
past ``--test-timeout`` gets its stacks dumped, its process group killed, and
the module goes on in a fresh child. ``--timeout`` bounds the whole run. Only
process groups this runner started are ever killed.

Exit status: 0 if every test that ran passed or was skipped, 1 otherwise, 2 if
the run could not be completed (a suite is missing, or the global timeout hit).
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
SRC = os.path.join(REPO, "src")
SITE = os.path.join(HERE, "_site")
CHILD = os.path.join(HERE, "_child.py")

SUITE_NAMES = {"mp": "multiprocessing Pool", "cf": "concurrent.futures ProcessPoolExecutor"}
START_METHODS = ("fork", "forkserver", "spawn")
OUTPUT_MARKER = "[cpython-suite-runner] start "  # printed by _child.py before each test
OUTPUT_LINES = 30
# Outcomes, worst first: a test with several (subtests) keeps the worst.
SEVERITY = ("error", "fail", "skip", "pass")


@dataclasses.dataclass
class CaseResult:
    id: str
    suite: str
    outcome: str = "error"  # pass, fail, error, skip, excluded
    detail: str = ""
    seconds: float = 0.0


@dataclasses.dataclass
class Report:
    python: str
    version: str
    start_methods: list[str]
    results: list[CaseResult]
    missing: list[str]  # "module: why" for suite modules that could not be imported
    notes: list[str]
    aborted: str = ""  # why the run stopped early, if it did

    def count(self, outcome: str, suite: str | None = None) -> int:
        return sum(1 for r in self.results if r.outcome == outcome and suite in (None, r.suite))

    @property
    def ok(self) -> bool:
        return not (self.count("fail") or self.count("error") or self.missing or self.aborted)


# ------------------------------------------------------------ interpreters


def find_python(spec: str | None) -> str:
    """An interpreter for ``spec``: None (this one), a path, or a version like ``3.13``."""
    if spec is None:
        return sys.executable
    if os.sep in spec or os.path.exists(spec):
        return spec
    if not re.fullmatch(r"\d+\.\d+", spec):
        raise SystemExit(f"--python takes a path or a version such as 3.13, not {spec!r}")
    if f"{sys.version_info[0]}.{sys.version_info[1]}" == spec:
        return sys.executable
    home = os.path.expanduser("~/.pyenv/versions")
    found = sorted(
        glob.glob(os.path.join(home, f"{spec}.*", "bin", "python")),
        key=lambda p: [int(x) for x in re.findall(r"\d+", p.split(os.sep)[-3])],
    )
    if found:
        return found[-1]
    on_path = shutil.which(f"python{spec}")
    if on_path:
        return on_path
    raise SystemExit(f"no Python {spec} found (looked in {home} and on PATH)")


def _probe(python: str) -> dict[str, Any]:
    code = (
        "import json, sys, importlib.util as u\n"
        "print(json.dumps({'version': sys.version.split()[0],"
        " 'short': '%d.%d' % sys.version_info[:2],"
        " 'cloudpickle': u.find_spec('cloudpickle') is not None}))"
    )
    out = subprocess.run(
        [python, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def _borrow_cloudpickle(workdir: str) -> str:
    """A directory holding only this interpreter's cloudpickle (pure Python), for PYTHONPATH."""
    import cloudpickle

    shim = os.path.join(workdir, "borrowed")
    os.makedirs(shim, exist_ok=True)
    os.symlink(os.path.dirname(cloudpickle.__file__), os.path.join(shim, "cloudpickle"))
    return shim


def child_environment(
    python: str, workdir: str, notes: list[str], src: str = SRC
) -> dict[str, str]:
    """The environment every test process runs in: procpool substituted, test dirs found."""
    info = _probe(python)
    paths = [SITE, src]
    if src != SRC:
        notes.append(f"procpool from {src}")
    if not info["cloudpickle"]:
        paths.append(_borrow_cloudpickle(workdir))
        notes.append(f"cloudpickle is not installed for {python}; borrowed {sys.executable}'s")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(paths + [p for p in [env.get("PYTHONPATH")] if p])
    env["PROCPOOL_CPYTHON_SUBSTITUTE"] = "1"
    # A distribution's copy of the same minor version's tests fills modules a
    # trimmed build (pyenv's 3.11) lacks; the interpreter's own come first.
    extra = f"/usr/lib/python{info['short']}/test"
    if os.path.isdir(extra):
        env["PROCPOOL_CPYTHON_EXTRA_TESTS"] = extra
    env.pop("PYTHONSTARTUP", None)
    return env


# --------------------------------------------------------------- children


class Child:
    """One test process in a session of its own, reporting on a pipe."""

    def __init__(
        self, python: str, env: dict[str, str], workdir: str, spec: dict[str, Any], log: Any
    ) -> None:
        fd, spec_path = tempfile.mkstemp(suffix=".json", dir=workdir)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(spec, f)
        read_fd, write_fd = os.pipe()
        try:
            self.proc = subprocess.Popen(
                [python, "-X", "faulthandler", CHILD, spec_path, str(write_fd)],
                env=env,
                cwd=workdir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                pass_fds=(write_fd,),
                start_new_session=True,
            )
        finally:
            os.close(write_fd)
        os.set_blocking(read_fd, False)
        self._fd = read_fd
        self._buffer = b""
        self.pgid = self.proc.pid

    def events(self, wait: float) -> list[dict[str, Any]]:
        """Events that arrive within ``wait`` seconds (fewer if the child is gone)."""
        ready, _, _ = select.select([self._fd], [], [], wait)
        if ready:
            try:
                chunk = os.read(self._fd, 1 << 16)
            except BlockingIOError:
                chunk = b""
            self._buffer += chunk
        lines = self._buffer.split(b"\n")
        self._buffer = lines.pop()
        return [json.loads(line) for line in lines if line.strip()]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """Kill the child's whole process group (all of it started by this runner)."""
        _killpg(self.pgid, signal.SIGKILL)
        self.proc.wait()

    def reap_leftovers(self, grace: float = 3.0) -> bool:
        """After the child exits: wait a little for its descendants, then kill them. True if any."""
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            if not _group_alive(self.pgid):
                return False
            time.sleep(0.05)
        _killpg(self.pgid, signal.SIGKILL)
        return True

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ----------------------------------------------------------------- running


class Runner:
    def __init__(
        self,
        python: str,
        env: dict[str, str],
        workdir: str,
        *,
        test_timeout: float,
        deadline: float,
        verbose: bool,
    ) -> None:
        self.python = python
        self.env = env
        self.workdir = workdir
        self.test_timeout = test_timeout
        self.deadline = deadline
        self.verbose = verbose
        self.log_path = os.path.join(workdir, "child-output.log")
        self.log = open(self.log_path, "ab")  # noqa: SIM115 - closed in close()

    def close(self) -> None:
        self.log.close()

    def list_tests(self, start_methods: Sequence[str]) -> dict[str, Any]:
        child = Child(
            self.python,
            self.env,
            self.workdir,
            {"mode": "list", "start_methods": list(start_methods)},
            self.log,
        )
        try:
            listing = None
            end = min(self.deadline, time.monotonic() + 300)
            while time.monotonic() < end and listing is None:
                for event in child.events(0.2):
                    if event["event"] == "list":
                        listing = json.loads(event["detail"])
                    elif event["event"] == "fatal":
                        raise SystemExit(event["detail"])
                if listing is None and not child.alive():
                    break
            if listing is None:
                child.kill()
                raise SystemExit(
                    f"could not list the tests; see {self.log_path}:\n" + _tail(self.log_path, 40)
                )
            child.proc.wait(60)
            child.reap_leftovers()
            return listing
        finally:
            child.close()

    def run_group(self, ids: list[str], suite: str) -> list[CaseResult]:
        """Run the tests of one module; restart after a hang or a crash, and go on."""
        results: dict[str, CaseResult] = {}
        todo = list(ids)
        while todo:
            if time.monotonic() >= self.deadline:
                break
            self._run_child(todo, suite, results)
            todo = [t for t in todo if t not in results]
        return [results[t] for t in ids if t in results]

    def _run_child(self, ids: list[str], suite: str, results: dict[str, CaseResult]) -> None:
        spec = {"mode": "run", "tests": ids, "hang_after": max(1.0, self.test_timeout - 5)}
        log_start = self.log.tell()
        child = Child(self.python, self.env, self.workdir, spec, self.log)
        current: str | None = None
        fixture_errors: list[str] = []
        last = started = time.monotonic()
        done = False
        try:
            while not done:
                events = child.events(0.2)
                now = time.monotonic()
                for event in events:
                    last = now
                    kind, test_id = event["event"], event["id"]
                    if kind == "start":
                        current, started = test_id, now
                    elif kind == "stop":
                        if current in results:
                            results[current].seconds = now - started
                        current = None
                    elif kind == "done":
                        done = True
                    elif test_id in ids:
                        self._record(results, suite, test_id, kind, event["detail"])
                    elif kind in ("error", "fail"):  # setUpClass, tearDownModule, ...
                        fixture_errors.append(f"{test_id}:\n{event['detail']}")
                if done:
                    break
                if not child.alive() and not events:
                    self._on_child_death(
                        child, current, ids, suite, results, fixture_errors, log_start
                    )
                    return
                if now - last > self.test_timeout or now >= self.deadline:
                    self._on_hang(child, current, ids, suite, results, log_start, now - last)
                    return
            child.proc.wait(60)
            left = child.reap_leftovers()
        finally:
            child.close()
        self._settle_unreported(ids, suite, results, fixture_errors)
        self._attach_output(results, ids, log_start)
        if left:
            print(
                f"  note: processes outlived the test process for {ids[0].rsplit('.', 2)[0]}; "
                "killed",
                flush=True,
            )

    def _record(
        self, results: dict[str, CaseResult], suite: str, test_id: str, kind: str, detail: str
    ) -> None:
        old = results.get(test_id)
        if old is None:
            results[test_id] = CaseResult(test_id, suite, kind, detail)
            if self.verbose or kind in ("fail", "error"):
                print(f"  {kind.upper():5} {test_id}", flush=True)
        elif SEVERITY.index(kind) < SEVERITY.index(old.outcome):
            old.outcome, old.detail = kind, detail
            print(f"  {kind.upper():5} {test_id}", flush=True)
        elif kind in ("fail", "error"):
            old.detail += "\n" + detail

    def _on_hang(
        self,
        child: Child,
        current: str | None,
        ids: list[str],
        suite: str,
        results: dict[str, CaseResult],
        log_start: int,
        waited: float,
    ) -> None:
        time.sleep(0.5)  # let the child's faulthandler finish its dump
        child.kill()
        child.close()
        self.log.flush()
        why = (
            f"timed out after {waited:.0f} s (per-test limit {self.test_timeout:.0f} s)"
            if time.monotonic() < self.deadline
            else "stopped by the global --timeout"
        )
        detail = f"{why}; stacks:\n{_tail(self.log_path, 60, log_start)}"
        # A fixture (setUpClass, ...) that hangs is blamed on the next test.
        victim = current or next((t for t in ids if t not in results), None)
        if victim is not None:
            results[victim] = CaseResult(victim, suite, "error", detail, waited)
            print(f"  HANG  {victim}", flush=True)

    def _on_child_death(
        self,
        child: Child,
        current: str | None,
        ids: list[str],
        suite: str,
        results: dict[str, CaseResult],
        fixture_errors: list[str],
        log_start: int,
    ) -> None:
        code = child.proc.wait()
        child.reap_leftovers()
        child.close()
        self.log.flush()
        detail = (
            f"the test process died (exit status {code}) during this test; output:\n"
            f"{_tail(self.log_path, 40, log_start)}"
        )
        victim = current or next((t for t in ids if t not in results), None)
        if victim is not None:
            results[victim] = CaseResult(victim, suite, "error", detail)
            print(f"  DIED  {victim}", flush=True)

    def _attach_output(
        self, results: dict[str, CaseResult], ids: list[str], log_start: int
    ) -> None:
        """Give each failed test the tail of what it printed (workers included)."""
        self.log.flush()
        sections = _output_sections(self.log_path, log_start)
        for test_id in ids:
            result = results.get(test_id)
            output = sections.get(test_id, "").strip()
            if result and result.outcome in ("fail", "error") and output:
                tail = "\n".join(output.splitlines()[-OUTPUT_LINES:])
                result.detail += f"\n--- output of the test (last {OUTPUT_LINES} lines) ---\n{tail}"

    @staticmethod
    def _settle_unreported(
        ids: list[str], suite: str, results: dict[str, CaseResult], fixture_errors: list[str]
    ) -> None:
        why = "\n".join(fixture_errors) or "not reported by the test process"
        for test_id in ids:
            if test_id not in results:
                results[test_id] = CaseResult(test_id, suite, "error", f"did not run: {why}")
        for test_id in ids:  # a failing tearDownClass/Module fails the tests it belongs to
            for err in fixture_errors:
                cls = test_id.rsplit(".", 1)[0]
                if f"({cls})" in err.splitlines()[0] and results[test_id].outcome == "pass":
                    results[test_id].outcome, results[test_id].detail = "error", err


def _output_sections(path: str, start: int) -> dict[str, str]:
    """The log from ``start`` on, cut at the child's per-test markers."""
    with open(path, "rb") as f:
        f.seek(start)
        text = f.read().decode("utf-8", "replace")
    sections: dict[str, str] = {}
    parts = text.split("\n" + OUTPUT_MARKER)
    for part in parts[1:]:
        test_id, _, body = part.partition("\n")
        sections[test_id.strip()] = body
    return sections


def _tail(path: str, lines: int, start: int = 0) -> str:
    with open(path, "rb") as f:
        f.seek(start)
        text = f.read().decode("utf-8", "replace")
    return "\n".join(text.splitlines()[-lines:])


def run(
    python: str | None = None,
    *,
    suites: Iterable[str] = ("mp", "cf"),
    start_methods: Iterable[str] = START_METHODS,
    patterns: Iterable[str] = (),
    test_timeout: float = 120.0,
    timeout: float = 3600.0,
    verbose: bool = False,
    src: str = SRC,
) -> Report:
    """Run the selected stdlib tests against procpool and return what happened."""
    begin = time.monotonic()
    deadline = begin + timeout
    exe = find_python(python)
    suites, methods = set(suites), list(start_methods)
    regexes = [re.compile(p) for p in patterns]
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="procpool-cpython-") as workdir:
        env = child_environment(exe, workdir, notes, os.path.abspath(src))
        runner = Runner(
            exe, env, workdir, test_timeout=test_timeout, deadline=deadline, verbose=verbose
        )
        try:
            listing = runner.list_tests(methods)
            report = Report(exe, listing["version"].split()[0], methods, [], [], notes)
            groups = _plan(listing["tests"], suites, regexes, report)
            for module, suite, ids in groups:
                if time.monotonic() >= deadline:
                    report.aborted = f"global timeout of {timeout:.0f} s reached"
                    break
                t0 = time.monotonic()
                print(f"{module} ({len(ids)} tests)", flush=True)
                report.results += runner.run_group(ids, suite)
                print(f"  ... {time.monotonic() - t0:.1f} s", flush=True)
            ran = {r.id for r in report.results}
            for _, suite, ids in groups:
                for test_id in ids:
                    if test_id not in ran:
                        report.results.append(
                            CaseResult(test_id, suite, "error", "not run: global timeout")
                        )
                        report.aborted = f"global timeout of {timeout:.0f} s reached"
        finally:
            runner.close()
    notes.append(f"took {time.monotonic() - begin:.0f} s")
    return report


def _plan(
    tests: list[dict[str, Any]], suites: set[str], regexes: list[re.Pattern[str]], report: Report
) -> list[tuple[str, str, list[str]]]:
    """Group the selected tests by module; note the excluded and the missing."""
    groups: dict[str, tuple[str, list[str]]] = {}
    sources: set[str] = set()
    for test in tests:
        if test["suite"] not in suites:
            continue
        if "missing" in test:
            report.missing.append(f"{test['module']}: {test['missing']}")
            continue
        if regexes and not any(r.search(test["id"]) for r in regexes):
            continue
        sources.add(os.path.dirname(test["file"]))
        if test["note"]:
            report.notes.append(f"{test['id']}: {test['note']}")
        if test["private"]:
            attrs = ", ".join(test["private"])
            report.results.append(CaseResult(test["id"], test["suite"], "excluded", attrs))
            continue
        groups.setdefault(test["module"], (test["suite"], []))[1].append(test["id"])
    report.notes += [f"test modules from {d}" for d in sorted(sources)]
    return [(module, suite, ids) for module, (suite, ids) in groups.items()]


# ----------------------------------------------------------------- report


def summarize(report: Report, *, full: bool = False) -> str:
    out = [
        "",
        f"CPython pool suites against procpool: Python {report.version} ({report.python}), "
        f"start methods {', '.join(report.start_methods)}",
    ]
    for note in report.notes:
        out.append(f"  note: {note}")
    for suite, name in SUITE_NAMES.items():
        if any(r.suite == suite for r in report.results):
            out.append(f"{name:40} " + _counts(report, suite))
    out.append(f"{'TOTAL':40} " + _counts(report, None))
    for missing in report.missing:
        out.append(f"MISSING SUITE MODULE {missing}")
    if report.aborted:
        out.append(f"ABORTED: {report.aborted}")
    bad = [r for r in report.results if r.outcome in ("fail", "error")]
    if bad:
        out.append("\nFailures and errors:")
        for r in bad:
            out.append(f"  {r.outcome.upper():5} {r.id}")
            out += ["        " + line for line in _brief(r.detail, full)]
    skipped = [r for r in report.results if r.outcome == "skip"]
    if skipped:
        out.append("\nSkipped by the tests themselves:")
        out += [f"  {r.id}: {r.detail}" for r in skipped]
    excluded = [r for r in report.results if r.outcome == "excluded"]
    if excluded:
        out.append("\nExcluded, inspects private attributes:")
        out += [f"  {r.id}: {r.detail}" for r in excluded]
    return "\n".join(out)


def _counts(report: Report, suite: str | None) -> str:
    return ", ".join(
        f"{label} {report.count(outcome, suite)}"
        for label, outcome in (
            ("passed", "pass"),
            ("failed", "fail"),
            ("errors", "error"),
            ("skipped", "skip"),
            ("excluded", "excluded"),
        )
    )


def _brief(detail: str, full: bool) -> list[str]:
    lines = detail.rstrip().splitlines()
    if full or len(lines) <= 6:
        return lines
    # The exception line of a unittest traceback is the most telling one.
    last = [i for i, line in enumerate(lines) if re.match(r"^[\w.]+(Error|Exception|Exit)", line)]
    end = (last[-1] + 1) if last else len(lines)
    return lines[max(0, end - 4) : end]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", help="a version such as 3.13 or a path (default: this one)")
    parser.add_argument(
        "--suite",
        action="append",
        choices=sorted(SUITE_NAMES),
        help="mp (multiprocessing Pool) or cf (concurrent.futures); default both",
    )
    parser.add_argument(
        "--start-method",
        action="append",
        choices=START_METHODS,
        help="repeatable; default all three, as CPython runs them",
    )
    parser.add_argument(
        "-k",
        dest="patterns",
        action="append",
        default=[],
        help="only tests whose id matches this regular expression (repeatable)",
    )
    parser.add_argument(
        "--test-timeout",
        type=float,
        default=120.0,
        help="seconds one test may take before it counts as hung (default 120)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=3600.0,
        help="seconds the whole run may take (default 3600)",
    )
    parser.add_argument("--json", help="also write every result to this file")
    parser.add_argument(
        "--src",
        default=SRC,
        help="the directory procpool is imported from (default: this checkout's src)",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="print every test as it finishes and full tracebacks",
    )
    args = parser.parse_args(argv)
    report = run(
        args.python,
        suites=args.suite or SUITE_NAMES,
        start_methods=args.start_method or START_METHODS,
        patterns=args.patterns,
        test_timeout=args.test_timeout,
        timeout=args.timeout,
        verbose=args.verbose,
        src=args.src,
    )
    print(summarize(report, full=args.verbose))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(dataclasses.asdict(report), f, indent=1)
    if report.missing or report.aborted:
        return 2
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
