#!/usr/bin/env bash
# The tests: set up, then run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
source .venv/bin/activate
python -m pytest -q "$@"
