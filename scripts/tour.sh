#!/usr/bin/env bash
# The README's five-minute tour, command for command (tests/test_tour.py checks that the README's
# tour block and this script agree): a NAS-Bench-201 search under a parameter budget (tabular:
# accuracy read from the table shipped in the package), the studies it wrote, a supernet search
# on MNIST-1D under a packed-size budget (a short supernet training: 20 epochs instead of 100), and the export and
# loading of its most accurate feasible model. About 2-3 minutes on 2 CPU cores.
#
# Usage: scripts/tour.sh [FOLDER]   (default: a new temporary folder). Everything is written
# there: runs/ (studies.db, the supernet), pareto.png, report.html, model/. Run it again in the
# same folder and the searches find their studies complete; the export replaces model/.
# Needs nasopt on PATH (source .venv/bin/activate after ./scripts/setup.sh).
set -euo pipefail
# these models are tiny: one torch thread trains them faster than several, far faster on a busy
# machine (results/distill.md)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
work=${1:-$(mktemp -d "${TMPDIR:-/tmp}/nasopt-tour.XXXXXX")}
mkdir -p "$work"
cd "$work"
echo "tour folder: $work"

run() {  # print the command, then run it
  echo
  echo "\$ $*"
  "$@"
}

# 1. NAS-Bench-201 in tabular mode, at most 800k parameters: seconds per search
run nasopt search --space nb201 --table --objectives accuracy,params --max-params 800k \
    --strategy random --trials 30 --study nb201-800k --quiet
run nasopt search --space nb201 --table --objectives accuracy,params --max-params 800k \
    --strategy tpe --trials 60 --study nb201-800k --quiet
run nasopt search --space nb201 --table --objectives accuracy,params --max-params 800k \
    --strategy evolution --trials 60 --study nb201-800k-evolution --quiet

# 2. Inspect the studies
run nasopt studies list
run nasopt studies pareto nb201-800k
run nasopt studies compare nb201-800k nb201-800k-evolution
run nasopt studies plot nb201-800k --kind pareto --out pareto.png --force
run nasopt studies report nb201-800k --out report.html --force

# 3. Architecture + compression search of a weight-sharing supernet, packed size <= 4 KB
run nasopt search --space conv1d --dataset mnist1d --strategy staged --max-size 4KB \
    --trials 40 --study mnist1d-4kb --set supernet.epochs=20 --set supernet.warmup_epochs=5 --quiet
run nasopt studies show mnist1d-4kb --pareto

# 4. Export the most accurate feasible trial, load it back as a PyTorch module, score it on the
#    test split (weights inherited from the supernet: `nasopt finetune` or `nasopt run` train them)
run nasopt export mnist1d-4kb --trial best --out model --force
run python -c "import nasopt; d = nasopt.load_dataset('mnist1d'); m = nasopt.load('model'); print('test accuracy', round((m(d.x_test).argmax(1) == d.y_test).float().mean().item(), 3))"

echo
echo "tour done: $work"
