"""The benchmark environment: benchmarks/.venv with procpool (editable) and every peer."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from bench.runner import BENCH_DIR

REPO_ROOT = BENCH_DIR.parent
VENV = BENCH_DIR / ".venv"
REQUIRED = (
    "numpy",
    "matplotlib",
    "psutil",
    "joblib",
    "loky",
    "mpire",
    "pebble",
    "multiprocess",
    "dask[distributed]",
)
OPTIONAL = ("ray",)  # large, and not built for every Python: measured where it installs


def venv_python() -> Path:
    return VENV / "bin" / "python"


def create(base_python: str | None) -> Path:
    """Create (or update) the environment and return its interpreter."""
    python = base_python or shutil.which("python3.11") or sys.executable
    if not venv_python().exists():
        _run([python, "-m", "venv", str(VENV)])
    pip = [str(venv_python()), "-m", "pip", "install", "--quiet"]
    _run([*pip, "-e", str(REPO_ROOT)])
    _run([*pip, *REQUIRED])
    for name in OPTIONAL:
        if subprocess.run([*pip, name]).returncode != 0:
            print(f"[setup] {name} did not install; it will be recorded as an error", flush=True)
    return venv_python()


def _run(command: list[str]) -> None:
    print("[setup] " + " ".join(command), flush=True)
    subprocess.run(command, check=True)
