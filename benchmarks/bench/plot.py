"""The throughput plot: tasks/s against task duration, one line per contender.

    python -m bench.plot RESULTS_JSON OUT_PNG

It runs in the benchmark environment (which has matplotlib), not in the harness's parent.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from bench.sizes import DURATIONS

STYLES: dict[str, dict[str, Any]] = {
    "procpool": {"linewidth": 3, "color": "black", "marker": "o"},
    "serial": {"linestyle": "--", "color": "grey", "marker": "."},
}
# No grey or black among the peers: those two are procpool's and the serial reference's.
COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")
COLORS += ("tab:pink", "tab:olive", "tab:cyan", "gold", "navy", "lime")
MARKERS = ("s", "^", "v", "D", "P", "X", "<", ">")


def style(name: str, number: int) -> dict[str, Any]:
    """A look for each line that no other line shares."""
    if name in STYLES:
        return STYLES[name]
    return {"color": COLORS[number % len(COLORS)], "marker": MARKERS[number % len(MARKERS)]}


def series(records: list[dict[str, Any]]) -> dict[str, list[tuple[float, float]]]:
    """(duration s, tasks/s) points of each contender's successful throughput cases."""
    points: dict[str, list[tuple[float, float]]] = {}
    for r in records:
        if r["workload"] == "TP" and r["status"] == "ok":
            point = (DURATIONS[r["case"]], r["figures"]["tasks_per_s"])
            points.setdefault(r["contender"], []).append(point)
    return {name: sorted(p) for name, p in points.items()}


def draw(results: dict[str, Any], out: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("matplotlib is not installed: no plot") from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 6), dpi=110)
    for number, (name, points) in enumerate(series(results["records"]).items()):
        xs, ys = zip(*points)
        ax.plot([x * 1e6 for x in xs], ys, label=name, **style(name, number))
    durations = sorted(DURATIONS.values())
    ideal = [results["workers"] / d for d in durations]
    ax.plot(
        [d * 1e6 for d in durations], ideal, "k:", label=f"ideal ({results['workers']} workers)"
    )
    ax.set(xscale="log", yscale="log", xlabel="task duration (us)", ylabel="tasks per second")
    ax.set_title(f"Tasks per second against task duration, default settings\n{results['title']}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out)


if __name__ == "__main__":
    draw(json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2]))
