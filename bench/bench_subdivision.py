"""Subdivision-level scoring on the GPU: the fused kernel (slices sampled and scored in one pass,
``cryocv.kernels.score_groups_gpu``) against extract-then-score (``extract_slices`` then
``search.score_children``), at the level sizes a box-128 / box-256 search uses: seconds per call,
trilinear samples per second, and how often the best child differs (float rounding only).
``--poses``: the same for ``search.score_poses`` (per-image rotations × at most 16 shifts, a
narrowed local start), fused in groups of 4 rotations against extract-then-score. Each also with
the reference sampled by the texture units (``kernels.SAMPLING = "texture"``).

    python bench/bench_subdivision.py --out bench/results/subdivision_gpu.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cupy as cp  # noqa: E402

from cryocv.geometry import random_rotations  # noqa: E402
from cryocv.projector import frequency_points, prepare_volume  # noqa: E402
from cryocv.search import (image_terms, point_weights, rotation_children, shift_children,  # noqa: E402
                           subdivision_scores)


def blob(n: int, seed: int) -> np.ndarray:
    """A few Gaussian blobs (a structured volume, so slices differ between rotations)."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(n) - n / 2] * 3, indexing="ij"), -1)
    vol = np.zeros((n, n, n), np.float32)
    for _ in range(12):
        centre = rng.uniform(-n / 5, n / 5, 3)
        vol += np.exp(-np.sum((grid - centre) ** 2, -1) / (2 * (n / 20) ** 2)).astype(np.float32)
    return vol


def timed(fn, repeats: int = 3) -> tuple:
    out = fn()
    cp.cuda.Device().synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        out = fn()
    cp.cuda.Device().synchronize()
    return out, (time.perf_counter() - start) / repeats


def with_sampling(sampling: str, fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` with the fused scores sampling the reference by ``sampling``."""
    from cryocv import kernels
    saved, kernels.SAMPLING = kernels.SAMPLING, sampling
    try:
        return fn(*args, **kwargs)
    finally:
        kernels.SAMPLING = saved


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True)
    parser.add_argument("--poses", action="store_true", help="measure score_poses (narrowed local start) instead")
    args = parser.parse_args()
    if args.poses:
        return poses(args.out)
    rows = []
    for n, cutoff, b, k in [(128, 17, 4096, 32), (128, 34, 4096, 32), (128, 43, 4096, 16), (128, 64, 2048, 8),
                            (128, 43, 4096, 4), (256, 64, 1024, 16), (256, 128, 512, 8)]:
        rng = np.random.default_rng(0)
        volume = prepare_volume(cp.asarray(blob(n, 1)))
        points = frequency_points(n, cutoff, cp)
        images = cp.asarray((rng.normal(size=(b, n, n // 2 + 1)) + 1j * rng.normal(size=(b, n, n // 2 + 1)))
                            .astype(np.complex64))
        ctf = cp.asarray(rng.uniform(-1, 1, (b, n, n // 2 + 1)).astype(np.float32))
        terms = image_terms(images, ctf, points, point_weights(points, cp.ones(n // 2 + 1, cp.float32)))
        rot = rotation_children(cp.asarray(random_rotations(b * k, rng).astype(np.float32).reshape(b, k, 3, 3)),
                                np.radians(2.5))
        sh = shift_children(cp.asarray(rng.normal(0, 2, (b, k, 2)).astype(np.float32)), 0.5)
        images = ctf = None
        fused, t_fused = timed(lambda: subdivision_scores(volume, terms, points, rot, sh, fused=True))
        plain, t_plain = timed(lambda: subdivision_scores(volume, terms, points, rot, sh, fused=False))
        textured, t_texture = timed(lambda: with_sampling("texture", subdivision_scores, volume, terms, points,
                                                          rot, sh, fused=True))
        best_f = cp.argmax(fused.reshape(b, -1), axis=1)
        best_p = cp.argmax(plain.reshape(b, -1), axis=1)
        best_t = cp.argmax(textured.reshape(b, -1), axis=1)
        samples = b * k * 8 * points.kx.size
        rows.append({"box": n, "cutoff_px": cutoff, "images": b, "candidates": k, "points": int(points.kx.size),
                     "fused_s": round(t_fused, 4), "extract_then_score_s": round(t_plain, 4),
                     "texture_s": round(t_texture, 4),
                     "speedup": round(t_plain / t_fused, 2), "texture_speedup_vs_fused": round(t_fused / t_texture, 2),
                     "fused_G_samples_per_s": round(samples / t_fused / 1e9, 2),
                     "texture_G_samples_per_s": round(samples / t_texture / 1e9, 2),
                     "extract_then_score_G_samples_per_s": round(samples / t_plain / 1e9, 2),
                     "max_rel_difference": float(cp.abs(fused - plain).max() / cp.abs(plain).max()),
                     "texture_max_rel_difference": float(cp.abs(textured - plain).max() / cp.abs(plain).max()),
                     "best_child_differs_fraction": float(cp.mean(best_f != best_p)),
                     "texture_best_child_differs_fraction": float(cp.mean(best_t != best_p))})
        print(json.dumps(rows[-1]), flush=True)
        volume = terms = rot = sh = fused = plain = None
        cp.get_default_memory_pool().free_all_blocks()
    with open(args.out, "w") as handle:
        json.dump({"device": cp.cuda.runtime.getDeviceProperties(0)["name"].decode(), "rows": rows}, handle, indent=1)


def poses(out_path: str):
    from cryocv.search import score_poses
    rows = []
    for n, cutoff, b, r, t in [(128, 34, 4096, 33, 13), (128, 43, 4096, 33, 13), (128, 34, 4096, 33, 1),
                               (256, 64, 1024, 33, 13)]:
        rng = np.random.default_rng(0)
        volume = prepare_volume(cp.asarray(blob(n, 1)))
        images = cp.asarray((rng.normal(size=(b, n, n // 2 + 1)) + 1j * rng.normal(size=(b, n, n // 2 + 1)))
                            .astype(np.complex64))
        ctf = cp.asarray(rng.uniform(-1, 1, (b, n, n // 2 + 1)).astype(np.float32))
        noise = cp.ones(n // 2 + 1, cp.float32)
        rot = cp.asarray(random_rotations(b * r, rng).astype(np.float32).reshape(b, r, 3, 3))
        sh = cp.asarray(rng.normal(0, 2, (b, t, 2)).astype(np.float32))
        fused, t_fused = timed(lambda: score_poses(volume, images, ctf, noise, rot, sh, cutoff, fused=True))
        plain, t_plain = timed(lambda: score_poses(volume, images, ctf, noise, rot, sh, cutoff, fused=False))
        textured, t_texture = timed(lambda: with_sampling("texture", score_poses, volume, images, ctf, noise, rot,
                                                          sh, cutoff, fused=True))
        best_f = cp.argmax(fused.reshape(b, -1), axis=1)
        best_p = cp.argmax(plain.reshape(b, -1), axis=1)
        best_t = cp.argmax(textured.reshape(b, -1), axis=1)
        rows.append({"box": n, "cutoff_px": cutoff, "images": b, "rotations": r, "shifts": t,
                     "fused_s": round(t_fused, 4), "extract_then_score_s": round(t_plain, 4),
                     "texture_s": round(t_texture, 4),
                     "speedup": round(t_plain / t_fused, 2), "texture_speedup_vs_fused": round(t_fused / t_texture, 2),
                     "max_rel_difference": float(cp.abs(fused - plain).max() / cp.abs(plain).max()),
                     "texture_max_rel_difference": float(cp.abs(textured - plain).max() / cp.abs(plain).max()),
                     "best_pose_differs_fraction": float(cp.mean(best_f != best_p)),
                     "texture_best_pose_differs_fraction": float(cp.mean(best_t != best_p))})
        print(json.dumps(rows[-1]), flush=True)
        volume = images = ctf = fused = plain = None
        cp.get_default_memory_pool().free_all_blocks()
    with open(out_path, "w") as handle:
        json.dump({"device": cp.cuda.runtime.getDeviceProperties(0)["name"].decode(), "rows": rows}, handle, indent=1)


if __name__ == "__main__":
    main()
