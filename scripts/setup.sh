#!/usr/bin/env bash
# Set-up shared by demo.sh and test.sh: a virtual environment in .venv with nasopt installed.
# torch==2.13.0 (CPU) goes in first, so that no dependency pulls a multi-GB CUDA build. On Linux,
# PyPI's torch wheel is the CUDA build: NASOPT_TORCH_INDEX=https://download.pytorch.org/whl/cpu
# takes torch from PyTorch's CPU index instead (unset, pip's own configuration decides: the
# development machines resolve it to a CPU wheel on disk).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
# shellcheck disable=SC1091
source .venv/bin/activate
quiet_pip() {  # pip, without this machine's warnings about absent local index folders
  python -m pip install -q "$@" 2> >(grep -v "is ignored: it is neither" >&2)
}
if ! python -c "import torch" 2>/dev/null; then
  quiet_pip "torch==2.13.0" ${NASOPT_TORCH_INDEX:+--index-url "$NASOPT_TORCH_INDEX"}
fi
quiet_pip -e ".[dev]" -e ./benchmarks  # benchmarks/: the `nasopt bench` harness, a package of its own
