"""How the dashboard keeps up with a busy server: headless Chromium on /dashboard while
application events are published at fixed rates.

    bench/.venv/bin/python bench/dashboard_load.py --server-bin target/release/quiver \
        [--rates 1000,10000,30000] [--seconds 10] [--chromium chromium]

Starts `quiver serve --fsync never` on a free port (memory and CPU, not the disk, are measured)
and Chromium on its dashboard, driven over the DevTools protocol (needs `websocket-client`
from PyPI). For each rate, one publisher sends NDJSON batches to POST /v1/events every 10 ms
for --seconds; once a second the script reads the server's head seq (/health) and the page's
last seq (its `state.lastSeq`), and the CPU time of all of Chromium's processes. It then waits
for the page to catch up. Prints one markdown row per rate: the rate reached, the page's lag
behind the head (median and max, in events), the time from the last publish to the page
holding the head, Chromium's CPU (% of one core) and the stream states seen.
"""
import argparse
import http.client
import json
import os
import shutil
import signal
import statistics
import subprocess
import tempfile
import threading
import time
import urllib.request

import websocket  # websocket-client

BATCH_INTERVAL_S = 0.01
CATCH_UP_LIMIT_S = 60
START_LIMIT_S = 30
# DevTools messages skipped while waiting for one reply.
CDP_MESSAGES_SKIPPED_LIMIT = 10_000


class Page:
    def __init__(self, ws_url):
        self.ws = websocket.create_connection(ws_url, timeout=30)
        self.next_id = 1

    def eval(self, expression):
        request_id = self.next_id
        self.next_id += 1
        self.ws.send(json.dumps({"id": request_id, "method": "Runtime.evaluate",
                                 "params": {"expression": expression, "returnByValue": True}}))
        for _ in range(CDP_MESSAGES_SKIPPED_LIMIT):
            reply = json.loads(self.ws.recv())
            if reply.get("id") == request_id:
                return reply["result"]["result"].get("value")
        raise RuntimeError(f"no DevTools reply among {CDP_MESSAGES_SKIPPED_LIMIT} messages")


def cpu_seconds(group):
    """utime + stime of every process in the process group `group`."""
    total = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == group:  # pgrp
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def health_seq(host, port):
    conn = http.client.HTTPConnection(host, port, timeout=10)
    conn.request("GET", "/health")
    seq = json.loads(conn.getresponse().read())["seq"]
    conn.close()
    return seq


def publish(host, port, rate, seconds, sent):
    per_batch = max(1, round(rate * BATCH_INTERVAL_S))
    conn = http.client.HTTPConnection(host, port, timeout=30)
    deadline = time.monotonic() + seconds
    next_at = time.monotonic()
    while time.monotonic() < deadline:
        body = "".join(json.dumps({"type": "app.load", "data": {"i": sent[0] + i}}) + "\n"
                       for i in range(per_batch))
        conn.request("POST", "/v1/events", body, {"content-type": "application/x-ndjson"})
        conn.getresponse().read()
        sent[0] += per_batch
        next_at += BATCH_INTERVAL_S
        pause = next_at - time.monotonic()
        if pause > 0:
            time.sleep(pause)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server-bin", required=True)
    parser.add_argument("--chromium", default="chromium")
    parser.add_argument("--rates", default="1000,10000,30000")
    parser.add_argument("--seconds", type=int, default=10)
    args = parser.parse_args()
    data = tempfile.mkdtemp(prefix="quiver-dash-")
    profile = tempfile.mkdtemp(prefix="quiver-dash-profile-")
    server = subprocess.Popen([args.server_bin, "serve", "--addr", "127.0.0.1:0", "--data-dir", data,
                               "--fsync", "never"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    browser = None
    try:
        url = server.stdout.readline().strip().rsplit(" ", 1)[1]
        host, port = url.replace("http://", "").split(":")
        port = int(port)
        browser = subprocess.Popen([args.chromium, "--headless", "--no-sandbox", "--disable-gpu",
                                    "--disable-dev-shm-usage", "--no-first-run", "--remote-debugging-port=0",
                                    f"--user-data-dir={profile}", url + "/dashboard"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        started = time.monotonic()
        port_file = os.path.join(profile, "DevToolsActivePort")
        while not (os.path.exists(port_file) and open(port_file).read().strip()):
            assert time.monotonic() - started < START_LIMIT_S, "chromium did not start"
            time.sleep(0.1)
        devtools = int(open(port_file).read().split()[0])
        ws_url = None
        while ws_url is None:
            assert time.monotonic() - started < START_LIMIT_S, "chromium did not list the page"
            targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{devtools}/json/list"))
            ws_url = next((t["webSocketDebuggerUrl"] for t in targets
                           if t["type"] == "page" and t["url"].startswith(url)), None)
            time.sleep(0.1)
        page = Page(ws_url)
        while page.eval("document.getElementById('stream-state').dataset.state") != "live":
            assert time.monotonic() - started < START_LIMIT_S, "the page did not go live"
            time.sleep(0.1)
        print("| target events/s | reached events/s | page lag median / max (events) | "
              "catch-up after the last publish (s) | Chromium CPU (% of a core) | stream states seen |")
        print("|--:|--:|--:|--:|--:|---|")
        for rate in [int(r) for r in args.rates.split(",")]:
            sent = [0]
            publisher = threading.Thread(target=publish, args=(host, port, rate, args.seconds, sent))
            cpu_before, t_before = cpu_seconds(browser.pid), time.monotonic()
            publisher.start()
            lags, states = [], set()
            while publisher.is_alive():
                time.sleep(1)
                head = health_seq(host, port)
                page_seq = page.eval("state.lastSeq")
                # The head is read first, so the page can be ahead of it by the events in between.
                lags.append(max(0, head - page_seq))
                states.add(page.eval("document.getElementById('stream-state').dataset.state"))
            publisher.join()
            published_at = time.monotonic()
            head = health_seq(host, port)
            while page.eval("state.lastSeq") < head:
                assert time.monotonic() - published_at < CATCH_UP_LIMIT_S, "the page did not catch up"
                states.add(page.eval("document.getElementById('stream-state').dataset.state"))
                time.sleep(0.05)
            catch_up = time.monotonic() - published_at
            cpu = (cpu_seconds(browser.pid) - cpu_before) / (time.monotonic() - t_before) * 100
            print(f"| {rate:,} | {sent[0] / args.seconds:,.0f} | {statistics.median(lags):,.0f} / {max(lags):,} | "
                  f"{catch_up:.2f} | {cpu:.0f} | {', '.join(sorted(states))} |", flush=True)
    finally:
        if browser is not None:
            os.killpg(browser.pid, signal.SIGKILL)
            browser.wait()
        server.terminate()
        server.wait()
        shutil.rmtree(data, ignore_errors=True)
        shutil.rmtree(profile, ignore_errors=True)


if __name__ == "__main__":
    main()
