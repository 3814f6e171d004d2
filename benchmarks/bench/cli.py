"""The command line of ``benchmarks/run.py``."""

from __future__ import annotations

import argparse
import datetime
import json
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench import contenders, envsetup, report, runner
from bench.runner import BENCH_DIR, Record, Spec
from bench.sizes import MODES, Sizes
from bench.workloads import Workload, selected

RESULTS_DIR = BENCH_DIR / "results"
REFERENCES = ("serial", "mp.Pipe")


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/run.py",
        description="Measure procpool against its peers, one fresh process per measurement.",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="smaller sizes (a few minutes)")
    mode.add_argument(
        "--smoke",
        action="store_true",
        help="seconds-long run of procpool and the stdlib with tiny sizes (CI); exits 1 if any "
        "measurement errs or hangs",
    )
    parser.add_argument("--setup", action="store_true", help="create/update benchmarks/.venv first")
    parser.add_argument(
        "--setup-only", action="store_true", help="create/update benchmarks/.venv, run nothing"
    )
    parser.add_argument("--setup-python", help="base interpreter of the venv (default: python3.11)")
    parser.add_argument("--only", help="comma-separated workloads, e.g. W2,W5 (default: all)")
    parser.add_argument(
        "--contenders", help="comma-separated contenders (default: all; see --list)"
    )
    parser.add_argument(
        "--python", help="interpreter for the measurements (default: benchmarks/.venv)"
    )
    parser.add_argument(
        "--workers",
        type=int,
        help="workers of every pool but W1's five (default: 2); for scaling runs on bigger "
        "machines",
    )
    parser.add_argument("--out", type=Path, help="results folder (default: benchmarks/results)")
    parser.add_argument(
        "--render", type=Path, metavar="JSON", help="rewrite the .md of an earlier run's .json"
    )
    parser.add_argument(
        "--list", action="store_true", help="list workloads and contenders and exit"
    )
    return parser.parse_args(argv)


def _split(text: str | None) -> list[str] | None:
    return [part.strip() for part in text.split(",") if part.strip()] if text else None


def choose_python(args: argparse.Namespace) -> str:
    if args.python:
        return str(args.python)
    if args.setup or args.setup_only:
        return str(envsetup.create(args.setup_python))
    if not args.smoke and envsetup.venv_python().exists():
        return str(envsetup.venv_python())
    if not args.smoke:
        print("[bench] no benchmarks/.venv (run with --setup): missing peers will show as errors")
    return sys.executable


def choose_contenders(args: argparse.Namespace) -> list[str]:
    names = _split(args.contenders)
    if names is None:
        pools = contenders.SMOKE_CONTENDERS if args.smoke else tuple(contenders.CONTENDERS)
        names = list(dict.fromkeys([*pools, *REFERENCES]))
    unknown = set(names) - set(contenders.CONTENDERS)
    if unknown:
        raise SystemExit(
            f"unknown contenders {sorted(unknown)}; choose from {list(contenders.CONTENDERS)}"
        )
    return names


def plan(
    workloads: list[Workload], names: list[str], sizes: Sizes
) -> list[tuple[Workload, str, str]]:
    """Every (workload, contender, case) to run, in report order."""
    return [
        (w, name, case)
        for w in workloads
        for name in names
        for case in w.cases_for(contenders.get(name), sizes)
    ]


def measure_all(
    python: str, mode: str, todo: list[tuple[Workload, str, str]], params: dict[str, Any]
) -> tuple[list[Record], int | None]:
    """Measure every case; also the exit status of a signal that stopped the run, if one did.

    A run stopped by SIGTERM or SIGINT (a time limit, Ctrl-C) keeps what it measured,
    to be written out: a 16-minute run stopped at minute 15 loses one case, not all.
    """
    sizes = MODES[mode]
    records: list[Record] = []
    try:
        for number, (workload, name, case) in enumerate(todo, 1):
            spec = Spec(contender=name, workload=workload.id, case=case, mode=mode, params=params)
            limit = workload.limit_s * sizes.limit_scale
            runs = [runner.run_case(python, spec, limit) for _ in range(workload.repeats(sizes))]
            record = runner.combine(runs)
            records.append(record)
            detail = record.error[:90] if record.status != "ok" else ""
            print(
                f"[{number:3}/{len(todo)}] {workload.id} {case:10} {name:14} {record.status:5} "
                f"{record.wall_s:6.1f} s {detail}",
                flush=True,
            )
    except (SystemExit, KeyboardInterrupt) as stop:
        status = stop.code if isinstance(stop, SystemExit) else 128 + signal.SIGINT
        print(f"[bench] stopped after {len(records)} of {len(todo)} cases", flush=True)
        return records, status if isinstance(status, int) else 1
    return records, None


def write_outputs(
    out: Path, stem: str, results: dict[str, Any], markdown: str, python: str
) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    md, raw, png = out / f"{stem}.md", out / f"{stem}.json", out / f"{stem}-throughput.png"
    md.write_text(markdown)
    raw.write_text(json.dumps(results, indent=1, default=str) + "\n")
    written = [md, raw]
    if any(r["workload"] == "TP" for r in results["records"]):
        plotted = subprocess.run(
            [python, "-m", "bench.plot", str(raw), str(png)], env=runner.child_env(), cwd=BENCH_DIR
        )
        if plotted.returncode == 0:  # otherwise bench.plot has said why
            written.append(png)
    return written


def publish_latest(written: list[Path], stem: str) -> None:
    for path in written:
        shutil.copyfile(path, path.with_name(path.name.replace(stem, "latest")))


def _stop_cleanly() -> None:
    """Turn SIGTERM and SIGINT (ignored in a background job) into exceptions, so the running
    case's process group is still killed on the way out."""

    def terminate(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def main(argv: list[str]) -> int:
    args = parse(argv)
    _stop_cleanly()
    if args.list:
        print("workloads:", ", ".join(w.id for w in selected(None)))
        print("contenders:", ", ".join(contenders.CONTENDERS))
        return 0
    if args.render:
        return rerender(args.render)
    python = choose_python(args)
    if args.setup_only:
        return 0
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    sizes, workloads, names = MODES[mode], selected(_split(args.only)), choose_contenders(args)
    if args.workers is not None:
        if args.workers < 1:
            raise SystemExit(f"--workers must be at least 1, not {args.workers}")
        sizes = replace(sizes, workers=args.workers)
    started = time.monotonic()
    runner.compile_procpool(python)
    environment = json.loads(runner.capture(python, "--describe"))
    print(f"[bench] {mode} run with {python} (procpool import: {environment['procpool_import']})")
    params = {
        "burn_iterations": int(runner.capture(python, "--calibrate", str(sizes.cpu_task_ms))),
        "workers": sizes.workers,
    }
    todo = plan(workloads, names, sizes)
    records, stopped = measure_all(python, mode, todo, params)
    header = {
        "machine": report.machine(),
        "environment": environment,
        "revision": report.git_revision(BENCH_DIR.parent),
        "mode": mode,
        "command": " ".join(["python benchmarks/run.py", shlex.join(argv)]).strip(),
        "wall_s": time.monotonic() - started,
        "workers": sizes.workers,
        "stopped": None if stopped is None else f"after {len(records)} of {len(todo)} cases",
    }
    today = datetime.date.today().isoformat()
    title = f"procpool benchmarks, {today}, {header['machine']['host']}"
    markdown = report.render(
        title=title, header=header, workloads=workloads, contenders=names, records=records
    )
    results = {
        **header,
        "title": title,
        "params": params,
        "records": [r.to_json() for r in records],
    }
    out = args.out or (
        Path(tempfile.mkdtemp(prefix="procpool-smoke-")) if args.smoke else RESULTS_DIR
    )
    host = re.sub(r"[^A-Za-z0-9.-]+", "-", header["machine"]["host"])
    complete = (
        mode == "full"
        and not args.only
        and not args.contenders
        and args.workers is None
        and stopped is None
    )
    suffix = "" if complete else f"-{mode}" if mode != "full" else "-partial"
    if args.workers is not None:
        suffix += f"-{args.workers}w"
    if stopped is not None:
        suffix += "-stopped"
    stem = f"{today}-{host}{suffix}"
    written = write_outputs(out, stem, results, markdown, python)
    if complete:
        publish_latest(written, stem)
    print(f"[bench] wrote {', '.join(str(p) for p in written)} in {header['wall_s']:.0f} s")
    return stopped if stopped is not None else _exit_code(args.smoke, records)


def rerender(raw: Path) -> int:
    """Rebuild a report from its raw records (after a change to the report's layout)."""
    results = json.loads(raw.read_text())
    records = [Record(**r) for r in results["records"]]
    ran = {r.workload for r in records}
    workloads = [w for w in selected(None) if w.id in ran]
    names = [n for n in contenders.CONTENDERS if n in {r.contender for r in records}]
    markdown = report.render(
        title=results["title"],
        header=results,
        workloads=workloads,
        contenders=names,
        records=records,
    )
    raw.with_suffix(".md").write_text(markdown)
    print(f"[bench] wrote {raw.with_suffix('.md')}")
    return 0


def _exit_code(smoke: bool, records: list[Record]) -> int:
    """A smoke run fails on any error or hang, so CI notices a broken harness (or pool)."""
    bad = [r for r in records if r.status in ("error", "hang")]
    if smoke and bad:
        for r in bad:
            print(f"[smoke] FAILED {r.workload}/{r.case} {r.contender}: {r.status} {r.error}")
        return 1
    return 0
