#!/usr/bin/env bash
# Durable NDJSON ingest over HTTP, side by side with chromadb: vectors/s and peak RSS.
#
#   bash bench/ndjson_vs_chroma.sh [--total 100000] [--batch 1000] [other flags of the script]
#
# Installs chromadb and numpy (PyPI) into bench/.venv (gitignored) if the current python lacks
# them, builds the release server, then runs bench/ndjson_vs_chroma.py, which streams the
# documents to a fresh `quiver serve --fsync always` as NDJSON (embedding_b64, then JSON
# floats), loads the same vectors into a chromadb PersistentClient in a subprocess of its own,
# checks both, and prints a markdown table on stdout (progress on stderr). chromadb never
# embeds anything: vectors are always passed explicitly and the collection has
# embedding_function=None. Telemetry is off. Honours CARGO_TARGET_DIR and PYTHON.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

export ANONYMIZED_TELEMETRY=False

PYTHON="${PYTHON:-python3}"
if ! "$PYTHON" -c 'import chromadb, numpy' 2>/dev/null; then
    if [ ! -x bench/.venv/bin/python ]; then
        "$PYTHON" -m venv bench/.venv
    fi
    PYTHON=bench/.venv/bin/python
    if ! "$PYTHON" -c 'import chromadb, numpy' 2>/dev/null; then
        "$PYTHON" -m pip install --quiet chromadb numpy
    fi
fi

cargo build --release -p quiver --bin quiver
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"

"$PYTHON" bench/ndjson_vs_chroma.py --server-bin "$TARGET_DIR/release/quiver" "$@"
