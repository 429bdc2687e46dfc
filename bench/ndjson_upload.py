"""One streaming NDJSON upload to a Quiver route, for the bench scripts that ingest this way
(`ndjson_vs_chroma.py`, `hnsw_startup.py`).

It owns the transport only: a chunked POST whose body chunks the caller renders, sent on one
thread while another reads the per-line replies as they come and counts them. It never retries
and never interprets the rows; the caller checks the counts and the summary against what it
sent.
"""

import http.client
import json
import threading
import time


def upload(host, port, path, chunks, timeout=3600, progress=None):
    """POSTs `chunks` (bytes already framed for `Transfer-Encoding: chunked`, ending with the
    zero chunk) to `path` as `application/x-ndjson`.

    Returns a dict: `seconds` (from the first byte sent to the summary line), `ok` and `failed`
    (reply lines), `first_error` (the first failed reply line, or None) and `summary` (the
    summary line's object). Raises RuntimeError if the request fails or no summary comes.
    `progress(state, elapsed_seconds)`, if given, is called every 30 s while replies arrive.
    """
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    conn.putrequest("POST", path, skip_accept_encoding=True)
    conn.putheader("Content-Type", "application/x-ndjson")
    conn.putheader("Transfer-Encoding", "chunked")
    state = {"ok": 0, "failed": 0, "first_error": None, "summary": None, "end": None, "error": None}

    def reader():
        try:
            resp = conn.getresponse()
            if resp.status != 200:
                state["error"] = f"the stream answered {resp.status}: {resp.read()[:500]!r}"
                return
            rest = b""
            while True:
                data = resp.read1(1 << 20)
                if not data:
                    break
                data = rest + data
                cut = data.rfind(b"\n") + 1
                done, rest = data[:cut], data[cut:]
                state["ok"] += done.count(b'"ok":true')
                bad = done.count(b'"ok":false')
                if bad:
                    state["failed"] += bad
                    if state["first_error"] is None:
                        at = done.find(b'"ok":false')
                        start = done.rfind(b"\n", 0, at) + 1
                        state["first_error"] = done[start : done.find(b"\n", at)].decode()
                at = done.find(b'{"summary"')
                if at >= 0:
                    state["end"] = time.perf_counter()
                    state["summary"] = json.loads(done[at : done.find(b"\n", at)])["summary"]
            if rest.strip():
                state["error"] = f"unterminated reply line: {rest[:200]!r}"
        except Exception as e:  # reported below
            state["error"] = f"reading replies failed: {e!r}"

    def sender():
        try:
            for chunk in chunks:
                conn.sock.sendall(chunk)
        except OSError as e:
            state["error"] = state["error"] or f"sending failed: {e!r}"

    conn.endheaders()
    started = time.perf_counter()
    threads = [threading.Thread(target=reader), threading.Thread(target=sender)]
    for t in threads:
        t.start()
    while threads[0].is_alive():
        threads[0].join(timeout=30)
        if progress is not None and threads[0].is_alive():
            progress(state, time.perf_counter() - started)
    threads[1].join()
    conn.close()
    if state["error"]:
        raise RuntimeError(state["error"])
    if state["summary"] is None:
        raise RuntimeError("the stream ended without a summary line")
    return {"seconds": state["end"] - started, "ok": state["ok"], "failed": state["failed"],
            "first_error": state["first_error"], "summary": state["summary"]}
