"""End-to-end text ingest over NDJSON: documents/s through `quiver serve` with the default
local model (`local:all-minilm-l6-v2`) embedding every text on the server.

    ingest_text.py --server-bin PATH --model-dir DIR --sentences FILE
                   [--docs 5000] [--texts-per-doc 2] [--clients 2] [--lines-per-request 250]

Starts the release server on a temporary data directory (`--addr 127.0.0.1:0`, fsync
always, `--no-model-install`), creates a library with no dimension (so the default model),
builds NDJSON bodies of documents with `texts` only (from the sentences file, before the
clock starts), posts them from `--clients` threads to `POST /v1/libraries/bench/documents/
stream`, and checks every status line is ok and the library then holds every document.
Prints one JSON line: documents/s, texts/s, wall seconds, the server's CPU seconds. Standard
library only.
"""
import argparse
import http.client
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time


def request(port, method, path, body=None, timeout=3600):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    c.request(method, path, body=body, headers={"content-type": "application/json"})
    r = c.getresponse()
    data = r.read()
    c.close()
    return r.status, data


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / tick


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--server-bin", required=True)
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--sentences", required=True)
    ap.add_argument("--docs", type=int, default=5000)
    ap.add_argument("--texts-per-doc", type=int, default=2)
    ap.add_argument("--clients", type=int, default=2)
    ap.add_argument("--lines-per-request", type=int, default=250)
    a = ap.parse_args()
    sentences = open(a.sentences).read().splitlines()
    if not sentences:
        sys.exit("no sentences")
    data_dir = tempfile.mkdtemp(prefix="quiver-ingest-text-")
    server = subprocess.Popen(
        [a.server_bin, "serve", "--addr", "127.0.0.1:0", "--data-dir", data_dir,
         "--model-dir", a.model_dir, "--no-model-install"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = server.stdout.readline()
        m = re.search(r"http://127\.0\.0\.1:(\d+)", line)
        if not m:
            sys.exit(f"server did not announce its port: {line!r}")
        port = int(m.group(1))
        status, body = request(port, "POST", "/v1/libraries", json.dumps({"name": "bench"}))
        if status != 201:
            sys.exit(f"create library: {status} {body[:300]!r}")
        lib = json.loads(body)
        # Warm-up (loads the model; not timed): one document, deleted from the count below.
        warm = json.dumps({"id": "warm", "texts": ["warm up the model"]}) + "\n"
        status, body = request(port, "POST", "/v1/libraries/bench/documents/stream", warm)
        if status != 200 or b'"ok":false' in body:
            sys.exit(f"warm-up: {status} {body[:300]!r}")
        lines = []
        k = 0
        for d in range(a.docs):
            texts = [sentences[(k + j) % len(sentences)] for j in range(a.texts_per_doc)]
            k += a.texts_per_doc
            lines.append(json.dumps({"id": f"d{d}", "title": f"doc {d}", "texts": texts}))
        bodies = ["\n".join(lines[i:i + a.lines_per_request]) + "\n"
                  for i in range(0, len(lines), a.lines_per_request)]
        errors = []
        next_body = [0]
        lock = threading.Lock()

        def client():
            while True:
                with lock:
                    i = next_body[0]
                    next_body[0] += 1
                if i >= len(bodies):
                    return
                status, body = request(port, "POST", "/v1/libraries/bench/documents/stream", bodies[i])
                out = [json.loads(x) for x in body.splitlines() if x.strip()]
                bad = [x for x in out if "summary" not in x and not x.get("ok")]
                if status != 200 or bad:
                    errors.append((status, bad[:2]))

        cpu0 = cpu_seconds(server.pid)
        t0 = time.perf_counter()
        threads = [threading.Thread(target=client) for _ in range(a.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        cpu = cpu_seconds(server.pid) - cpu0
        if errors:
            sys.exit(f"{len(errors)} requests failed, e.g. {errors[0]}")
        status, body = request(port, "GET", "/v1/libraries/bench")
        info = json.loads(body)
        if info.get("num_documents") != a.docs + 1:
            sys.exit(f"library holds {info.get('num_documents')} documents, expected {a.docs + 1}")
        print(json.dumps({
            "side": "quiver serve (NDJSON, texts)", "model": lib.get("embedding_model"),
            "documents": a.docs, "texts_per_doc": a.texts_per_doc, "clients": a.clients,
            "lines_per_request": a.lines_per_request, "seconds": round(wall, 3),
            "documents_per_s": round(a.docs / wall, 1),
            "texts_per_s": round(a.docs * a.texts_per_doc / wall, 1),
            "server_cpu_s": round(cpu, 2)}), flush=True)
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
