#!/usr/bin/env bash
# Make sure the real datasets of the bundled examples are present: Fashion-MNIST (Debian package
# dataset-fashion-mnist) and WordNet 3.0 (Debian package wordnet-base). Installs what is missing
# when run as root with apt-get; otherwise says what to install, or which variable points elsewhere.
set -euo pipefail
fmnist="${EENET_FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}"
wordnet="${EENET_WORDNET_DIR:-/usr/share/wordnet}"
find_missing() {
    missing=()
    if [ ! -f "$fmnist/t10k-labels-idx1-ubyte.gz" ]; then
        missing+=(dataset-fashion-mnist)
    fi
    for part in noun verb adj adv; do
        if [ ! -f "$wordnet/data.$part" ]; then
            missing+=(wordnet-base)
            break
        fi
    done
}
find_missing
if [ "${#missing[@]}" = "0" ]; then
    exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
    echo "installing ${missing[*]} (Debian packages) ..." >&2
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    find_missing  # a variable pointing elsewhere is not filled by the package
fi
if [ "${#missing[@]}" != "0" ]; then
    for pkg in "${missing[@]}"; do
        case "$pkg" in
            dataset-fashion-mnist)
                echo "Fashion-MNIST not found in $fmnist: run 'sudo apt-get install" \
                     "dataset-fashion-mnist' or set EENET_FASHION_MNIST_DIR to a folder holding" \
                     "the four idx .gz files" >&2 ;;
            wordnet-base)
                echo "WordNet not found in $wordnet: run 'sudo apt-get install wordnet-base' or" \
                     "set EENET_WORDNET_DIR to a folder holding data.noun, data.verb, data.adj" \
                     "and data.adv" >&2 ;;
        esac
    done
    exit 1
fi
