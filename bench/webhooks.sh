#!/usr/bin/env bash
# Webhook delivery benchmark: deliveries/s to a local receiver and the added latency
# commit → delivered (p50/p99), against the release server.
#
#   bash bench/webhooks.sh [--endpoints 1,4] [--latency-events 1000] [--events 20000]
#
# Builds the release server and the `webhook_bench` example, which starts `quiver serve
# --fsync always --webhooks-allow-private` on a fresh data directory per row and a local
# axum receiver, registers the endpoints, measures, checks every endpoint got every event
# once and in order, and prints a markdown table. Honours CARGO_TARGET_DIR.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

cargo build --release -p quiver --bin quiver --example webhook_bench
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"

"$TARGET_DIR/release/examples/webhook_bench" --server-bin "$TARGET_DIR/release/quiver" "$@"
