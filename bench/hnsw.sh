#!/usr/bin/env bash
# Single-threaded HNSW benchmark: quiver HnswIndex vs hnswlib vs faiss IndexHNSWFlat.
#
#   bash bench/hnsw.sh [flags for hnsw_peers.py, e.g. --dataset sift1m --engines quiver,hnswlib]
#
# Uses the virtualenv at $BENCH_VENV (default bench/.venv); creates it with numpy, hnswlib and
# faiss-cpu (PyPI) if it is missing or lacks them, builds the Rust
# example in release mode, generates the dataset once under bench/data/ (gitignored), then
# runs every engine in one process run. Honours CARGO_TARGET_DIR.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

. bench/venv.sh
bench_venv "${BENCH_VENV:-bench/.venv}" "faiss, hnswlib, numpy" numpy hnswlib faiss-cpu

cargo build --release -p quiver-index --example hnsw_bench
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
BINARY="$TARGET_DIR/release/examples/hnsw_bench"

OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 "$PYTHON" bench/hnsw_peers.py --binary "$BINARY" "$@"
