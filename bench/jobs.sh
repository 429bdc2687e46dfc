#!/usr/bin/env bash
# Job throughput: a queue of 10,000 small jobs against the release binary.
#
#   bash bench/jobs.sh [--jobs 10000] [--clients 8] [--workers 2] [--kind batch_delete] [--fsync always]
#
# Starts `quiver serve` (release build, fresh temp data dir, port 0), creates a tiny library
# (10 documents), then submits N tiny jobs from C concurrent keep-alive HTTP clients and waits
# until every one has completed. Each `batch_delete` job deletes one id that does not exist
# (one engine call; every job still writes job.queued, job.started, job.completed to the log).
# Reports: submissions/s (each 202 waits for its job.queued event to be durable), jobs
# executed/s end to end (first submit → last completion), the drain rate after the last
# submit, the log records written per job, and the server's peak RSS. Standard library only.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
JOBS=10000; CLIENTS=8; WORKERS=2; KIND=batch_delete; FSYNC=always; MODE=drain
while [ $# -gt 0 ]; do
    case "$1" in
        --jobs) JOBS="$2"; shift 2;;
        --clients) CLIENTS="$2"; shift 2;;
        --workers) WORKERS="$2"; shift 2;;
        --kind) KIND="$2"; shift 2;;
        --fsync) FSYNC="$2"; shift 2;;
        --mode) MODE="$2"; shift 2;;
        *) echo "unknown flag $1" >&2; exit 2;;
    esac
done
cargo build --release -p quiver >&2
BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release/quiver"
DATA="$(mktemp -d)"
OUT="$(mktemp)"
"$BIN" serve --addr 127.0.0.1:0 --data-dir "$DATA" --fsync "$FSYNC" \
    --job-workers "$WORKERS" --job-queue-limit $((JOBS + 10)) >"$OUT" 2>"$DATA.err" &
PID=$!
trap 'kill $PID 2>/dev/null; wait $PID 2>/dev/null; rm -rf "$DATA" "$DATA.err" "$OUT"' EXIT
for _ in $(seq 100); do grep -q listening "$OUT" && break; sleep 0.1; done
URL="$(sed -n 's/^quiver listening on //p' "$OUT")"
echo "date: $(date -u +%Y-%m-%dT%H:%MZ)  commit: $(git rev-parse --short HEAD)  load: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')"
echo "command: bash bench/jobs.sh --jobs $JOBS --clients $CLIENTS --workers $WORKERS --kind $KIND --fsync $FSYNC --mode $MODE"
python3 - "$URL" "$JOBS" "$CLIENTS" "$KIND" "$PID" "$WORKERS" "$MODE" <<'PY'
import http.client, json, sys, threading, time, urllib.parse
url, n, clients, kind, pid = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
workers, mode = int(sys.argv[6]), sys.argv[7]
host = urllib.parse.urlparse(url).netloc
def call(conn, method, path, body=None):
    data = json.dumps(body).encode() if body is not None else None
    conn.request(method, path, body=data, headers={"content-type": "application/json"})
    r = conn.getresponse()
    return r.status, json.loads(r.read() or b"null")
c = http.client.HTTPConnection(host)
s, lib = call(c, "POST", "/v1/libraries", {"name": "bench", "dimension": 4, "metric": "l2"})
assert s == 201, lib
lib = lib["id"]
for i in range(10):
    call(c, "POST", f"/v1/libraries/{lib}/documents", {"id": f"d{i}", "title": "t", "chunks": [{"text": "x", "embedding": [i, 1, 0, 0]}]})
seq0 = call(c, "GET", "/health")[1]
params = {"batch_delete": {"library_id": lib, "ids": ["missing"]},
          "index_optimize": {"library_id": lib},
          "batch_export": {"library_id": lib}}[kind]
lat = []
errors = []
# --mode drain: every worker is first held by a slow export (10 steps, 1 s pause each), the N
# jobs are queued behind them, then the blockers are cancelled and the drain of the full queue
# is timed: jobs executed per second with nothing else going on. --mode live: submit and run
# at once (then the submission rate bounds the execution rate).
blockers = []
if mode == "drain":
    for _ in range(workers):
        s, v = call(c, "POST", "/v1/jobs/batch_export", {"library_id": lib, "batch_size": 1, "pause_ms": 1000})
        assert s == 202, v
        blockers.append(v["job_id"])
    while call(c, "GET", "/v1/jobs/stats/queue")[1]["busy_workers"] < workers:
        time.sleep(0.01)
def client(count):
    conn = http.client.HTTPConnection(host)
    for _ in range(count):
        t = time.perf_counter()
        s, v = call(conn, "POST", f"/v1/jobs/{kind}", params)
        lat.append(time.perf_counter() - t)
        if s != 202:
            errors.append((s, v))
per = [n // clients + (1 if i < n % clients else 0) for i in range(clients)]
t0 = time.perf_counter()
ts = [threading.Thread(target=client, args=(k,)) for k in per]
[t.start() for t in ts]; [t.join() for t in ts]
t_sub = time.perf_counter() - t0
done_at_submit = call(c, "GET", "/v1/jobs/stats/queue")[1]["completed"]
if mode == "drain":
    t_drain0 = time.perf_counter()
    for b in blockers:
        call(c, "DELETE", f"/v1/jobs/{b}")
while True:
    st = call(c, "GET", "/v1/jobs/stats/queue")[1]
    if st["completed"] + st["failed"] + st["cancelled"] - len(blockers) >= n:
        break
    time.sleep(0.01)
t_all = time.perf_counter() - t0
if mode == "drain":
    t_drain = time.perf_counter() - t_drain0
    # …and until every job event of the drain is durable (the table shows a change up to one
    # group commit before it is on disk, as every read does).
    target = call(c, "GET", "/health")[1]["seq"]
    while call(c, "GET", "/health")[1]["durable_seq"] < target:
        time.sleep(0.001)
    t_durable = time.perf_counter() - t_drain0
    print(f"drain of a full queue (cancel the blockers → all {n} completed): {t_drain:.3f} s: {n / t_drain:,.0f} jobs/s executed; "
          f"{t_durable:.3f} s until all their events were durable: {n / t_durable:,.0f} jobs/s")
seq1 = call(c, "GET", "/health")[1]
rss = 0
for line in open(f"/proc/{pid}/status"):
    if line.startswith("VmHWM"):
        rss = int(line.split()[1]) // 1024
lat.sort()
q = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] * 1000
print(f"jobs: {n} x {kind}, {clients} clients, errors: {len(errors)} {errors[:1]}")
print(f"submitted in {t_sub:.2f} s: {n / t_sub:,.0f} submissions/s (p50 {q(0.5):.2f} ms, p99 {q(0.99):.2f} ms per 202)")
print(f"completed: {st['completed']} failed: {st['failed']} ({done_at_submit} already done when the last was submitted)")
print(f"first submit to last completion: {t_all:.2f} s: {n / t_all:,.0f} jobs/s end to end")
if mode == "live" and t_all > t_sub and n > done_at_submit:
    print(f"drain after the last submit: {(n - done_at_submit) / (t_all - t_sub):,.0f} jobs/s")
keys = [k for k in ("seq", "last_seq", "applied_seq") if k in seq0]
if keys:
    k = keys[0]
    print(f"log records per job: {(seq1[k] - seq0[k]) / n:.2f}")
print(f"server peak RSS: {rss} MiB")
PY
# Start-up with these jobs in the log: the table is rebuilt from the table file written at
# shutdown (SIGTERM), then from the log after it. Also timed with the table file removed
# (a crash before it was first written, or a damaged file): a replay of every job event.
restart() {
    : >"$OUT"
    local t0; t0=$(date +%s.%N)
    "$BIN" serve --addr 127.0.0.1:0 --data-dir "$DATA" --fsync "$FSYNC" \
        --job-workers "$WORKERS" --job-queue-limit $((JOBS + 10)) >"$OUT" 2>>"$DATA.err" &
    PID=$!
    for _ in $(seq 600); do grep -q listening "$OUT" && break; sleep 0.01; done
    local t1; t1=$(date +%s.%N)
    URL="$(sed -n 's/^quiver listening on //p' "$OUT")"
    local done_n; done_n=$(python3 -c "import json,urllib.request;print(json.load(urllib.request.urlopen('$URL/v1/jobs/stats/queue'))['completed'])")
    echo "restart ($1): listening after $(echo "$t1 - $t0" | bc) s, $done_n completed jobs in the table"
}
kill -TERM $PID; wait $PID 2>/dev/null || true
restart "table file + log after it"
kill -TERM $PID; wait $PID 2>/dev/null || true
rm -f "$DATA/jobs/table.json"
restart "no table file: every job event replayed from the log"
