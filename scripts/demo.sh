#!/usr/bin/env bash
# The demo: set up, then search the conv1d space on MNIST-1D (accuracy vs model size) with
# NSGA-II, recorded in an SQLite study under results/demo/, and print the Pareto front.
# Re-running continues the same study (and reuses the trained supernet).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
source .venv/bin/activate
nasopt search --space conv1d --dataset mnist1d --strategy nsga2 --trials 60 \
  --run-dir results/demo --storage sqlite:///results/demo/study.db "$@"
