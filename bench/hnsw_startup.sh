#!/usr/bin/env bash
# Start-up time of the real server holding an HNSW library: ingests N vectors (default 1M of
# bench/data/sift1m) through the NDJSON stream route of `quiver serve`, then times clean
# restarts (after SIGTERM's final snapshot) and crash restarts (SIGKILL with M vectors in the
# log after the snapshot) from the spawn to /health and to the first search.
#
#   bash bench/hnsw_startup.sh [--vectors 1000000] [--extra 10000] [--data-root DIR] [--keep] [other flags]
#
# Needs bench/data/sift1m/base.f32 and queries.f32 (synthetic, SIFT-like: generated once by
# bench/hnsw_peers.py, e.g. `bash bench/hnsw.sh --dataset sift1m`). Uses the virtualenv at
# $BENCH_VENV (default bench/.venv), creating it with numpy if it is missing or lacks it,
# builds the release server, then runs bench/hnsw_startup.py, which prints markdown tables on
# stdout (progress on stderr). Honours CARGO_TARGET_DIR.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

. bench/venv.sh
bench_venv "${BENCH_VENV:-bench/.venv}" numpy numpy

cargo build --release -p quiver --bin quiver
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"

"$PYTHON" bench/hnsw_startup.py --server-bin "$TARGET_DIR/release/quiver" "$@"
