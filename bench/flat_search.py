#!/usr/bin/env python3
"""Single-threaded exact search: quiver-index FlatIndex vs faiss IndexFlatIP.

Run through bench/flat_search.sh, which installs faiss-cpu and numpy if missing and builds
the Rust example first. This script:
  1. generates ROWS x DIM random unit vectors and QUERIES queries with a fixed seed (numpy) and
     writes them as raw little-endian f32 files under bench/data/ (gitignored);
  2. times faiss IndexFlatIP with one OpenMP thread, one query per search call, top-k;
  3. runs the Rust example (crates/index/examples/flat_bench.rs) on the same files, metric dot;
     steps 2 and 3 alternate for --rounds rounds and latencies are pooled;
  4. checks the top-k ids agree (recall vs faiss, tie-aware) and prints median / p99 latency
     for both and the quiver/faiss ratio.
Latency statistics use the same nearest-rank percentiles for both sides.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import time

import faiss
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def percentile_ms(latencies_ms, fraction):
    ordered = sorted(latencies_ms)
    rank = max(1, min(len(ordered), math.ceil(fraction * len(ordered))))
    return ordered[rank - 1]


def dataset(rows, dim, nq, seed, data_dir):
    """Returns (base_path, queries_path, base, queries); regenerates files only if stale."""
    os.makedirs(data_dir, exist_ok=True)
    stem = f"flat_{rows}x{dim}_q{nq}_seed{seed}"
    base_path = os.path.join(data_dir, stem + ".base.f32")
    queries_path = os.path.join(data_dir, stem + ".queries.f32")
    want_sizes = (rows * dim * 4, nq * dim * 4)
    fresh = all(os.path.exists(p) for p in (base_path, queries_path)) and (
        os.path.getsize(base_path),
        os.path.getsize(queries_path),
    ) == want_sizes
    if not fresh:
        rng = np.random.default_rng(seed)
        base = rng.standard_normal((rows, dim), dtype=np.float32)
        base /= np.linalg.norm(base, axis=1, keepdims=True)
        queries = rng.standard_normal((nq, dim), dtype=np.float32)
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        base.astype("<f4").tofile(base_path)
        queries.astype("<f4").tofile(queries_path)
    base = np.fromfile(base_path, dtype="<f4").reshape(rows, dim)
    queries = np.fromfile(queries_path, dtype="<f4").reshape(nq, dim)
    return base_path, queries_path, base, queries


def faiss_index(base):
    faiss.omp_set_num_threads(1)
    index = faiss.IndexFlatIP(base.shape[1])
    index.add(base)
    return index


def time_faiss(index, queries, k, warmup):
    singles = [np.ascontiguousarray(queries[i : i + 1]) for i in range(len(queries))]
    for q in singles[:warmup]:
        index.search(q, k)
    latencies_ms, ids, scores = [], [], []
    for q in singles:
        start = time.perf_counter()
        distances, labels = index.search(q, k)
        latencies_ms.append((time.perf_counter() - start) * 1e3)
        ids.append(labels[0].tolist())
        scores.append(distances[0].tolist())
    return latencies_ms, ids, scores


def run_quiver(binary, base_path, queries_path, dim, k, warmup):
    completed = subprocess.run(
        [binary, "--base", base_path, "--queries", queries_path, "--dimension", str(dim),
         "--k", str(k), "--metric", "dot", "--warmup", str(warmup)],
        check=True, capture_output=True, text=True,
    )
    return json.loads(completed.stdout)


def recall(quiver_ids, quiver_distances, faiss_ids, faiss_scores, k):
    """Fraction of faiss's top-k ids that quiver returned; a missing id whose score ties the
    k-th score (within 1e-6) with the id quiver returned instead counts as found."""
    found = 0
    exact_queries = 0
    for q_ids, q_dist, f_ids, f_scores in zip(quiver_ids, quiver_distances, faiss_ids, faiss_scores):
        hits = len(set(q_ids) & set(f_ids))
        if hits == k:
            exact_queries += 1
        else:
            kth = f_scores[-1]
            extra = [d for i, d in zip(q_ids, q_dist) if i not in f_ids]
            hits += sum(1 for d in extra if abs(-d - kth) <= 1e-6)
        found += hits
    return found / (k * len(faiss_ids)), exact_queries


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--binary", required=True, help="path to the flat_bench example")
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3, help="alternating faiss/quiver rounds")
    parser.add_argument("--data-dir", default=os.path.join(HERE, "data"))
    args = parser.parse_args()

    print(f"dataset: {args.rows} x {args.dim} f32 unit vectors, {args.queries} queries, "
          f"k={args.k}, seed={args.seed}", flush=True)
    base_path, queries_path, base, queries = dataset(args.rows, args.dim, args.queries, args.seed, args.data_dir)

    # Rounds alternate faiss and quiver so that load from other processes on a shared
    # machine falls on both alike; latencies are pooled over rounds.
    index = faiss_index(base)
    del base
    faiss_ms, quiver_ms = [], []
    for round_index in range(args.rounds):
        round_faiss_ms, faiss_ids, faiss_scores = time_faiss(index, queries, args.k, args.warmup)
        quiver = run_quiver(args.binary, base_path, queries_path, args.dim, args.k, args.warmup)
        faiss_ms += round_faiss_ms
        quiver_ms += quiver["latencies_ms"]
        print(f"round {round_index + 1}/{args.rounds}: median faiss {percentile_ms(round_faiss_ms, 0.5):.3f} ms, "
              f"quiver {percentile_ms(quiver['latencies_ms'], 0.5):.3f} ms", flush=True)

    rec, exact_queries = recall(quiver["ids"], quiver["distances"], faiss_ids, faiss_scores, args.k)
    rows = [
        ("faiss IndexFlatIP (1 thread)", percentile_ms(faiss_ms, 0.5), percentile_ms(faiss_ms, 0.99)),
        (f"quiver FlatIndex ({quiver['backend']})", percentile_ms(quiver_ms, 0.5), percentile_ms(quiver_ms, 0.99)),
    ]
    print()
    print(f"faiss {faiss.__version__}; quiver kernels: {quiver['backend']}; "
          f"quiver load {quiver['load_ms']:.0f} ms, index memory {quiver['memory_bytes'] / 2**20:.1f} MiB")
    print()
    print(f"{len(faiss_ms)} timed queries per engine, pooled over {args.rounds} rounds")
    print(f"{'engine':<34} {'median ms':>10} {'p99 ms':>10}")
    for name, median, p99 in rows:
        print(f"{name:<34} {median:>10.3f} {p99:>10.3f}")
    print(f"{'ratio quiver/faiss':<34} {rows[1][1] / rows[0][1]:>10.3f} {rows[1][2] / rows[0][2]:>10.3f}")
    print()
    print(f"recall@{args.k} vs faiss: {rec:.4f} ({exact_queries}/{len(faiss_ids)} queries with identical id sets)")
    if rec < 0.999:
        print("WARNING: results disagree with faiss beyond ties", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
