"""Local-refinement throughput: particle-iterations/s end to end and in the E/M passes, with pose
accuracy, for a rigid particle whose poses start perturbed by 2–10° and ±1.5 Å.

    python bench/bench_local_gpu.py --map trpv1_128.mrc --n 50000 --out /tmp/bl --results bench/results/local_gpu_128.json
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cryocv.backend import resolve_xp  # noqa: E402
from cryocv.cli import build_parser  # noqa: E402
from cryocv.jobs.common import params_from_args  # noqa: E402
from cryocv.geometry import axis_angle_to_matrix, matrix_to_euler  # noqa: E402
from cryocv.io.mrc import read_map, write_map  # noqa: E402
from cryocv.io.particle_files import load_particles, save_particles  # noqa: E402
from cryocv.jobs import local_refine, reconstruct  # noqa: E402
from cryocv.masks import threshold_mask  # noqa: E402
from cryocv.simulate import simulate  # noqa: E402
from cryocv.symmetry import pose_distance_deg  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--map", required=True)
    parser.add_argument("--n", type=int, default=50000)
    parser.add_argument("--snr", type=float, default=0.05)
    parser.add_argument("--max-iterations", type=int, default=3)
    parser.add_argument("--tag", default="", help="appended to the job's folder name (runs side by side)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--results", required=True)
    parser.add_argument("--local-args", default="", help="extra `cryocv local-refine` options, quoted")
    parser.add_argument("--warmup", action="store_true",
                        help="first run a one-iteration job on 2000 of the particles in its own process (compiles "
                             "the GPU kernels, as any earlier job on the machine would have), then time the job")
    parser.add_argument("--pageable-reads", action="store_true",
                        help="A/B only: read images into ordinary host memory, not the page-locked read-ahead buffers")
    args = parser.parse_args(argv)
    xp = resolve_xp("auto")
    volume, px = read_map(args.map)
    sim = os.path.join(args.out, "sim")
    star = os.path.join(sim, "particles.star")
    t0 = time.time()
    if not os.path.isfile(star):            # a later run in the same --out reuses the particles and consensus
        simulate(volume, px, args.n, sim, snr=args.snr, seed=1, xp=xp, progress=False)
        reconstruct.run(star, os.path.join(args.out, "consensus"), progress=False, overwrite=True)
    simulate_s = time.time() - t0
    truth = load_particles(star)
    rng = np.random.default_rng(9)
    axes = rng.normal(size=(len(truth), 3))
    angles = np.radians(rng.uniform(2, 10, len(truth)))
    delta = axis_angle_to_matrix(axes / np.linalg.norm(axes, axis=1, keepdims=True) * angles[:, None])
    start = truth.subset(np.arange(len(truth)))
    start.euler_deg = matrix_to_euler(truth.rotations @ delta)
    start.origin_A = truth.origin_A + rng.uniform(-1.5, 1.5, truth.origin_A.shape)
    start_star = os.path.join(args.out, "perturbed.star")
    save_particles(start, start_star)
    mask_path = os.path.join(args.out, "mask.mrc")
    write_map(mask_path, threshold_mask(volume, 0.1 * float(volume.max()), 3.0, 6.0).astype(np.float32), px)
    halves = [os.path.join(args.out, "consensus", f"half_map_{h}.mrc") for h in (1, 2)]
    job = os.path.join(args.out, "local_" + ("_".join(shlex.split(args.local_args)).replace("-", "") or "default")
                       + args.tag)
    warmup_s = None
    if args.warmup:
        t0 = time.time()
        warm_star = os.path.join(args.out, "warmup", "particles.star")
        os.makedirs(os.path.dirname(warm_star), exist_ok=True)
        save_particles(start.subset(np.arange(min(2000, len(start)))), warm_star)
        subprocess.run([sys.executable, "-m", "cryocv", "local-refine", "--particles", warm_star, "--half-maps", *halves,
                        "--mask", mask_path, "--out", os.path.join(args.out, "warmup", "job"), "--max-iterations", "1",
                        "--quiet", "--overwrite"] + shlex.split(args.local_args), check=True)
        warmup_s = round(time.time() - t0, 1)
    if args.pageable_reads:
        import cryocv.source
        cryocv.source._PinnedSlots = lambda xp, image_shape: None
    t0 = time.time()
    cli = build_parser().parse_args(["local-refine", "--max-iterations", str(args.max_iterations)]
                                    + shlex.split(args.local_args))
    params = params_from_args(local_refine.LocalRefineParams, cli)
    report = local_refine.run(start_star, halves, mask_path, job, params, progress=False, overwrite=True)
    wall = time.time() - t0
    refined = load_particles(os.path.join(job, "particles.star"))
    error = pose_distance_deg(refined.rotations, truth.rotations, "C1")
    start_error = pose_distance_deg(start.rotations, truth.rotations, "C1")
    passes = [it["pass_seconds"] for it in report["iterations"]]
    result = {"local_args": args.local_args, "box": volume.shape[0], "pixel_size_A": px, "n_particles": args.n, "snr": args.snr,
              "simulate_s": round(simulate_s, 1), "local_refine_wall_s": round(wall, 1),
              "warmup_job_s": warmup_s, "pageable_reads": args.pageable_reads,
              "iterations": len(passes), "seconds_per_pass": passes,
              "particle_iterations_per_s_passes": round(args.n * len(passes) / sum(passes), 0),
              "particle_iterations_per_s_end_to_end": round(args.n * len(passes) / wall, 0),
              "pose_error_start_median_deg": float(np.median(start_error)),
              "pose_error_median_deg": float(np.median(error)), "pose_error_p90_deg": float(np.percentile(error, 90)),
              "resolution_in_mask_A": report["resolution_A"], "per_iteration": report["iterations"]}
    os.makedirs(os.path.dirname(os.path.abspath(args.results)), exist_ok=True)
    with open(args.results, "w") as handle:
        json.dump(result, handle, indent=1)
    print(json.dumps({k: v for k, v in result.items() if k != "per_iteration"}, indent=1))


if __name__ == "__main__":
    main()
