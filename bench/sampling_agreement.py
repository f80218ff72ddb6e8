"""Does sampling the reference through the texture units change the poses the search picks? One
global E-step (the job's branch-and-bound search: base grid, then subdivision) of the same
simulated particles against the same reference and noise model, once with the reference sampled
in software ("memory", the exact twin of the CPU) and once by the texture units ("texture"):
the fraction of particles whose chosen pose changes, the angle between the two choices, and each
one's pose error against the truth, with the search's time.

    python bench/sampling_agreement.py --particles sim/particles.star --map truth.mrc --n 20000 \
        --resolution-A 4 --out bench/results/sampling_agreement.json

``--compare products`` compares the search's matrix products instead: float32 ("memory" in the
keys below stands for it) against TF32 on the tensor cores ("texture" for it), both sampling
through the texture units.
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

from cryocv import backend, kernels  # noqa: E402
from cryocv.fourier import lowpass_map  # noqa: E402
from cryocv.geometry import angular_distance_deg  # noqa: E402
from cryocv.io.mrc import read_map  # noqa: E402
from cryocv.io.particle_files import load_particles  # noqa: E402
from cryocv.jobs.loop import alignment_cutoff_px  # noqa: E402
from cryocv.noise import noise_spectrum_from_images  # noqa: E402
from cryocv.projector import prepare_volume  # noqa: E402
from cryocv.search import BaseGrid, SearchParams, search_poses, search_schedule  # noqa: E402
from cryocv.source import ParticleSource  # noqa: E402
from cryocv.symmetry import pose_distance_deg  # noqa: E402


def one_pass(source, members, volume, noise, levels, params, batch: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Rotations (n, 3, 3) and shifts (n, 2) the search picks for ``members``, and its seconds."""
    base = BaseGrid(volume, source.particles.box_size, levels[0], params)
    rotations, shifts = [], []
    cp.cuda.Device().synchronize()
    started = time.perf_counter()
    for start in range(0, members.size, batch):
        b = source.load(members[start:start + batch])
        found = search_poses(volume, b.images_ft, b.ctf, noise, levels, params, base)
        rotations.append(cp.asnumpy(found.rotations))
        shifts.append(cp.asnumpy(found.shifts_px))
    cp.cuda.Device().synchronize()
    return np.concatenate(rotations), np.concatenate(shifts), time.perf_counter() - started


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--particles", required=True, help="simulated particles (STAR with the true poses)")
    parser.add_argument("--map", required=True, help="the true map (the reference is it low-passed)")
    parser.add_argument("--n", type=int, default=20000)
    parser.add_argument("--resolution-A", type=float, default=4.0, help="reference low-pass and alignment limit")
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--sym", default="C1", help="the true map's symmetry: pose errors modulo it")
    parser.add_argument("--compare", choices=("sampling", "products"), default="sampling",
                        help="memory vs texture sampling, or float32 vs TF32 products (texture sampling)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    truth = load_particles(args.particles)
    particles = truth.subset(np.arange(min(args.n, len(truth))))
    volume_map, px = read_map(args.map)
    n_box = volume_map.shape[0]
    source = ParticleSource(particles, cp, cache_budget_bytes=0)
    members = np.arange(len(particles))
    volume = prepare_volume(cp.asarray(lowpass_map(volume_map, px, args.resolution_A)))
    noise = noise_spectrum_from_images(source.images_ft(members[:1000]))
    params = SearchParams()
    levels = search_schedule(n_box, alignment_cutoff_px(n_box, px, args.resolution_A, 3), params)
    picks, seconds = {}, {}
    for sampling in ("memory", "texture", "memory"):          # the second memory pass: same picks (determinism)
        if args.compare == "sampling":
            kernels.SAMPLING = sampling
        else:
            kernels.SAMPLING, backend.SCORE_PRODUCTS = "texture", {"memory": "fp32", "texture": "tf32"}[sampling]
        key = sampling if sampling not in picks else "memory_again"
        rot, shift, seconds[key] = one_pass(source, members, volume, noise, levels, params, args.batch)
        picks[key] = (rot, shift)
    true_rot = particles.rotations
    angle = angular_distance_deg(picks["memory"][0], picks["texture"][0])
    shift = np.linalg.norm(picks["memory"][1] - picks["texture"][1], axis=1)
    angle_mod_sym = pose_distance_deg(picks["memory"][0], picks["texture"][0], args.sym)   # a symmetry mate: a tie
    error = {k: pose_distance_deg(v[0], true_rot, args.sym) for k, v in picks.items()}
    fine_step = float(np.degrees(levels[-1].rotation_step_rad))
    result = {"compare": args.compare, "particles": len(particles), "symmetry_of_errors": args.sym, "box": n_box, "pixel_size_A": px, "resolution_A": args.resolution_A,
              "levels": len(levels), "fine_step_deg": fine_step,
              "search_s": {k: round(v, 3) for k, v in seconds.items()},
              "memory_repeat_identical_fraction": float(np.mean(
                  angular_distance_deg(picks["memory"][0], picks["memory_again"][0]) < 1e-4)),
              "pose_changed_fraction": float(np.mean((angle > 1e-3) | (shift > 1e-3))),
              "pose_changed_by_more_than_fine_step_fraction": float(np.mean(angle > fine_step * 1.01)),
              "angle_between_median_deg": float(np.median(angle)), "angle_between_p99_deg": float(np.percentile(angle, 99)),
              "modulo_sym": {"pose_changed_by_more_than_fine_step_fraction": float(np.mean(angle_mod_sym > fine_step * 1.01)),
                             "changed_by_more_than_2_deg_fraction": float(np.mean(angle_mod_sym > 2.0)),
                             "angle_between_p99_deg": float(np.percentile(angle_mod_sym, 99))},
              "pose_error_median_deg": {k: float(np.median(v)) for k, v in error.items()},
              "pose_error_p90_deg": {k: float(np.percentile(v, 90)) for k, v in error.items()},
              "far_off_fraction_10deg": {k: float(np.mean(v > 10)) for k, v in error.items()}}
    with open(args.out, "w") as handle:
        json.dump(result, handle, indent=1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
