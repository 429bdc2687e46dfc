#!/usr/bin/env python3
"""HNSW benchmark: quiver HnswIndex vs hnswlib vs faiss IndexHNSWFlat, single-threaded.

Generates a dataset once (bench/data/<name>/{base.f32,queries.f32,truth.u32}, exact top-k
ground truth by numpy), then in one run builds each engine with the same m and
ef_construction, times the build, sweeps ef over all queries (median QPS of --rounds passes,
recall@k of the first), and prints per-engine sweeps plus the QPS at recall 0.90/0.95/0.99
(the smallest ef in the sweep reaching the level). Builds run one after another; the sweeps
are interleaved (for each ef and round, one pass per engine) so load on the shared machine
hits every engine alike. quiver runs as a child process of the release example `hnsw_bench`
(one query per call, in Rust); the peers get every query in one call with one thread (their
per-query Python overhead is not counted). Results also go to
bench/data/<name>/results-<utc>.json.
"""
import argparse
import datetime
import json
import os
import subprocess
import sys
import time

import numpy as np

DATASETS = {
    # name: (rows, dimension, metric, latent dimension)
    "text100k": (100_000, 384, "cosine", 96),
    "sift1m": (1_000_000, 128, "l2", 32),
    "small": (20_000, 64, "cosine", 16),
}
LEVELS = (0.90, 0.95, 0.99)


def sample(rng, n, dimension, centers, projection, normalise):
    """Clustered points with low intrinsic dimension: z = center + noise in latent space,
    x = z·W + isotropic noise; unit-normalised for cosine, shifted non-negative for L2."""
    latent = centers.shape[1]
    labels = rng.integers(len(centers), size=n)
    z = centers[labels] + 0.6 * rng.standard_normal((n, latent)).astype(np.float32)
    x = z @ projection + 0.5 * rng.standard_normal((n, dimension)).astype(np.float32)
    if normalise:
        x /= np.linalg.norm(x, axis=1, keepdims=True)
    else:
        x = np.maximum(x * 20.0 + 30.0, 0.0)  # SIFT-like: non-negative, spread out
    return x.astype(np.float32)


def generate(name, directory, queries, k_truth):
    rows, dimension, metric, latent = DATASETS[name]
    os.makedirs(directory, exist_ok=True)
    paths = {p: os.path.join(directory, p) for p in ("base.f32", "queries.f32", "truth.u32")}
    if all(os.path.exists(p) for p in paths.values()):
        return paths
    print(f"generating {name}: {rows} x {dimension} ({metric})", file=sys.stderr)
    rng = np.random.default_rng(42)
    centers = rng.standard_normal((1000, latent)).astype(np.float32)
    projection = (rng.standard_normal((latent, dimension)) / np.sqrt(latent)).astype(np.float32)
    normalise = metric == "cosine"
    base = np.concatenate(
        [sample(rng, min(100_000, rows - s), dimension, centers, projection, normalise)
         for s in range(0, rows, 100_000)]
    )
    query = sample(rng, queries, dimension, centers, projection, normalise)
    truth = np.empty((queries, k_truth), dtype=np.uint32)
    base_norms = (base * base).sum(axis=1)
    for s in range(0, queries, 100):
        q = query[s:s + 100]
        if normalise:
            score = -(q @ base.T)
        else:
            score = base_norms[None, :] - 2.0 * (q @ base.T)
        part = np.argpartition(score, k_truth, axis=1)[:, :k_truth]
        order = np.take_along_axis(score, part, axis=1).argsort(axis=1, kind="stable")
        truth[s:s + 100] = np.take_along_axis(part, order, axis=1)
    base.tofile(paths["base.f32"])
    query.tofile(paths["queries.f32"])
    truth.tofile(paths["truth.u32"])
    return paths


def recall_of(labels, truth, k):
    hits = sum(len(set(labels[i, :k].tolist()) & set(truth[i, :k].tolist()))
               for i in range(len(truth)))
    return hits / (len(truth) * k)


class Peer:
    """A built peer index; `run(ef)` times one pass over all queries in one call."""

    def __init__(self, name, build_seconds, search, queries, truth, k):
        self.result = {"engine": name,
                       "build_seconds": None if build_seconds is None else round(build_seconds, 3)}
        self.search, self.queries, self.truth, self.k = search, queries, truth, k

    def run(self, ef):
        started = time.perf_counter()
        labels = self.search(ef)
        qps = len(self.queries) / (time.perf_counter() - started)
        return recall_of(labels, self.truth, self.k), qps

    def close(self):
        pass


def build_hnswlib(base, queries, truth, metric, args):
    import hnswlib
    index = hnswlib.Index(space="cosine" if metric == "cosine" else "l2", dim=base.shape[1])
    cache = os.path.join(args.data_dir, args.dataset, "hnswlib.bin")
    if args.hnswlib_cache and os.path.exists(cache):
        index.load_index(cache, max_elements=len(base))
        build = None
    else:
        index.init_index(max_elements=len(base), ef_construction=args.ef_construction, M=args.m,
                         random_seed=100)
        index.set_num_threads(1)
        started = time.perf_counter()
        index.add_items(base, np.arange(len(base)), num_threads=1)
        build = time.perf_counter() - started
        if args.hnswlib_cache:
            index.save_index(cache)
    index.set_num_threads(1)

    def search(ef):
        index.set_ef(ef)
        return index.knn_query(queries, k=args.k, num_threads=1)[0]

    return Peer("hnswlib", build, search, queries, truth, args.k)


def build_faiss(base, queries, truth, metric, args):
    import faiss
    faiss.omp_set_num_threads(1)
    kind = faiss.METRIC_INNER_PRODUCT if metric == "cosine" else faiss.METRIC_L2
    index = faiss.IndexHNSWFlat(base.shape[1], args.m, kind)
    index.hnsw.efConstruction = args.ef_construction
    started = time.perf_counter()
    index.add(base)
    build = time.perf_counter() - started

    def search(ef):
        index.hnsw.efSearch = ef
        return index.search(queries, args.k)[1]

    return Peer(f"faiss IndexHNSWFlat {faiss.__version__}", build, search, queries, truth, args.k)


class Quiver:
    """The Rust example as a child process: it builds, reports, then serves `ef N` passes."""

    def __init__(self, paths, dimension, metric, args, int8=None, baseline=False, m0=None):
        binary = args.baseline_binary if baseline else args.binary
        command = [binary, "--base", paths["base.f32"], "--queries", paths["queries.f32"],
                   "--truth", paths["truth.u32"], "--dimension", str(dimension), "--metric",
                   metric, "--k", str(args.k), "--m", str(args.m), "--ef-construction",
                   str(args.ef_construction)]
        if int8 is not None:
            command += ["--int8", str(int8)]
        if m0 is not None:
            command += ["--m0", str(m0)]
        if args.graph_file:
            # Written after the build and read back from disk (timed, fully validated); a
            # stale file would skip the build, so it goes first.
            name = "graph-int8" if int8 is not None else "graph"
            path = os.path.join(args.data_dir, args.dataset,
                                name + (f"-m0-{m0}" if m0 is not None else "") + ".bin")
            if baseline:
                # A baseline build reads the graph the current build just wrote (the format
                # is the same), so the two differ only in code, not in the graph searched.
                if not os.path.exists(path):
                    suffix = f"/m0={m0}" if m0 is not None else ""
                    raise SystemExit(f"{path} missing: list quiver{'-int8' if int8 else ''}"
                                     f"{suffix} before its baseline in --engines")
            elif os.path.exists(path) and not args.reuse_graph:
                os.remove(path)
            command += ["--graph", path]
        elif baseline:
            raise SystemExit("baseline engines need --graph-file: they search the graph file "
                             "the current build wrote")
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        text=True, bufsize=1)
        line = self.process.stdout.readline()
        if not line:
            raise SystemExit("hnsw_bench exited during the build")
        self.result = json.loads(line)
        self.result["engine"] = "quiver HnswIndex" + (
            f" int8 (rescore, oversampling {int8})" if int8 else "") + (
            f" m0={m0}" if m0 is not None else "") + (
            " (baseline build)" if baseline else "")

    def run(self, ef):
        self.process.stdin.write(f"ef {ef}\n")
        self.process.stdin.flush()
        point = json.loads(self.process.stdout.readline())
        return point["recall"], point["qps"]

    def close(self):
        self.process.stdin.close()
        self.process.wait()


def at_levels(sweep):
    """QPS at the smallest swept ef whose recall reaches each level (None if none does)."""
    out = {}
    for level in LEVELS:
        reaching = [p for p in sweep if p["recall"] >= level]
        out[level] = min(reaching, key=lambda p: p["ef"]) if reaching else None
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset", default="text100k", choices=sorted(DATASETS))
    parser.add_argument("--data-dir", default="bench/data")
    parser.add_argument("--binary", required=True)
    parser.add_argument("--m", type=int, default=16)
    parser.add_argument("--ef-construction", type=int, default=200)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ef", default="10,16,24,32,48,64,96,128,192,256,384,512,768")
    parser.add_argument("--engines", default="quiver,hnswlib,faiss,quiver-int8",
                        help="comma-separated; a quiver engine may end in /m0=N, its level-0 "
                             "degree (default 2m), e.g. quiver-int8/m0=16")
    parser.add_argument("--oversampling", type=float, default=3.0)
    parser.add_argument("--graph-file", action="store_true",
                        help="quiver: save the graph to a file and time reading it back")
    parser.add_argument("--reuse-graph", action="store_true",
                        help="with --graph-file: load a graph file left by an earlier run "
                             "instead of building (no build time; start-up time only)")
    parser.add_argument("--baseline-binary",
                        help="engines quiver-baseline / quiver-int8-baseline: this hnsw_bench "
                             "(e.g. built from the previous commit) loads the graph file the "
                             "current build wrote, so a code change is measured on one graph")
    parser.add_argument("--hnswlib-cache", action="store_true",
                        help="hnswlib: load bench/data/<dataset>/hnswlib.bin if present "
                             "(no build time), else build and save it")
    args = parser.parse_args()

    rows, dimension, metric, _ = DATASETS[args.dataset]
    directory = os.path.join(args.data_dir, args.dataset)
    paths = generate(args.dataset, directory, args.queries, 100)
    base = np.fromfile(paths["base.f32"], dtype=np.float32).reshape(-1, dimension)
    queries = np.fromfile(paths["queries.f32"], dtype=np.float32).reshape(-1, dimension)
    truth = np.fromfile(paths["truth.u32"], dtype=np.uint32).reshape(len(queries), -1)
    efs = [int(e) for e in args.ef.split(",")]

    # Builds one after another (each alone on the machine, as far as this script goes) ...
    engines = []
    for spec in args.engines.split(","):
        print(f"building {spec} on {args.dataset} ...", file=sys.stderr, flush=True)
        # A quiver engine may name its level-0 degree: `quiver-int8/m0=16` (default 2m).
        engine, _, option = spec.partition("/m0=")
        m0 = int(option) if option else None
        if m0 is not None and not engine.startswith("quiver"):
            raise SystemExit(f"{spec}: /m0= is for quiver engines")
        if engine == "quiver":
            engines.append(Quiver(paths, dimension, metric, args, m0=m0))
        elif engine == "quiver-int8":
            engines.append(Quiver(paths, dimension, metric, args, args.oversampling, m0=m0))
        elif engine in ("quiver-baseline", "quiver-int8-baseline"):
            if not args.baseline_binary:
                raise SystemExit(f"{engine} needs --baseline-binary")
            int8 = args.oversampling if engine == "quiver-int8-baseline" else None
            engines.append(Quiver(paths, dimension, metric, args, int8, baseline=True, m0=m0))
        elif engine == "hnswlib":
            engines.append(build_hnswlib(base, queries, truth, metric, args))
        elif engine == "faiss":
            engines.append(build_faiss(base, queries, truth, metric, args))
        else:
            raise SystemExit(f"unknown engine {engine}")
        print(json.dumps(engines[-1].result), file=sys.stderr, flush=True)

    # ... then sweeps interleaved pass by pass, so machine noise hits every engine alike.
    passes = {id(e): {ef: [] for ef in efs} for e in engines}
    recalls = {id(e): {} for e in engines}
    for ef in efs:
        for _ in range(args.rounds):
            for e in engines:
                recall, qps = e.run(ef)
                passes[id(e)][ef].append(qps)
                recalls[id(e)].setdefault(ef, recall)
        print(f"ef {ef}: " + ", ".join(
            f"{e.result['engine']} {recalls[id(e)][ef]:.4f}/{sorted(passes[id(e)][ef])[args.rounds // 2]:.0f}"
            for e in engines), file=sys.stderr, flush=True)
    results = []
    for e in engines:
        e.close()
        e.result["sweep"] = [
            {"ef": ef, "recall": round(recalls[id(e)][ef], 5),
             "qps": round(sorted(passes[id(e)][ef])[args.rounds // 2], 1)} for ef in efs]
        results.append(e.result)

    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H%MZ")
    with open(os.path.join(directory, f"results-{stamp}.json"), "w") as f:
        json.dump({"dataset": args.dataset, "args": vars(args), "results": results}, f, indent=1)

    print(f"\n{args.dataset}: {rows} x {dimension} {metric}, {len(queries)} queries, k={args.k}, "
          f"m={args.m}, ef_construction={args.ef_construction}, 1 thread, {stamp}\n")
    header = "| engine | build s | " + " | ".join(f"QPS @ {l:.2f} (ef)" for l in LEVELS) + " | memory MB |"
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    for r in results:
        cells = []
        for level, point in at_levels(r["sweep"]).items():
            cells.append("not reached" if point is None else f"{point['qps']:.0f} ({point['ef']})")
        memory = f"{r['memory_bytes'] / 1e6:.1f}" if "memory_bytes" in r else ""
        build = "—" if r.get("build_seconds") is None else f"{r['build_seconds']:.1f}"
        print(f"| {r['engine']} | {build} | " + " | ".join(cells) + f" | {memory} |")
    for r in results:
        if "load_seconds" in r:
            where = "its file" if args.graph_file else "memory"
            print(f"\n{r['engine']}: {r['memory_bytes']} memory bytes, link bits {r.get('link_bits')}; "
                  f"saved {r['saved_bytes'] / 1e6:.1f} MB in {r['save_seconds']:.2f} s, read back "
                  f"from {where} with full validation in {r['load_seconds']:.2f} s")
    print("\nsweeps (ef: recall / QPS):")
    for r in results:
        print(f"- {r['engine']}: " + ", ".join(
            f"{p['ef']}: {p['recall']:.4f} / {p['qps']:.0f}" for p in r["sweep"]))


if __name__ == "__main__":
    main()
