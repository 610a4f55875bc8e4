#!/usr/bin/env bash
# Set up from nothing (as scripts/setup_and_test.sh, in the same .venv) and run the benchmark with
# its plots. Arguments go to the benchmark, e.g.:
#   bash scripts/setup_and_bench.sh --device cpu --threads 2   # the CPU grid of benchmarks/results/cpu-amd-epyc-2t-20261124/
#   bash scripts/setup_and_bench.sh                            # on a GPU: Triton vs eager vs torch.compile
set -euo pipefail
cd "$(dirname "$0")/.."
SETUP_ONLY=1 bash scripts/setup_and_test.sh
VENV=${VENV:-.venv}
. "$VENV/bin/activate"
python -m pip install --quiet matplotlib  # the plots (benchmarks/report.py)
python -m benchmarks.bench "$@"
