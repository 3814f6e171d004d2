#!/usr/bin/env python3
"""procpool's benchmarks: procpool and its peers, one fresh process per measurement.

    python benchmarks/run.py --setup     create benchmarks/.venv with the peers, then run all
    python benchmarks/run.py [--quick] [--only W2,W5] [--contenders procpool,joblib]
    python benchmarks/run.py --smoke     seconds; procpool + stdlib; exits 1 if anything breaks

Results go to benchmarks/results/<date>-<host>.md (.json, -throughput.png) and latest.*;
docs/benchmarks.md explains the workloads and how to read the ratios.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
