"""Server memory after an ingest: the RSS of a fresh `quiver serve` before and after N one-chunk
documents with D-dimensional JSON vectors.

    python3 bench/ingest_rss.py <quiver binary> <N> <D> [--route stream|batch]

Starts the binary on a free port with a temporary data directory (`--fsync never`: memory,
not disk, is measured), creates a flat library of dimension D, sends the documents (random
vectors, a fixed seed) either as one NDJSON stream or as batches of 1,000 through the JSON
batch route, waits a second, prints one line with both RSS readings (MiB, from
/proc/<pid>/status) and the server's last reply, then stops the server. Standard library only.
"""
import argparse
import http.client
import json
import random
import shutil
import subprocess
import tempfile
import time

BATCH_DOCUMENTS = 1000


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) // 1024
    raise RuntimeError("no VmRSS line")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("binary")
    parser.add_argument("n", type=int)
    parser.add_argument("d", type=int)
    parser.add_argument("--route", choices=["stream", "batch"], default="batch")
    args = parser.parse_args()
    data = tempfile.mkdtemp(prefix="quiver-rss-")
    server = subprocess.Popen(
        [args.binary, "serve", "--addr", "127.0.0.1:0", "--data-dir", data, "--fsync", "never"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        url = server.stdout.readline().strip().rsplit(" ", 1)[1]
        host, port = url.replace("http://", "").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=600)
        conn.request("POST", "/v1/libraries", json.dumps({"name": "m", "dimension": args.d}),
                     {"content-type": "application/json"})
        conn.getresponse().read()
        rng = random.Random(7)
        lines = [json.dumps({"title": f"t{i}", "chunks": [
            {"text": "x", "embedding": [round(rng.uniform(-1, 1), 6) for _ in range(args.d)]}]})
            for i in range(args.n)]
        before = rss_mib(server.pid)
        if args.route == "batch":
            for i in range(0, args.n, BATCH_DOCUMENTS):
                body = '{"documents": [' + ",".join(lines[i:i + BATCH_DOCUMENTS]) + "]}"
                conn.request("POST", "/v1/libraries/m/documents/batch", body,
                             {"content-type": "application/json"})
                reply = conn.getresponse().read().decode()
                assert '"failed":0' in reply, reply[:300]
            last = "batches of %d, all committed" % BATCH_DOCUMENTS
        else:
            body = ("\n".join(lines) + "\n").encode()
            conn.request("POST", "/v1/libraries/m/documents/stream", body,
                         {"content-type": "application/x-ndjson"})
            last = conn.getresponse().read().decode().strip().splitlines()[-1]
        time.sleep(1)
        print(f"n={args.n} d={args.d} route={args.route} rss_before_mib={before} "
              f"rss_after_mib={rss_mib(server.pid)} ({last})")
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(data, ignore_errors=True)


if __name__ == "__main__":
    main()
