#!/usr/bin/env bash
# Make sure the real Fashion-MNIST files (Debian package dataset-fashion-mnist) are present.
set -euo pipefail
dir="${EENET_FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}"
if [ -f "$dir/t10k-labels-idx1-ubyte.gz" ]; then
    exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
    echo "installing dataset-fashion-mnist (Debian package) ..." >&2
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
else
    echo "Fashion-MNIST not found in $dir: run 'sudo apt-get install dataset-fashion-mnist'" \
         "or set EENET_FASHION_MNIST_DIR to a folder holding the four idx .gz files" >&2
    exit 1
fi
