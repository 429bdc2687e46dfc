#!/usr/bin/env bash
# Durable ingest benchmark: vectors/s and per-batch acknowledgement latency of `quiver serve`
# with `--fsync always` (and `never` for comparison), vectors posted to the batch route by
# concurrent clients as JSON floats and as embedding_b64.
#
#   bash bench/ingest.sh [flags for the example, e.g. --clients 8 --batch 500 --total 50000]
#
# Builds the release server and the `ingest_bench` example, then runs the example, which
# starts a fresh server on a temporary data directory per configuration and prints a
# markdown table on stdout (progress on stderr). Flags: --clients, --batch, --total,
# --encoding json|b64|both, --fsync-policies always,never, --server-bin, --data-root,
# --no-perf (see `--help`). Fsyncs are counted with `perf stat` when it can attach.
# Honours CARGO_TARGET_DIR.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

cargo build --release -p quiver --bin quiver --example ingest_bench
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"

"$TARGET_DIR/release/examples/ingest_bench" --server-bin "$TARGET_DIR/release/quiver" "$@"
