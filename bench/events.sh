#!/usr/bin/env bash
# Event streaming end to end, side by side: Quiver (POST /v1/events → SSE), NATS JetStream
# (file storage) and Redis Streams (AOF), same ~200-byte JSON payload, same publishers.
#
#   bash bench/events.sh [flags of the example, e.g. --runs 3 --duration 5 --rates 1000,10000,max]
#
# Installs nats-server and redis-server from Debian's packages if they are missing (apt-get;
# as root or with sudo), builds the release server and the `events_bench` example, then runs
# the example, which starts each server itself on a free port with a temporary data directory
# (never touching a system-wide instance), runs every rate per target, checks that every
# acknowledged event reached the subscriber exactly once, and prints markdown tables on stdout
# (progress on stderr): each run, then the medians over the runs. Targets: quiver-always,
# jetstream, jetstream-always (only when the installed nats-server knows `sync_interval`),
# redis-always, quiver-never, quiver-1s, redis-everysec by default; also quiver-*-ndjson (an
# NDJSON publish request per publisher) and quiver-*-mux (one NDJSON publish request shared by
# every publisher, pipelined, as a NATS client shares its connection), quiver-jetstream (Quiver
# on a JetStream log, one replica; -mux: with one shared NDJSON publish) and quiver-jetstream-2 (two replicas: publish to one, SSE
# from the other) (`--targets` to choose). Also the fan-out phase: 1,000
# SSE clients at 1,000 events/s (`--fanout-clients`, `--fanout-rate`; on the `always` targets, or
# those `--fanout-fsync always,never` names). Honours CARGO_TARGET_DIR.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

need=()
command -v nats-server >/dev/null 2>&1 || need+=(nats-server)
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
if [ "${#need[@]}" -gt 0 ]; then
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq "${need[@]}"
fi
# The packages may start system-wide services; the benchmark never uses them (own ports).

echo "nats-server: $(nats-server --version 2>&1 | head -1); redis-server: $(redis-server --version | head -1)" >&2
echo "machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), load: $(cut -d' ' -f1-3 /proc/loadavg)" >&2

cargo build --release -p quiver --bin quiver --example events_bench
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"

# 1,000 SSE clients need ~2,000 descriptors on one machine (the example raises its own soft
# limit to the hard limit; the servers it spawns inherit it).
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

"$TARGET_DIR/release/examples/events_bench" --server-bin "$TARGET_DIR/release/quiver" "$@"
