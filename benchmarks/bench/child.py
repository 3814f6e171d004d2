"""The benchmark subprocess: runs one contender x workload case and records what happened.

    python -m bench.child SPEC_JSON RESULT_PATH   one case; JSON lines appended to RESULT_PATH
    python -m bench.child --describe              this interpreter and its libraries, as JSON
    python -m bench.child --calibrate MS          loop steps of bench.tasks.burn for MS ms

Every line written is one of {"partial": figures}, {"result": figures, "notes": [...]},
{"na": reason} or {"error": message, "traceback": text}. The process always ends with
``os._exit`` right after its last line: pools are not shut down (the parent kills the
process group), so a pool that hangs on shutdown cannot turn a result into a hang.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import traceback
from dataclasses import replace
from importlib import metadata
from pathlib import Path
from typing import Any, NoReturn, TextIO

from bench import contenders, workloads
from bench.sizes import MODES, Sizes

DISTRIBUTIONS = (
    "procpool",
    "cloudpickle",
    "joblib",
    "loky",
    "mpire",
    "pebble",
    "multiprocess",
    "dask",
    "distributed",
    "ray",
    "numpy",
    "matplotlib",
    "psutil",
)


class _Recorder:
    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, record: dict[str, Any]) -> None:
        self._stream.write(json.dumps(record, default=str) + "\n")
        self._stream.flush()

    def partial(self, figures: workloads.Figures) -> None:
        self.write({"partial": figures})

    def finish(self, figures: workloads.Figures, notes: list[str]) -> NoReturn:
        self.write({"result": figures, "notes": notes})
        self._exit(0)

    def fail(self, exc: BaseException) -> NoReturn:
        if isinstance(exc, contenders.Unsupported):
            self.write({"na": str(exc)})
            self._exit(0)
        message = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
        self.write({"error": message[:300], "traceback": traceback.format_exc()})
        self._exit(1)

    def _exit(self, code: int) -> NoReturn:
        self._stream.close()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _sizes(spec: dict[str, Any]) -> Sizes:
    """The mode's sizes, with the run's worker count (``--workers``) where it set one."""
    sizes = MODES[spec["mode"]]
    workers = spec.get("params", {}).get("workers")
    return replace(sizes, workers=workers) if workers else sizes


def run_case(spec: dict[str, Any], recorder: _Recorder) -> NoReturn:
    try:
        workload = workloads.WORKLOADS[spec["workload"]]
        contender = contenders.get(spec["contender"])
        ctx = workloads.Ctx(
            contender=contender,
            case=spec["case"],
            sizes=_sizes(spec),
            params=spec.get("params", {}),
            finish_cb=recorder.finish,
            fail_cb=recorder.fail,
            partial_cb=recorder.partial,
        )
        workload.runner(contender)(ctx)
        raise RuntimeError(f"harness bug: {workload.id} returned without calling finish()")
    except BaseException as exc:
        recorder.fail(exc)


def describe() -> dict[str, Any]:
    """This interpreter, the libraries it has, and whether procpool imports."""
    versions = {}
    for name in DISTRIBUTIONS:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    try:
        import procpool  # noqa: F401

        procpool_import = "ok"
    except Exception as exc:
        procpool_import = f"{type(exc).__name__}: {exc}"
    return {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "executable": sys.executable,
        "versions": versions,
        "procpool_import": procpool_import,
    }


def main(argv: list[str]) -> None:
    if argv[:1] == ["--describe"]:
        print(json.dumps(describe()))
    elif argv[:1] == ["--calibrate"]:
        print(workloads.burn_iterations(float(argv[1])))
    else:
        spec, path = json.loads(argv[0]), Path(argv[1])
        run_case(spec, _Recorder(path.open("a")))


if __name__ == "__main__":
    main(sys.argv[1:])
