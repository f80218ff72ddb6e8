"""Benchmark: back-projection, projection and reconstruction throughput, numpy vs CuPy.

Times the per-particle work of `cryocv reconstruct` on images already in memory:
FT + re-centring shift + CTF + insertion into padded half-space accumulators
(particles/s), slice extraction (projections/s) and the final division + inverse
FFT (s). Writes a JSON and a Markdown table.

    python bench/bench_backprojection.py --out bench/results [--boxes 128 256]
"""
import argparse
import json
import os
import platform
import time

import numpy as np

from cryocv.backend import gpu_available
from cryocv.ctf import ctf_half_plane
from cryocv.fourier import ft2_centered, phase_shift_images
from cryocv.geometry import random_rotations
from cryocv.projector import (accumulators_to_map, empty_accumulators, extract_slices, frequency_points,
                              insert_slices, prepare_volume)


def sync(xp):
    if xp is not np:
        xp.cuda.Stream.null.synchronize()


def bench(xp, box, n_particles, batch):
    rng = np.random.default_rng(0)
    images = xp.asarray(rng.normal(size=(batch, box, box)).astype(np.float32))
    params = xp.asarray(np.tile([15000, 14000, 30, 300, 2.7, 0.1, 0, 0, 1], (batch, 1)).astype(np.float64))
    shifts = xp.asarray(rng.normal(size=(batch, 2)).astype(np.float32))
    rot = xp.asarray(random_rotations(batch, rng).astype(np.float32))
    pts = frequency_points(box, xp=xp)
    data, weight = empty_accumulators(box, xp=xp)
    vol = xp.asarray(rng.normal(size=(box,) * 3).astype(np.float32))

    def backproject_batch():
        ft = phase_shift_images(ft2_centered(images).astype(xp.complex64), shifts)
        ctf = ctf_half_plane(params, box, 1.0)
        insert_slices(data, weight, rot, pts, pts.gather(ft * ctf), pts.gather(ctf * ctf))

    backproject_batch()  # warm-up / kernel compile
    sync(xp)
    n_batches = max(1, n_particles // batch)
    t0 = time.perf_counter()
    for _ in range(n_batches):
        backproject_batch()
    sync(xp)
    bp_rate = n_batches * batch / (time.perf_counter() - t0)

    vft = prepare_volume(vol)
    extract_slices(vft, rot, pts)
    sync(xp)
    t0 = time.perf_counter()
    for _ in range(n_batches):
        extract_slices(vft, rot, pts)
    sync(xp)
    proj_rate = n_batches * batch / (time.perf_counter() - t0)

    t0 = time.perf_counter()
    accumulators_to_map(data, weight, box)
    sync(xp)
    recon_s = time.perf_counter() - t0
    return {"box": box, "backend": "cupy" if xp is not np else "numpy", "particles": n_batches * batch,
            "backprojection_particles_per_s": round(bp_rate, 1), "projections_per_s": round(proj_rate, 1),
            "reconstruct_s": round(recon_s, 4), "points_per_image": int(pts.kx.size)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--boxes", type=int, nargs="+", default=[128, 256])
    ap.add_argument("--cpu-particles", type=int, default=256)
    ap.add_argument("--gpu-particles", type=int, default=20000)
    args = ap.parse_args()
    rows = []
    for box in args.boxes:
        rows.append(bench(np, box, args.cpu_particles, 64))
        print(rows[-1], flush=True)
        if gpu_available():
            import cupy
            rows.append(bench(cupy, box, args.gpu_particles, 1024 if box <= 128 else 512))
            print(rows[-1], flush=True)
    os.makedirs(args.out, exist_ok=True)
    device = "cpu only"
    if gpu_available():
        import cupy
        device = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    meta = {"device": device, "cpus": os.cpu_count(), "python": platform.python_version(), "numpy": np.__version__}
    with open(os.path.join(args.out, "backprojection.json"), "w") as f:
        json.dump({"meta": meta, "results": rows}, f, indent=2)
    with open(os.path.join(args.out, "backprojection.md"), "w") as f:
        f.write(f"# Back-projection benchmark ({device}, {os.cpu_count()} CPU cores)\n\n")
        f.write("| box | backend | back-projection (particles/s) | projection (slices/s) | reconstruct (s) |\n")
        f.write("|---|---|---|---|---|\n")
        for r in rows:
            f.write(f"| {r['box']} | {r['backend']} | {r['backprojection_particles_per_s']:.0f} | "
                    f"{r['projections_per_s']:.0f} | {r['reconstruct_s']:.3f} |\n")


if __name__ == "__main__":
    main()
