#!/usr/bin/env python3
"""Durable NDJSON ingest over HTTP: `quiver serve --fsync always` vs chromadb, side by side.

Run through bench/ndjson_vs_chroma.sh, which installs chromadb and numpy into bench/.venv if
missing and builds the release server first. This script:
  1. generates --total deterministic documents (seeded numpy): id `d-<i>`, ~100 characters of
     text, a --dimension float32 vector (uniform in [-1, 1)) and a small metadata object;
  2. Quiver, once per encoding (`embedding_b64` = base64 of the little-endian f32 bytes, and
     `embedding` as JSON floats written with 9 significant digits, which round-trip f32):
     starts a fresh release server on a fresh data directory with `--fsync always`, creates
     the library `bench` (cosine), and streams one NDJSON line per document to
     `POST /v1/libraries/bench/documents/stream` with chunked transfer encoding, --batch lines
     per HTTP chunk, while a second thread reads the status lines as they come back. The
     lines and chunks are rendered before the clock starts; the clock stops when the summary
     line arrives (every line acknowledged, after fsync). Then it checks that every status
     line said ok, that the summary says --total committed, that `GET /v1/libraries/bench`
     reports --total documents and chunks, that a few documents read back hold the text,
     metadata and (normalised) vector that were sent, and that the server exits cleanly on
     SIGTERM. Peak RSS is the server's VmHWM (/proc/<pid>/status);
  3. chromadb, in a subprocess of its own (`--chroma-only`, so this process's buffers do not
     count): PersistentClient on a fresh directory, a collection with cosine space and
     embedding_function=None, `collection.add(ids, embeddings, documents, metadatas)` in
     batches of --batch with the same precomputed vectors (never an embedding model), then
     `collection.count() == --total` and a read-back of a few records. Peak RSS is the
     VmHWM of that subprocess (not ru_maxrss, which Linux carries over from the parent
     across fork+exec); it holds the data set too, so the growth over its resident size just
     before the load is reported as well;
  4. prints a markdown table: system, encoding, vectors/s, wall s, peak RSS, ratio vs chromadb.
"""

import argparse
import base64
import http.client
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from urllib.parse import urlparse

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import ndjson_upload  # noqa: E402  (bench/ndjson_upload.py, beside this script)
LIBRARY = "bench"
GOAL_VECTORS_PER_SECOND = 50_000
GOAL_RATIO = 3.0
MIB = 1024.0 * 1024.0

WORDS = (
    "vector durable append log group commit quiver search index cosine batch chunk document "
    "library latency throughput snapshot segment replay embedding record sequence fsync client"
).split()


def log(msg):
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------ data set


def make_dataset(total, dim, seed):
    """(ids, texts, metadatas, vectors[total, dim] float32 little-endian), deterministic in seed."""
    rng = np.random.default_rng(seed)
    vectors = (rng.random((total, dim), dtype=np.float32) * np.float32(2.0) - np.float32(1.0)).astype("<f4")
    words = rng.integers(0, len(WORDS), size=(total, 24))
    ids, texts, metas = [], [], []
    for i in range(total):
        parts = [f"Document {i}:"]
        n = len(parts[0])
        for w in words[i]:
            if n >= 100:
                break
            parts.append(WORDS[w])
            n += 1 + len(WORDS[w])
        ids.append(f"d-{i}")
        texts.append(" ".join(parts))
        metas.append({"n": i, "group": f"g{i % 10}", "even": i % 2 == 0})
    return ids, texts, metas, vectors


# ------------------------------------------------------------------ process measurements


def proc_status_kib(pid, key):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {key} in /proc/{pid}/status")


def proc_cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    fields = stat[stat.rfind(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def self_cpu_seconds():
    t = os.times()
    return t.user + t.system


def dir_bytes(path):
    total = 0
    for dirpath, _, files in os.walk(path):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(dirpath, name))
            except OSError:
                pass
    return total


# ------------------------------------------------------------------ Quiver


def render_chunks(ids, texts, metas, vectors, encoding, batch):
    """HTTP chunks (with chunked-encoding framing), `batch` NDJSON lines each."""
    dim = vectors.shape[1]
    float_fmt = ",".join(["%.9g"] * dim)
    chunks, lines, body_bytes = [], [], 0
    for i in range(len(ids)):
        head = json.dumps({"id": ids[i], "title": f"document {i}", "metadata": metas[i]})[:-1]
        if encoding == "b64":
            emb = '"embedding_b64":"' + base64.b64encode(vectors[i].tobytes()).decode("ascii") + '"'
        else:
            emb = '"embedding":[' + (float_fmt % tuple(vectors[i].tolist())) + "]"
        lines.append(f'{head},"chunks":[{{"text":{json.dumps(texts[i])},{emb}}}]}}\n'.encode())
        if len(lines) == batch or i == len(ids) - 1:
            data = b"".join(lines)
            body_bytes += len(data)
            chunks.append(b"%x\r\n" % len(data) + data + b"\r\n")
            lines = []
    chunks.append(b"0\r\n\r\n")
    return chunks, body_bytes


class Server:
    def __init__(self, binary, data_dir, fsync):
        env = dict(os.environ, QUIVER_LOG="warn")
        self.proc = subprocess.Popen(
            [binary, "serve", "--addr", "127.0.0.1:0", "--fsync", fsync, "--data-dir", data_dir],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            env=env,
        )
        self.pid = self.proc.pid
        line = self.proc.stdout.readline().decode().strip()
        prefix = "quiver listening on "
        if not line.startswith(prefix):
            self.proc.kill()
            raise RuntimeError(f"unexpected first line from the server: {line!r}")
        url = urlparse(line[len(prefix) :])
        self.host, self.port = url.hostname, url.port
        # Keep draining stdout so the server can never block on a full pipe.
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()

    def request(self, method, path, body=None):
        conn = http.client.HTTPConnection(self.host, self.port, timeout=120)
        headers = {"Content-Type": "application/json"} if body is not None else {}
        conn.request(method, path, body=None if body is None else json.dumps(body), headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        conn.close()
        return resp.status, (json.loads(data) if data else None)

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise RuntimeError("the server did not exit within 60 s of SIGTERM")
        if code != 0:
            raise RuntimeError(f"the server exited with {code}")


def stream_ingest(server, chunks):
    """Sends the chunks on one connection while a thread reads the replies.

    Returns (wall seconds until the summary line, ok lines, failed lines, summary, first error line).
    """
    r = ndjson_upload.upload(server.host, server.port, f"/v1/libraries/{LIBRARY}/documents/stream",
                             chunks, timeout=600)
    return r["seconds"], r["ok"], r["failed"], r["summary"], r["first_error"]


def verify_quiver(server, ids, texts, metas, vectors):
    total = len(ids)
    status, lib = server.request("GET", f"/v1/libraries/{LIBRARY}")
    if status != 200 or lib.get("num_chunks") != total or lib.get("num_documents") != total:
        raise RuntimeError(
            f"the library reports {lib.get('num_documents')} documents and {lib.get('num_chunks')} chunks, expected {total}"
        )
    for i in sorted({0, total // 2, total - 1}):
        status, doc = server.request("GET", f"/v1/libraries/{LIBRARY}/documents/{ids[i]}?include_embeddings=true")
        if status != 200:
            raise RuntimeError(f"reading {ids[i]} answered {status}")
        chunk = doc["chunks"][0]
        if chunk["text"] != texts[i]:
            raise RuntimeError(f"{ids[i]} has the wrong text")
        if any(doc.get("metadata", {}).get(k) != v for k, v in metas[i].items()):
            raise RuntimeError(f"{ids[i]} has the wrong metadata: {doc.get('metadata')}")
        sent = vectors[i].astype(np.float64)
        want = sent / np.linalg.norm(sent)
        got = np.asarray(chunk["embedding"], dtype=np.float64)
        if got.shape != want.shape or np.max(np.abs(got - want)) > 1e-6:
            raise RuntimeError(f"{ids[i]} does not hold the vector that was sent")
    return lib


def run_quiver(args, data, encoding):
    ids, texts, metas, vectors = data
    t = time.perf_counter()
    chunks, body_bytes = render_chunks(ids, texts, metas, vectors, encoding, args.batch)
    log(f"quiver/{encoding}: rendered {len(ids)} lines ({body_bytes / MIB:.0f} MiB) in {time.perf_counter() - t:.1f} s")
    data_dir = tempfile.mkdtemp(prefix="quiver-ndjson-", dir=args.data_root)
    server = Server(args.server_bin, data_dir, args.fsync)
    try:
        status, answer = server.request(
            "POST", "/v1/libraries", {"name": LIBRARY, "dimension": vectors.shape[1], "metric": "cosine"}
        )
        if status != 201:
            raise RuntimeError(f"creating the library answered {status}: {answer}")
        rss_before_kib = proc_status_kib(server.pid, "VmRSS")
        server_cpu0, client_cpu0 = proc_cpu_seconds(server.pid), self_cpu_seconds()
        load0 = os.getloadavg()[0]
        wall, ok, failed, summary, first_error = stream_ingest(server, chunks)
        server_cpu = proc_cpu_seconds(server.pid) - server_cpu0
        client_cpu = self_cpu_seconds() - client_cpu0
        load1 = os.getloadavg()[0]
        total = len(ids)
        if ok != total or failed != 0 or summary.get("committed") != total or summary.get("failed") != 0:
            raise RuntimeError(
                f"{ok} lines ok, {failed} failed, summary {summary}; first failure: {first_error}"
            )
        verify_quiver(server, ids, texts, metas, vectors)
        peak_kib = proc_status_kib(server.pid, "VmHWM")
        server.stop()
    except BaseException:
        server.proc.kill()
        raise
    finally:
        size = dir_bytes(data_dir)
        shutil.rmtree(data_dir, ignore_errors=True)
    row = {
        "system": "quiver",
        "encoding": "embedding_b64" if encoding == "b64" else "JSON floats",
        "vectors": len(ids),
        "wall_s": wall,
        "peak_rss_mib": peak_kib / 1024.0,
        "delta_rss_mib": (peak_kib - rss_before_kib) / 1024.0,
        "cpu_us_per_vector": 1e6 * server_cpu / len(ids),
        "client_cpu_s": client_cpu,
        "body_mib": body_bytes / MIB,
        "data_mib": size / MIB,
        "load": (load0, load1),
    }
    log(
        f"quiver/{encoding}: {len(ids) / wall:,.0f} vectors/s, {wall:.2f} s, server peak RSS {row['peak_rss_mib']:.0f} MiB, "
        f"server CPU {server_cpu:.1f} s, client CPU {client_cpu:.1f} s, load {load0:.2f} -> {load1:.2f}"
    )
    return row


# ------------------------------------------------------------------ chromadb (own process)


def chroma_only(args):
    """Runs in a subprocess: loads the data set into chromadb, prints one JSON line."""
    os.environ["ANONYMIZED_TELEMETRY"] = "False"
    ids, texts, metas, vectors = make_dataset(args.total, args.dimension, args.seed)
    import chromadb
    from chromadb.config import Settings

    path = tempfile.mkdtemp(prefix="chroma-ndjson-", dir=args.data_root)
    try:
        client = chromadb.PersistentClient(path=path, settings=Settings(anonymized_telemetry=False))
        collection = client.create_collection(
            name=LIBRARY, metadata={"hnsw:space": "cosine"}, embedding_function=None
        )
        batches = [
            (ids[s : s + args.batch], vectors[s : s + args.batch], texts[s : s + args.batch], metas[s : s + args.batch])
            for s in range(0, args.total, args.batch)
        ]
        # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across fork+exec,
        # so it would report the driver's own peak (the rendered NDJSON bodies), not chromadb's.
        hwm_before_kib = proc_status_kib(os.getpid(), "VmHWM")
        rss_before_kib = proc_status_kib(os.getpid(), "VmRSS")
        cpu0 = self_cpu_seconds()
        load0 = os.getloadavg()[0]
        started = time.perf_counter()
        for b_ids, b_vecs, b_texts, b_metas in batches:
            collection.add(ids=b_ids, embeddings=b_vecs, documents=b_texts, metadatas=b_metas)
        wall = time.perf_counter() - started
        cpu = self_cpu_seconds() - cpu0
        load1 = os.getloadavg()[0]
        count = collection.count()
        if count != args.total:
            raise RuntimeError(f"collection.count() = {count}, expected {args.total}")
        sample = sorted({0, args.total // 2, args.total - 1})
        got = collection.get(ids=[ids[i] for i in sample], include=["embeddings", "documents", "metadatas"])
        by_id = {rid: k for k, rid in enumerate(got["ids"])}
        for i in sample:
            k = by_id[ids[i]]
            if got["documents"][k] != texts[i] or got["metadatas"][k] != metas[i]:
                raise RuntimeError(f"chromadb: {ids[i]} has the wrong document or metadata")
            if np.max(np.abs(np.asarray(got["embeddings"][k], dtype=np.float32) - vectors[i])) > 1e-6:
                raise RuntimeError(f"chromadb: {ids[i]} does not hold the vector that was sent")
        peak_kib = proc_status_kib(os.getpid(), "VmHWM")
        ru_maxrss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        size = dir_bytes(path)
    finally:
        shutil.rmtree(path, ignore_errors=True)
    print(
        json.dumps(
            {
                "system": "chromadb " + chromadb.__version__,
                "encoding": "collection.add (numpy f32)",
                "vectors": args.total,
                "wall_s": wall,
                "peak_rss_mib": peak_kib / 1024.0,
                "delta_rss_mib": (peak_kib - rss_before_kib) / 1024.0,
                "pre_load_hwm_mib": hwm_before_kib / 1024.0,
                "ru_maxrss_mib": ru_maxrss_kib / 1024.0,
                "cpu_us_per_vector": 1e6 * cpu / args.total,
                "data_mib": size / MIB,
                "load": (load0, load1),
            }
        ),
        flush=True,
    )


def run_chroma(args):
    cmd = [
        sys.executable, os.path.abspath(__file__), "--chroma-only",
        "--total", str(args.total), "--batch", str(args.batch),
        "--dimension", str(args.dimension), "--seed", str(args.seed),
    ]
    if args.data_root:
        cmd += ["--data-root", args.data_root]
    env = dict(os.environ, ANONYMIZED_TELEMETRY="False")
    out = subprocess.run(cmd, stdout=subprocess.PIPE, env=env, check=True).stdout.decode()
    row = json.loads(out.strip().splitlines()[-1])
    log(
        f"{row['system']}: {row['vectors'] / row['wall_s']:,.0f} vectors/s, {row['wall_s']:.2f} s, "
        f"peak RSS {row['peak_rss_mib']:.0f} MiB (+{row['delta_rss_mib']:.0f} over pre-load), "
        f"load {row['load'][0]:.2f} -> {row['load'][1]:.2f}"
    )
    return row


# ------------------------------------------------------------------ report


def print_table(args, rows):
    chroma = next((r for r in rows if r["system"].startswith("chromadb")), None)
    chroma_rate = chroma["vectors"] / chroma["wall_s"] if chroma else None
    print(
        f"\nNDJSON ingest: {args.total} documents x 1 chunk, {args.dimension} dims, cosine, seed {args.seed}; "
        f"Quiver `--fsync {args.fsync}`, one streamed request, {args.batch} lines per HTTP chunk; "
        f"chromadb PersistentClient, collection.add in batches of {args.batch}. "
        f"Goal: >= {GOAL_VECTORS_PER_SECOND:,} vectors/s and >= {GOAL_RATIO:.0f}x chromadb.\n"
    )
    print("| system | encoding | vectors/s | wall s | peak RSS MiB | RSS growth MiB | CPU µs/vector | ratio vs chromadb |")
    print("|---|---|--:|--:|--:|--:|--:|--:|")
    for r in rows:
        rate = r["vectors"] / r["wall_s"]
        ratio = f"{rate / chroma_rate:.2f}x" if chroma_rate else "n/a"
        print(
            f"| {r['system']} | {r['encoding']} | {rate:,.0f} | {r['wall_s']:.2f} | {r['peak_rss_mib']:.0f} | "
            f"{r['delta_rss_mib']:.0f} | {r['cpu_us_per_vector']:.0f} | {ratio} |"
        )
    print(
        "\nvectors/s = vectors / wall time from the first byte sent to the last acknowledgement (Quiver: the summary "
        "line, after fsync) or of all collection.add calls (chromadb). Peak RSS: Quiver = the server's VmHWM; "
        "chromadb = VmHWM of its own process, which also holds the data set; RSS growth = peak minus the "
        "resident size just before the load. CPU µs/vector: the Quiver server's, or the whole chromadb process's."
    )
    for r in rows:
        extra = f", body {r['body_mib']:.0f} MiB" if "body_mib" in r else ""
        print(
            f"- {r['system']} / {r['encoding']}: data dir {r['data_mib']:.0f} MiB{extra}, "
            f"load average {r['load'][0]:.2f} -> {r['load'][1]:.2f}"
        )
    for r in rows:
        if r["system"] == "quiver":
            rate = r["vectors"] / r["wall_s"]
            verdict = [f"{rate / GOAL_VECTORS_PER_SECOND:.2f}x of {GOAL_VECTORS_PER_SECOND:,}/s"]
            if chroma_rate:
                verdict.append(f"{rate / chroma_rate:.2f}x chromadb (goal {GOAL_RATIO:.0f}x)")
            met = rate >= GOAL_VECTORS_PER_SECOND and (chroma_rate is None or rate >= GOAL_RATIO * chroma_rate)
            print(f"- goal with {r['encoding']}: {'met' if met else 'not met'} ({'; '.join(verdict)})")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--total", type=int, default=100_000, help="documents (= vectors) per system")
    p.add_argument("--batch", type=int, default=1000, help="chromadb add() batch; NDJSON lines per HTTP chunk")
    p.add_argument("--dimension", type=int, default=384)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--fsync", default="always", help="quiver serve --fsync policy")
    p.add_argument("--encodings", default="b64,json", help="Quiver encodings to run: b64,json")
    p.add_argument("--server-bin", default=os.path.join(ROOT, "target", "release", "quiver"))
    p.add_argument("--data-root", default=None, help="where temporary data directories go")
    p.add_argument("--skip-chroma", action="store_true")
    p.add_argument("--skip-quiver", action="store_true")
    p.add_argument("--chroma-only", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.total < 1 or not 1 <= args.batch <= 5000:
        p.error("--total must be >= 1 and --batch between 1 and 5000")
    if args.chroma_only:
        chroma_only(args)
        return

    rows = []
    if not args.skip_quiver:
        if not os.path.isfile(args.server_bin):
            sys.exit(f"no server binary at {args.server_bin} (cargo build --release -p quiver --bin quiver)")
        t = time.perf_counter()
        data = make_dataset(args.total, args.dimension, args.seed)
        log(f"generated {args.total} documents in {time.perf_counter() - t:.1f} s")
        for encoding in [e.strip() for e in args.encodings.split(",") if e.strip()]:
            if encoding not in ("b64", "json"):
                p.error(f"unknown encoding {encoding!r}")
            rows.append(run_quiver(args, data, encoding))
        del data
    if not args.skip_chroma:
        rows.append(run_chroma(args))
    print_table(args, rows)


if __name__ == "__main__":
    main()
