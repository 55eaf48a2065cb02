"""kNN at scale: query time and recall@1 of the approximate bank index (LanceDB IVF_FLAT, cosine) against exact
search (chunked matmul, the baseline, run in the same process on the same data), for banks of 10^4 ... 10^6
patches.

Banks are clustered like patch tokens (64 centres plus noise); queries are noisy copies of bank vectors, so each has
a planted true neighbour. Recall@1 counts queries whose distance equals the exact nearest distance (IVF_FLAT keeps
raw vectors: a found neighbour's distance is exact). Medians of ``--repeats`` query passes.

    python bench/knn_index.py                       # 1e4, 1e5, 1e6 patches, d = 128, 4096 queries
    python bench/knn_index.py --sizes 10000,100000 --dim 142
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np
import torch

from spg_dist.detectors.knn import ExactIndex
from spg_dist.store import Store, banks


def planted(n: int, d: int, q: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(64, d)).astype(np.float32)
    bank = centres[rng.integers(0, 64, n)] + 0.6 * rng.normal(size=(n, d)).astype(np.float32)
    bank /= np.linalg.norm(bank, axis=1, keepdims=True)
    queries = bank[rng.integers(0, n, q)] + 0.05 * rng.normal(size=(q, d)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    return bank, queries


def timed(fn, repeats: int) -> tuple[float, np.ndarray]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10000,100000,1000000", help="bank sizes (patches), comma-separated")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--queries", type=int, default=4096)
    ap.add_argument("--nprobes", default="8,32", help="nprobes settings to measure, comma-separated")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(2)
    print(f"bank vs exact search: d = {args.dim}, {args.queries} queries, medians of {args.repeats}")
    print(f"{'bank':>9} {'build s':>8} {'exact ms':>9} {'nprobes':>7} {'index ms':>9} {'speed-up':>8} {'recall@1':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(f"{tmp}/store")
        for n in (int(s) for s in args.sizes.split(",")):
            bank, queries = planted(n, args.dim, args.queries)
            exact_index = ExactIndex(bank)
            t_exact, exact = timed(lambda: exact_index.nearest(queries), args.repeats)
            t0 = time.perf_counter()
            index, _ = banks.build(store, bank)
            build = time.perf_counter() - t0
            for nprobes in (int(p) for p in args.nprobes.split(",")):
                index.nprobes = nprobes
                index.nearest(queries[:64])  # load the index once
                t_index, approx = timed(lambda: index.nearest(queries), args.repeats)
                recall = float(np.mean(np.abs(approx - exact) <= 1e-5))
                print(f"{n:>9} {build:>8.1f} {1e3 * t_exact:>9.0f} {nprobes:>7} {1e3 * t_index:>9.0f} "
                      f"{t_exact / t_index:>7.2f}x {recall:>8.3f}", flush=True)


if __name__ == "__main__":
    main()
