#!/usr/bin/env bash
# The demo: set up, then the whole pipeline on MNIST-1D (configs/mnist1d.toml): train the conv1d
# supernet, search it (accuracy vs packed size, <= 4 KB), pick, distill, fine-tune with the
# compression policy (QAT), export (verified) and report. Study and supernet go to
# results/mnist1d_run/, the model and its card (metrics.json, REPORT.md) to results/mnist1d_model/.
# Re-running reuses the trained supernet and the finished trials, and replaces the model folder
# (--force: `nasopt run` refuses an export folder that holds files without it).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
source .venv/bin/activate
nasopt run configs/mnist1d.toml --force "$@"
