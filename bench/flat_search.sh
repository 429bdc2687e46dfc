#!/usr/bin/env bash
# Single-threaded exact search benchmark: quiver-index FlatIndex vs faiss IndexFlatIP.
#
#   bash bench/flat_search.sh [extra flags for flat_search.py, e.g. --rows 20000]
#
# Installs faiss-cpu and numpy (PyPI) into bench/.venv if the current python lacks them,
# builds the Rust example in release mode, then runs bench/flat_search.py. Honours
# CARGO_TARGET_DIR. Data files go to bench/data/ (gitignored).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

PYTHON="${PYTHON:-python3}"
if ! "$PYTHON" -c 'import faiss, numpy' 2>/dev/null; then
    if [ ! -x bench/.venv/bin/python ]; then
        "$PYTHON" -m venv bench/.venv
    fi
    PYTHON=bench/.venv/bin/python
    if ! "$PYTHON" -c 'import faiss, numpy' 2>/dev/null; then
        "$PYTHON" -m pip install --quiet faiss-cpu numpy
    fi
fi

cargo build --release -p quiver-index --example flat_bench
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
BINARY="$TARGET_DIR/release/examples/flat_bench"

# One thread for faiss's OpenMP as well as via omp_set_num_threads in the script.
OMP_NUM_THREADS=1 "$PYTHON" bench/flat_search.py --binary "$BINARY" "$@"
