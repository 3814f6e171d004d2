"""The markdown report: the machine, then one table per workload with ratios to procpool."""

from __future__ import annotations

import os
import platform
import socket
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.contenders import BASELINE
from bench.runner import Record
from bench.workloads import Column, Workload


def machine() -> dict[str, Any]:
    """CPU model, cores, memory and OS of this machine."""
    return {
        "host": socket.gethostname(),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": round(_meminfo_kib("MemTotal") / 1024**2, 1),
        "os": platform.platform(),
        "load": _load_average(),
    }


def _load_average() -> str:
    """Other work on the machine skews every figure; the report says how busy it was."""
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _meminfo_kib(field: str) -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def git_revision(repo: Path) -> str:
    try:
        done = subprocess.run(
            ["git", "-C", str(repo), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return done.stdout.strip() or "no commit yet"


def render(
    *,
    title: str,
    header: dict[str, Any],
    workloads: Sequence[Workload],
    contenders: Sequence[str],
    records: Sequence[Record],
) -> str:
    """The whole report as markdown."""
    parts = [f"# {title}", "", *_header_lines(header), "", *_how_to_read()]
    index = {(r.contender, r.workload, r.case): r for r in records}
    parts += ["", *summary_table(workloads, contenders, index)]
    for workload in workloads:
        parts += ["", *workload_table(workload, contenders, index)]
    return "\n".join(parts) + "\n"


def _header_lines(header: dict[str, Any]) -> list[str]:
    m, env = header["machine"], header["environment"]
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
    return [
        f"- Machine: {m['cpu']}, {m['cores']} logical cores, {m['memory_gib']} GiB, {m['os']}; "
        f"load average at the end (1/5/15 min): {m['load']}",
        f"- Python: {env['implementation']} {env['python']} (`{env['executable']}`)",
        f"- Versions: {versions}",
        f"- procpool: revision {header['revision']}; import: {env['procpool_import']}",
        f"- Mode: {header['mode']}; command: `{header['command']}`; total {header['wall_s']:.0f} s",
        f"- Workers: {header.get('workers', 2)} per pool (W1: 5)",
        *([f"- **Stopped by a signal {header['stopped']}**"] if header.get("stopped") else []),
    ]


def _how_to_read() -> list[str]:
    return [
        "Each figure is followed by its ratio to procpool's figure in the same run "
        "(figure / procpool). Arrows say which way is better: ↑ higher, ↓ lower. "
        "`hang` = still running at the time limit (killed); `error` = crashed or raised; "
        "`n/a` = the library has no such API; `-` = not run. "
        "`*` = see the row's notes (e.g. a slow library timed on fewer tasks).",
    ]


def summary_table(
    workloads: Sequence[Workload], contenders: Sequence[str], index: dict[Any, Record]
) -> list[str]:
    """One headline figure per workload and contender, each with its ratio to procpool."""
    shown = [(w, w.columns[w.headline]) for w in workloads if w.headline is not None]
    header = ["contender", *(f"{w.id} {c.label}{_arrow(c)}" for w, c in shown)]
    lines = ["## Summary", "", "Each workload's headline figure (ratio to procpool).", ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in contenders:
        cells = [_summary_cell(w, c, name, index) for w, c in shown]
        if any(cell != "-" for cell in cells):
            lines.append("| " + " | ".join([name, *cells]) + " |")
    return lines


def _summary_cell(workload: Workload, column: Column, name: str, index: dict[Any, Record]) -> str:
    record = index.get((name, workload.id, column.case))
    value = _value(column, record)
    ratio = _ratio(column, record, index.get((BASELINE, workload.id, column.case)))
    return value if ratio == "-" else f"{value} ({ratio})"


def workload_table(
    workload: Workload, contenders: Sequence[str], index: dict[Any, Record]
) -> list[str]:
    """One workload's section: title, what it measures, the table and the row notes."""
    header = ["contender"]
    for column in workload.columns:
        header.append(column.label + _arrow(column))
        if column.ratio:
            header.append("ratio")
    lines = [f"## {workload.id}: {workload.title}", "", workload.measures, ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    notes = []
    for name in contenders:
        row_records = [index.get((name, workload.id, c.case)) for c in workload.columns]
        if not any(row_records):
            continue
        cells, seen = [name], set()
        for column, record in zip(workload.columns, row_records):
            baseline = index.get((BASELINE, workload.id, column.case))
            cells += _cells(column, record, baseline, first=column.case not in seen)
            seen.add(column.case)
        lines.append("| " + " | ".join(cells) + " |")
        notes += _row_notes(name, workload, index)
    return lines + (["", *notes] if notes else [])


def _arrow(column: Column) -> str:
    return {True: " ↑", False: " ↓", None: ""}[column.higher_is_better]


def _cells(
    column: Column, record: Record | None, baseline: Record | None, *, first: bool
) -> list[str]:
    cells = [_value(column, record, first=first)]
    if column.ratio:
        cells.append(_ratio(column, record, baseline))
    return cells


def _value(column: Column, record: Record | None, *, first: bool = True) -> str:
    """A cell. The status of a failed case, and the `*` of a caveat, go in the first of the
    case's columns only."""
    if record is None:
        return "-"
    figure = record.figures.get(column.key)
    if record.status == "ok":
        return _format(column, figure) + ("*" if first and _has_caveat(record) else "")
    partial = f"≥{_format(column, figure)}" if figure is not None else ""
    if not first:
        return partial or "-"
    status = f"hang >{record.limit_s:.0f} s" if record.status == "hang" else record.status
    return f"{status} ({partial})" if partial else status


def _has_caveat(record: Record) -> bool:
    return any(note.startswith("timed on") for note in record.notes)


def _format(column: Column, figure: Any) -> str:
    if figure is None:
        return "-"
    if isinstance(figure, str):
        return figure
    return column.fmt.format(figure)


def _ratio(column: Column, record: Record | None, baseline: Record | None) -> str:
    if record is None or baseline is None or record.status != "ok" or baseline.status != "ok":
        return "-"
    figure, base = record.figures.get(column.key), baseline.figures.get(column.key)
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (figure, base))
    if not numeric or not base:
        return "-"
    return _format_ratio(figure / base)


def _format_ratio(ratio: float) -> str:
    if ratio >= 10:
        return f"{ratio:,.0f}x"
    if ratio >= 0.1:
        return f"{ratio:.2f}x"
    return f"{ratio:.2g}x" if ratio >= 0.001 else "<0.001x"


def _row_notes(name: str, workload: Workload, index: dict[Any, Record]) -> list[str]:
    notes = []
    for (contender, workload_id, case), record in sorted(index.items()):
        if contender != name or workload_id != workload.id:
            continue
        where = "" if case == "default" else f" [{case}]"
        if record.status in ("error", "n/a") and record.error:
            notes.append(f"- {name}{where}: {record.status}: {record.error}")
        for note in record.notes:
            if not note.startswith("median of"):
                notes.append(f"- {name}{where}: {note}")
    return notes
