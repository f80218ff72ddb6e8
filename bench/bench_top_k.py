"""Top-k selection per row on the GPU at the shapes the branch-and-bound search uses: the search's
former ``_top_k`` (CuPy's argpartition, which sorts whole rows with Thrust, then a sort of the k
kept), one full row sort (argsort), and the fused kernel ``top_k_kernel.top_k_gpu`` that ``_top_k``
now uses (issue 12/17: a device profile of local refinement put most of the search's host time
in CuPy's argpartition).

    python bench/bench_top_k.py --out bench/results/top_k_gpu.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

from cryocv.top_k_kernel import top_k_gpu  # noqa: E402

SHAPES = [(4096, 4608, 32), (4096, 256, 32), (4096, 256, 16), (4096, 128, 8), (4096, 64, 4), (4096, 33, 32),
          (1024, 256, 32)]


def former_top_k(scores, k):
    import cupy as cp
    idx = cp.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = cp.argsort(-cp.take_along_axis(scores, idx, axis=1), axis=1)
    return cp.take_along_axis(idx, order, axis=1)


def sorted_top_k(scores, k):
    import cupy as cp
    return cp.argsort(-scores, axis=1)[:, :k]


def timed(fn, repeats=20):
    import cupy as cp
    fn()
    cp.cuda.Device().synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    cp.cuda.Device().synchronize()
    return (time.perf_counter() - start) / repeats * 1e3


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    import cupy as cp
    rows = []
    for b, length, k in SHAPES:
        scores = cp.asarray(np.random.default_rng(0).standard_normal((b, length)).astype(np.float32))
        same = bool(cp.all(former_top_k(scores, k) == top_k_gpu(scores, k)))
        row = {"rows": b, "length": length, "k": k, "former_top_k_ms": round(timed(lambda: former_top_k(scores, k)), 3),
               "argsort_ms": round(timed(lambda: sorted_top_k(scores, k)), 3),
               "kernel_ms": round(timed(lambda: top_k_gpu(scores, k)), 3), "same_indices": same}
        print(row, flush=True)
        rows.append(row)
    with open(args.out, "w") as handle:
        json.dump({"device": cp.cuda.runtime.getDeviceProperties(0)["name"].decode(), "rows": rows}, handle, indent=1)


if __name__ == "__main__":
    main()
