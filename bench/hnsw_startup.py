#!/usr/bin/env python3
"""Start-up time of the real `quiver serve` holding an HNSW library of N vectors.

Run through bench/hnsw_startup.sh, which builds the release server first. This script:
  1. starts `quiver serve` (release binary, `--fsync always` by default) on a free port with a
     fresh data directory under --data-root, creates the library `startup` (dimension 128,
     metric l2, index_type hnsw, default parameters), and streams the first --vectors rows of
     --base (raw little-endian float32, --dimension per row) to
     `POST /v1/libraries/startup/documents/stream`: one NDJSON line per document
     `{"id":"v<row>","chunks":[{"embedding":[…]}]}` (JSON floats with 9 significant digits,
     which round-trip f32), rendered lazily and sent with chunked transfer encoding while a
     second thread reads the status lines. The clock stops when the summary line arrives
     (every line acknowledged after fsync); the summary must say every line committed;
  2. stops the server with SIGTERM (it writes a final snapshot, graph included, on shutdown)
     and times the exit;
  3. clean restart, --restarts times: spawns the server on the same data directory and times,
     from the spawn, the `quiver listening on` line, the first `GET /health` that answers, and
     the first `POST …/search` (a query row of --queries, k=10) that returns 10 results; then
     reads `GET …/index` (what serves searches: a graph loaded from the snapshot serves `hnsw`
     at once; one that was rebuilt serves `flat` until the build ends, and that wait is timed
     too), takes from the server's log timestamps how long loading the snapshot (graph
     included) with opening the log, and replaying the log after the snapshot, took, and stops
     it with SIGTERM again;
  4. crash restart: starts the server, streams --extra further rows (past the end of --base,
     midpoints of pairs of its rows: see `Vectors`; fewer records than
     --snapshot-every, so no snapshot covers them; checked against the snapshot file names and
     `GET /health`), SIGKILLs it, then --restarts times: spawns it, times it as above (the
     graph comes from the snapshot, the records after it are re-inserted from the log), checks
     that the library and its index hold N+M documents, chunks, vectors and graph rows, that
     the search returns 10 results and that self-queries of rows before and after the snapshot
     find their own document, and SIGKILLs it again;
  5. prints markdown tables on stdout (progress on stderr): ingest throughput, every start-up
     with the median per kind, `memory_bytes` of `GET …/index`, server RSS and the data
     directory's size on disk. The server's own log (`state recovered … replayed=`, `index
     built`, `rebuilding it`) is kept per start and quoted where it tells how a start-up went.
The data directory is deleted at the end unless --keep is given.
"""

import argparse
import http.client
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import ndjson_upload  # noqa: E402  (bench/ndjson_upload.py, beside this script)
LIBRARY = "startup"
MIB = 1024.0 * 1024.0
SELF_QUERIES = 10
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def log(msg):
    print(msg, file=sys.stderr, flush=True)


class Vectors:
    """The rows of --base (memory-mapped). A row i past the file's end is the midpoint of file
    rows 2(i-rows) and 2(i-rows)+1: a new vector from the same distribution, so that N + M may
    exceed the file (by up to half its rows) without duplicates."""

    def __init__(self, path, dimension):
        self.file = np.memmap(path, dtype="<f4", mode="r").reshape(-1, dimension)
        self.limit = len(self.file) + len(self.file) // 2

    def rows(self, start, end):
        n = len(self.file)
        parts = [np.asarray(self.file[start:min(end, n)])] if start < n else []
        if end > n:
            lo, hi = max(start, n) - n, end - n
            pairs = self.file[2 * lo : 2 * hi].reshape(hi - lo, 2, -1)
            parts.append((pairs[:, 0] + pairs[:, 1]) * np.float32(0.5))
        return np.concatenate(parts)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_status_kib(pid, key):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {key} in /proc/{pid}/status")


def dir_sizes(path):
    """Bytes on disk (allocated blocks) by part of the data directory."""
    sizes = {"log": 0, "snapshot (.qsnap)": 0, "graph (.hnsw)": 0, "other": 0}
    for dirpath, _, files in os.walk(path):
        for name in files:
            try:
                size = os.stat(os.path.join(dirpath, name)).st_blocks * 512
            except OSError:
                continue
            rel = os.path.relpath(os.path.join(dirpath, name), path)
            if rel.startswith("log" + os.sep):
                sizes["log"] += size
            elif name.endswith(".qsnap"):
                sizes["snapshot (.qsnap)"] += size
            elif name.endswith(".hnsw"):
                sizes["graph (.hnsw)"] += size
            else:
                sizes["other"] += size
    return sizes


def snapshot_seqs(data_dir):
    """Seqs of the snapshot files in the data directory, oldest first."""
    names = os.listdir(os.path.join(data_dir, "snapshots"))
    return sorted(int(n[len("snapshot-") : -len(".qsnap")]) for n in names if n.endswith(".qsnap"))


class Server:
    """One `quiver serve` process; `started` is taken just before the spawn."""

    def __init__(self, args, data_dir, log_path):
        self.port = free_port()
        self.log_path = log_path
        self.log_file = open(log_path, "w")
        cmd = [
            args.server_bin, "serve", "--addr", f"127.0.0.1:{self.port}", "--data-dir", data_dir,
            "--fsync", args.fsync, "--snapshot-every", str(args.snapshot_every),
        ]
        self.listening_s = None
        self.started_wall = time.time()
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self.log_file,
            env=dict(os.environ, QUIVER_LOG="info"),
        )
        self.pid = self.proc.pid
        threading.Thread(target=self._read_stdout, daemon=True).start()

    def _read_stdout(self):
        # Drains stdout (the server must never block on a full pipe) and times its one line.
        for line in self.proc.stdout:
            if self.listening_s is None and line.startswith(b"quiver listening on "):
                self.listening_s = time.perf_counter() - self.started

    def request(self, method, path, body=None, timeout=600):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            headers = {"Content-Type": "application/json"} if body is not None else {}
            conn.request(method, path, body=None if body is None else json.dumps(body), headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        return resp.status, (json.loads(data) if data else None)

    def check_alive(self):
        if self.proc.poll() is not None:
            raise RuntimeError(f"the server exited with {self.proc.returncode}; log: {self.log_path}\n{self.log_tail()}")

    def log_tail(self, lines=20):
        with open(self.log_path, errors="replace") as f:
            return "".join(ANSI.sub("", line) for line in f.readlines()[-lines:])

    def log_time(self, pattern):
        """Seconds from the spawn to the timestamp of the first log line matching `pattern`."""
        line = self.log_lines(pattern)[0]
        return datetime.fromisoformat(line.split()[0]).timestamp() - self.started_wall

    def log_lines(self, pattern):
        """The server's log lines matching `pattern`, without colour codes."""
        with open(self.log_path, errors="replace") as f:
            lines = (ANSI.sub("", line).strip() for line in f)
            return [line for line in lines if re.search(pattern, line)]

    def wait_health(self, timeout):
        """Seconds from the spawn until `GET /health` answers 200."""
        deadline = time.perf_counter() + timeout
        while True:
            self.check_alive()
            try:
                status, _ = self.request("GET", "/health", timeout=5)
                if status == 200:
                    return time.perf_counter() - self.started
            except OSError:
                pass
            if time.perf_counter() > deadline:
                raise RuntimeError(f"no /health within {timeout} s; log: {self.log_path}")
            time.sleep(0.01)

    def stop(self):
        """SIGTERM; returns the seconds until the process exited (cleanly)."""
        t = time.perf_counter()
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=600)
        except subprocess.TimeoutExpired:
            self.kill()
            raise RuntimeError("the server did not exit within 600 s of SIGTERM")
        self.log_file.close()
        if code != 0:
            raise RuntimeError(f"the server exited with {code} after SIGTERM; log: {self.log_path}")
        return time.perf_counter() - t

    def kill(self):
        self.proc.kill()
        self.proc.wait()
        self.log_file.close()


def search(server, library_id, vector):
    """`POST …/search` with k=10; returns (status, answer)."""
    return server.request("POST", f"/v1/libraries/{library_id}/search",
                          {"embedding": vector.tolist(), "k": 10}, timeout=60)


def ndjson_chunks(base, first, count, batch):
    """HTTP chunks (chunked-encoding framing) of `batch` NDJSON lines each, rendered lazily."""
    line = '{"id":"v%d","chunks":[{"embedding":[' + ",".join(["%.9g"] * base.file.shape[1]) + "]}]}\n"
    for start in range(first, first + count, batch):
        end = min(start + batch, first + count)
        rows = base.rows(start, end)
        data = "".join(line % ((start + i,) + tuple(rows[i].tolist())) for i in range(end - start)).encode()
        yield b"%x\r\n" % len(data) + data + b"\r\n"
    yield b"0\r\n\r\n"


def stream_ingest(server, library_id, base, first, count, batch):
    """Streams rows [first, first+count) as one NDJSON upload; returns (seconds, summary)."""
    def progress(state, elapsed):
        log(f"  ingest: {state['ok']:,}/{count:,} acknowledged after {elapsed:.0f} s "
            f"({state['ok'] / elapsed:,.0f} vectors/s)")

    r = ndjson_upload.upload("127.0.0.1", server.port, f"/v1/libraries/{library_id}/documents/stream",
                             ndjson_chunks(base, first, count, batch), progress=progress)
    summary = r["summary"]
    if (r["ok"] != count or r["failed"] or summary.get("lines") != count
            or summary.get("committed") != count or summary.get("failed") != 0 or summary.get("error")):
        raise RuntimeError(f"{r['ok']} lines ok, {r['failed']} failed, summary {summary}; "
                           f"first failure: {r['first_error']}")
    return r["seconds"], summary


def index_status(server, library_id):
    status, index = server.request("GET", f"/v1/libraries/{library_id}/index")
    if status != 200:
        raise RuntimeError(f"GET …/index answered {status}: {index}")
    return index


def time_startup(server, library_id, query, timeout):
    """Times one start-up from the spawn: /health, first 10-result search, graph serving."""
    health_s = server.wait_health(timeout)
    deadline = time.perf_counter() + timeout
    while True:
        server.check_alive()
        status, answer = search(server, library_id, query)
        if status == 200 and len(answer["results"]) == 10:
            search_s = time.perf_counter() - server.started
            break
        if time.perf_counter() > deadline:
            raise RuntimeError(f"no 10-result search within {timeout} s: {status} {answer}")
        time.sleep(0.01)
    index = index_status(server, library_id)
    serving_at_first_search = index["serving"]
    while index["serving"] != "hnsw" or index["build"]["state"] != "ready":
        if time.perf_counter() > deadline:
            raise RuntimeError(f"the graph is not serving within {timeout} s: {index}")
        time.sleep(0.5)
        index = index_status(server, library_id)
    graph_s = time.perf_counter() - server.started
    # Phases from the server's log: the snapshot (graph included) loads before the log opens
    # (which validates every frame), then the records after the snapshot are replayed.
    log_opened = server.log_time(r"opened log")
    recovered_at = server.log_time(r"state recovered")
    replayed = re.search(r"replayed=(\d+)", server.log_lines(r"state recovered")[0]).group(1)
    return {
        "listening_s": server.listening_s,
        "health_s": health_s,
        "search_s": search_s,
        "graph_s": graph_s,
        "serving_at_first_search": serving_at_first_search,
        "replayed": int(replayed),
        "load_s": log_opened - server.log_time(r"embedding models"),
        "replay_s": recovered_at - log_opened,
        "rebuild_log": server.log_lines(r"rebuilding it|not used|index built"),
        "rss_mib": proc_status_kib(server.pid, "VmRSS") / 1024.0,
        "index": index,
    }


def check_contents(server, library_id, base, expected, snapshot_rows):
    """The library holds `expected` documents, chunks, vectors and graph rows; self-queries of
    rows covered by the snapshot and of rows re-inserted from the log find their own document.
    Returns (found before the snapshot, found after it), each out of SELF_QUERIES."""
    status, lib = server.request("GET", f"/v1/libraries/{library_id}")
    if status != 200 or lib["num_documents"] != expected or lib["num_chunks"] != expected:
        raise RuntimeError(f"the library reports {lib.get('num_documents')} documents and "
                           f"{lib.get('num_chunks')} chunks, expected {expected}")
    index = index_status(server, library_id)
    if index["num_vectors"] != expected or index["graph_rows"] != expected:
        raise RuntimeError(f"the index reports {index['num_vectors']} vectors and "
                           f"{index['graph_rows']} graph rows, expected {expected}")
    found = []
    for lo, hi in ((0, snapshot_rows), (snapshot_rows, expected)):
        rows = np.linspace(lo, hi - 1, SELF_QUERIES).astype(int) if hi > lo else []
        hits = 0
        for row in rows:
            status, answer = search(server, library_id, base.rows(row, row + 1)[0])
            if status != 200 or len(answer["results"]) != 10:
                raise RuntimeError(f"self-query of row {row} answered {status}: {answer}")
            hits += answer["results"][0]["document_id"] == f"v{row}"
        found.append(hits)
    return tuple(found)


def run(args):
    base = Vectors(args.base, args.dimension)
    queries = np.fromfile(args.queries, dtype="<f4").reshape(-1, args.dimension)
    n, m = args.vectors, args.extra
    if n + m > base.limit:
        raise SystemExit(f"--vectors + --extra = {n + m}; {args.base} serves at most {base.limit} rows")
    query = queries[0]
    root = args.data_root or tempfile.gettempdir()
    work = tempfile.mkdtemp(prefix="quiver-hnsw-startup-", dir=root)
    data_dir = os.path.join(work, "data")
    logs = os.path.join(work, "logs")
    os.makedirs(logs)
    log(f"data directory {data_dir}, server logs in {logs}")
    results = {"n": n, "m": m, "clean": [], "crash": []}
    starts = 0
    server = None

    def spawn(label):
        nonlocal starts
        starts += 1
        return Server(args, data_dir, os.path.join(logs, f"{starts:02d}-{label}.log"))

    try:
        # 1. Fresh server, library, N vectors.
        server = spawn("ingest")
        server.wait_health(60)
        status, lib = server.request("POST", "/v1/libraries", {
            "name": LIBRARY, "dimension": args.dimension, "metric": "l2", "index_type": "hnsw"})
        if status != 201:
            raise RuntimeError(f"creating the library answered {status}: {lib}")
        library_id = lib["id"]
        log(f"ingesting {n:,} vectors …")
        seconds, summary = stream_ingest(server, library_id, base, 0, n, args.batch)
        results["ingest"] = {"vectors": n, "seconds": seconds, "summary": summary,
                             "rss_mib": proc_status_kib(server.pid, "VmRSS") / 1024.0,
                             "hwm_mib": proc_status_kib(server.pid, "VmHWM") / 1024.0,
                             "snapshots": len(server.log_lines(r"snapshot written"))}
        log(f"  {n / seconds:,.0f} vectors/s ({seconds:.1f} s), summary {summary}")
        results["index_after_ingest"] = index_status(server, library_id)

        # 2. SIGTERM: the final snapshot, graph included.
        results["first_stop_s"] = server.stop()
        log(f"SIGTERM took {results['first_stop_s']:.1f} s; snapshots at seqs {snapshot_seqs(data_dir)}")
        results["sizes_clean"] = dir_sizes(data_dir)

        # 3. Clean restarts.
        for i in range(args.restarts):
            server = spawn("clean")
            r = time_startup(server, library_id, query, args.timeout)
            check_contents(server, library_id, base, n, n)
            r["stop_s"] = server.stop()
            results["clean"].append(r)
            log(f"clean restart {i + 1}: /health {r['health_s']:.2f} s, first search {r['search_s']:.2f} s "
                f"(serving {r['serving_at_first_search']}), replayed {r['replayed']}, SIGTERM {r['stop_s']:.1f} s")

        # 4. M more vectors after the last snapshot, then SIGKILL and crash restarts.
        server = spawn("extra")
        server.wait_health(args.timeout)
        log(f"ingesting {m:,} more vectors, then SIGKILL …")
        seconds, summary = stream_ingest(server, library_id, base, n, m, args.batch)
        results["extra"] = {"vectors": m, "seconds": seconds, "summary": summary}
        _, health = server.request("GET", "/health")
        snap = snapshot_seqs(data_dir)[-1]
        if snap >= summary["last_seq"]:
            raise RuntimeError(f"a snapshot (seq {snap}) covers the extra vectors (last seq "
                               f"{summary['last_seq']}): raise --snapshot-every")
        results["crash_point"] = {"snapshot_seq": snap, "durable_seq": health["durable_seq"]}
        server.kill()
        for i in range(args.restarts):
            server = spawn("crash")
            r = time_startup(server, library_id, query, args.timeout)
            r["self_hits"] = check_contents(server, library_id, base, n + m, n)
            server.kill()
            results["crash"].append(r)
            log(f"crash restart {i + 1}: /health {r['health_s']:.2f} s, first search {r['search_s']:.2f} s "
                f"(serving {r['serving_at_first_search']}), replayed {r['replayed']}, "
                f"self-queries found {r['self_hits'][0]}+{r['self_hits'][1]}/{2 * SELF_QUERIES}")
        server = None
        results["sizes_final"] = dir_sizes(data_dir)
    except BaseException:
        if server is not None and server.proc.poll() is None:
            server.kill()
        log(f"failed; data and server logs kept in {work}")
        raise
    if args.keep:
        log(f"kept {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return results


def fmt_runs(values, digits=2):
    return f"**{statistics.median(values):.{digits}f}** ({', '.join(f'{v:.{digits}f}' for v in values)})"


def report(args, results):
    n, m = results["n"], results["m"]
    ingest, extra = results["ingest"], results["extra"]
    params = results["index_after_ingest"]["index_params"]
    out = [f"N = {n:,} vectors × {args.dimension} (l2, HNSW m={params['m']} ef_construction={params['ef_construction']}), "
           f"M = {m:,}; "
           f"fsync {args.fsync}; {args.restarts} start-ups per kind. Seconds, median (all runs): the two phases from the "
           f"server's log timestamps, the other columns from the spawn.", ""]
    out += ["| ingest (NDJSON stream, one document per line) | vectors | seconds | vectors/s | summary |",
            "|---|---:|---:|---:|---|"]
    for label, r in (("N into an empty library", ingest), ("M more, before the SIGKILL", extra)):
        s = r["summary"]
        out.append(f"| {label} | {r['vectors']:,} | {r['seconds']:.1f} | {r['vectors'] / r['seconds']:,.0f} | "
                   f"{s['committed']:,} of {s['lines']:,} committed, {s['failed']} failed |")
    out += ["", "| start-up | snapshot load + log open (server log) | log replay (server log) | `listening` line | "
            "`/health` | first search (k=10) | graph serving | at first search | records replayed | RSS MiB |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for label, runs in (("clean (after SIGTERM)", results["clean"]), (f"crash (SIGKILL, +{m:,} in the log)", results["crash"])):
        out.append(
            f"| {label} | {fmt_runs([r['load_s'] for r in runs])} | {fmt_runs([r['replay_s'] for r in runs])} | "
            f"{fmt_runs([r['listening_s'] for r in runs])} | {fmt_runs([r['health_s'] for r in runs])} | "
            f"{fmt_runs([r['search_s'] for r in runs])} | {fmt_runs([r['graph_s'] for r in runs])} | "
            f"{', '.join(sorted(set(r['serving_at_first_search'] for r in runs)))} | "
            f"{', '.join(str(r['replayed']) for r in runs)} | {statistics.median(r['rss_mib'] for r in runs):,.0f} |")
    index = results["crash"][-1]["index"]
    sizes_clean, sizes_final = results["sizes_clean"], results["sizes_final"]
    out += ["", "| measure | value |", "|---|---|",
            f"| SIGTERM after the ingest (final snapshot, graph included) | {results['first_stop_s']:.1f} s |",
            f"| SIGTERM after a clean restart | {fmt_runs([r['stop_s'] for r in results['clean']])} s |",
            f"| snapshots written during the ingest | {ingest['snapshots']} |",
            f"| server RSS after the ingest / peak | {ingest['rss_mib']:,.0f} / {ingest['hwm_mib']:,.0f} MiB |",
            f"| `GET …/index` memory_bytes after the ingest (exact + graph) | "
            f"{results['index_after_ingest']['memory_bytes']['exact'] / MIB:,.0f} + "
            f"{results['index_after_ingest']['memory_bytes']['graph'] / MIB:,.0f} MiB |",
            f"| `GET …/index` memory_bytes after a crash restart (exact + graph) | "
            f"{index['memory_bytes']['exact'] / MIB:,.0f} + {index['memory_bytes']['graph'] / MIB:,.0f} MiB |",
            f"| crash point: snapshot seq / acknowledged seq | {results['crash_point']['snapshot_seq']:,} / "
            f"{results['crash_point']['durable_seq']:,} |",
            f"| after crash restarts: documents = chunks = vectors = graph rows | {n + m:,} |",
            "| self-queries finding their own row (rows in the snapshot, rows replayed) | "
            + ", ".join(f"{a}/{SELF_QUERIES} + {b}/{SELF_QUERIES}" for a, b in (r["self_hits"] for r in results["crash"])) + " |"]
    for label, sizes in (("after the first SIGTERM", sizes_clean), ("at the end", sizes_final)):
        parts = ", ".join(f"{k} {v / MIB:,.0f}" for k, v in sizes.items() if v)
        out.append(f"| data directory on disk {label} | {sum(sizes.values()) / MIB:,.0f} MiB ({parts}) |")
    rebuilds = [line for r in results["clean"] + results["crash"] for line in r["rebuild_log"]]
    out.append(f"| graph rebuilt at a start-up (server log) | {'; '.join(rebuilds) if rebuilds else 'never'} |")
    print("\n".join(out))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--server-bin", required=True, help="the release `quiver` binary")
    p.add_argument("--base", default=os.path.join(HERE, "data", "sift1m", "base.f32"))
    p.add_argument("--queries", default=os.path.join(HERE, "data", "sift1m", "queries.f32"))
    p.add_argument("--dimension", type=int, default=128)
    p.add_argument("--vectors", type=int, default=1_000_000, help="N: vectors ingested first")
    p.add_argument("--extra", type=int, default=10_000, help="M: vectors after the snapshot, before SIGKILL")
    p.add_argument("--restarts", type=int, default=3, help="start-ups timed per kind")
    p.add_argument("--batch", type=int, default=512, help="NDJSON lines per HTTP chunk")
    p.add_argument("--fsync", default="always")
    p.add_argument("--snapshot-every", type=int, default=50_000, help="passed to the server")
    p.add_argument("--timeout", type=float, default=1800, help="seconds a start-up may take")
    p.add_argument("--data-root", help="where the temporary data directory goes (default: the temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the data directory and server logs")
    args = p.parse_args()
    if args.extra >= args.snapshot_every:
        p.error("--extra must be below --snapshot-every, so no snapshot covers the extra vectors")
    report(args, run(args))


if __name__ == "__main__":
    main()
