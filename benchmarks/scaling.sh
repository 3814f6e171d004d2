#!/usr/bin/env bash
# Scaling runs for a machine with more cores than the 2 the targets are set on:
# the targets' workloads with 16, 8 and 4 workers, each run a report under OUT_DIR.
#
#   benchmarks/scaling.sh OUT_DIR [PYTHON]
#
# PYTHON (default python3) must import the peers and numpy; procpool is taken from
# this checkout's src/. After each run the reports so far are packed into
# OUT_DIR/scaling.tgz, so that a run stopped at a time limit still leaves them.
set -u
out=${1:?usage: benchmarks/scaling.sh OUT_DIR [PYTHON]}
py=${2:-python3}
root=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="$root/src${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$out/runs"
pack() { tar czf "$out/scaling.tgz" -C "$out" runs; }
peers=procpool,procpool.PPE,mp.Pool,cf.PPE,joblib,loky,mpire,pebble,multiprocess,dask
"$py" "$root/benchmarks/run.py" --python "$py" --workers 16 --only W2,W3,W4,W5,W6 \
    --contenders "$peers,serial,mp.Pipe" --out "$out/runs/w16"
pack
for n in 8 4; do
    "$py" "$root/benchmarks/run.py" --python "$py" --workers "$n" --only W2,W3,W4 \
        --contenders procpool,mp.Pool,cf.PPE,joblib,loky,serial --out "$out/runs/w$n"
    pack
done
