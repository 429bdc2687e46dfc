#!/usr/bin/env bash
# Single-threaded HNSW benchmark: quiver HnswIndex vs hnswlib vs faiss IndexHNSWFlat.
#
#   bash bench/hnsw.sh [flags for hnsw_peers.py, e.g. --dataset sift1m --engines quiver,hnswlib]
#
# Uses the virtualenv at $BENCH_VENV (default bench/.venv); creates it with numpy, hnswlib and
# faiss-cpu (PyPI) if it is missing or lacks them, builds the Rust
# example in release mode, generates the dataset once under bench/data/ (gitignored), then
# runs every engine in one process run. Honours CARGO_TARGET_DIR. A quiver engine may name its
# level-0 degree, e.g. `--engines quiver,hnswlib,quiver-int8,quiver-int8/m0=16` (default 2m).
#
# HNSW_BASELINE=<git revision> also builds that revision's hnsw_bench (in a worktree under
# the target dir) and passes it as --baseline-binary, for the engines quiver-baseline and
# quiver-int8-baseline: a code change against its parent, on the same graph file, e.g.
#   HNSW_BASELINE=HEAD~1 bash bench/hnsw.sh --dataset sift1m --graph-file \
#       --engines quiver,quiver-baseline,hnswlib
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

. bench/venv.sh
bench_venv "${BENCH_VENV:-bench/.venv}" "faiss, hnswlib, numpy" numpy hnswlib faiss-cpu

cargo build --release -p quiver-index --example hnsw_bench
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
BINARY="$TARGET_DIR/release/examples/hnsw_bench"

BASELINE_ARGS=()
if [ -n "${HNSW_BASELINE:-}" ]; then
    REV="$(git rev-parse --short "$HNSW_BASELINE")"
    TREE="$TARGET_DIR/hnsw-baseline-$REV"
    [ -d "$TREE" ] || git worktree add --detach "$TREE" "$REV"
    CARGO_TARGET_DIR="$TARGET_DIR/hnsw-baseline-target" \
        cargo build --release --manifest-path "$TREE/Cargo.toml" -p quiver-index --example hnsw_bench
    BASELINE_ARGS=(--baseline-binary "$TARGET_DIR/hnsw-baseline-target/release/examples/hnsw_bench")
fi

OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 "$PYTHON" bench/hnsw_peers.py --binary "$BINARY" \
    "${BASELINE_ARGS[@]}" "$@"
