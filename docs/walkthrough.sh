#!/usr/bin/env bash
# The command-line walk-through of the README, on the bundled 4-exit network.
# Writes into a scratch folder (default: a fresh temporary one) and prints every
# command before its output, so the README's listing can be regenerated:
#
#     bash docs/walkthrough.sh > docs/walkthrough.txt
#
# Latencies are measured on the machine that runs it, so the budget is set from
# the measured costs: 45% of the last exit's (BUDGET overrides it).
set -euo pipefail
EENET=${EENET:-eenet}
WORK=${1:-$(mktemp -d)}
MODEL=eenet.examples.models:fashion_mnist_cnn4

run() {
    echo "\$ $*"
    "$@" 2>&1 | tr '\r' '\n' | grep -v -E 'it/s|^ *$' || true
    echo
}

cd "$WORK"
mkdir -p cache
run $EENET -q cache --model $MODEL --data fashion-mnist:val --out cache/val.h5
run $EENET -q cache --model $MODEL --data fashion-mnist:test --out cache/test.h5 --costs-from cache/val.h5
run $EENET info cache/val.h5
BUDGET=${BUDGET:-$(python3 -c 'import json, sys; c = json.load(sys.stdin)["costs"]; print(f"{0.45 * c[-1]:.3g}")' \
    < <($EENET info --json cache/val.h5))}
run $EENET fit cache/val.h5 --method auto --budget "$BUDGET" --out policy.pt
run $EENET evaluate policy.pt cache/test.h5
run $EENET -q sweep cache/val.h5 cache/test.h5 --methods auto,eenet,maxprob,static,oracle \
    --n-budgets 6 --out sweep.csv --plot sweep.png
run $EENET -q run policy.pt --model $MODEL --data fashion-mnist:test --limit 5 --out preds.csv
run cat preds.csv
run $EENET -q bench policy.pt --model $MODEL --data fashion-mnist:test --limit 2000
