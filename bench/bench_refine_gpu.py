"""End-to-end refinement throughput on one GPU: simulate N particles of a map, refine
from a 30 Å start with ``cryocv refine`` (global branch-and-bound search every
iteration), and report seconds per iteration, particle-iterations/s, peak GPU
memory, gold-standard resolution and pose error against the truth.

    python bench/bench_refine_gpu.py --map MAP.mrc --n 50000 --out bench/out/gpu128 \
        --results bench/results/refine_gpu.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from cryocv.backend import resolve_xp  # noqa: E402
from cryocv.fsc import fsc_curve, resolution_at  # noqa: E402
from cryocv.io.mrc import read_map  # noqa: E402
from cryocv.jobs.refine import RefineParams, run as run_refine  # noqa: E402
from cryocv.io.particle_files import load_particles, save_particles  # noqa: E402
from cryocv.symmetry import pose_distance_deg as pose_change_deg  # noqa: E402
from cryocv.simulate import simulate  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--map", required=True)
    parser.add_argument("--n", type=int, default=50000)
    parser.add_argument("--snr", type=float, default=0.05)
    parser.add_argument("--sym", default="C1")
    parser.add_argument("--regularizer", default="nu")
    parser.add_argument("--max-iterations", type=int, default=6)
    parser.add_argument("--base-step-deg", type=float, default=RefineParams.base_step_deg)
    parser.add_argument("--candidates", type=int, default=RefineParams.n_candidates)
    parser.add_argument("--base-candidates", type=int, default=RefineParams.n_base_candidates)
    parser.add_argument("--warmup", action="store_true",
                        help="first run a short job on 2000 of the particles (compiles the GPU kernels, as any "
                             "earlier job on the machine would have), then time the job")
    parser.add_argument("--pageable-reads", action="store_true",
                        help="A/B only: read images into ordinary host memory, not the page-locked read-ahead buffers")
    parser.add_argument("--batch-size", type=int, default=None, help="images per batch (default: from memory)")
    parser.add_argument("--nu-max-window-fraction", type=float, default=RefineParams.nu_max_window_fraction,
                        help="NU: cap of the cross-validation window's radius (fraction of the box)")
    parser.add_argument("--marginalize-step-deg", type=float, default=RefineParams.marginalize_step_deg,
                        help="likelihood-weighted poses ± this step around the best (default off)")
    parser.add_argument("--tag", default="", help="appended to the job's folder name (runs side by side)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--results", required=True)
    parser.add_argument("--truth-sym", default=None,
                        help="also judge poses modulo this group (the true map's own symmetry, e.g. C4)")
    args = parser.parse_args(argv)
    xp = resolve_xp("auto")
    truth, px = read_map(args.map)
    n_box = truth.shape[0]
    t0 = time.time()
    sim_star = os.path.join(args.out, "sim", "particles.star")
    sim_key = {"map": os.path.abspath(args.map), "n": args.n, "snr": args.snr, "seed": 1}
    key_path = os.path.join(args.out, "sim", "bench_key.json")
    reuse = False
    if os.path.isfile(key_path):
        with open(key_path) as handle:
            reuse = json.load(handle) == sim_key
    if reuse:
        print(f"reusing the simulated particles in {sim_star}")
    else:
        simulate(truth, px, args.n, os.path.join(args.out, "sim"), snr=args.snr, seed=1, xp=xp, progress=False)
        with open(key_path, "w") as handle:
            json.dump(sim_key, handle)
    simulate_s = time.time() - t0
    if xp is not np:
        xp.get_default_memory_pool().free_all_blocks()
    warmup_s = None
    if args.warmup:
        # a first job on a machine compiles CuPy's kernels (cached on disk for later jobs): a short job
        # on 2000 of the particles does it, in its own process (as an earlier job would: nothing else
        # carries over, no CUDA context, pinned memory or loaded module), so the timed job shows what
        # every later job costs
        t0 = time.time()
        subset = load_particles(sim_star)
        subset = subset.subset(np.arange(min(2000, len(subset))))
        warm_star = os.path.join(args.out, "warmup", "particles.star")
        os.makedirs(os.path.dirname(warm_star), exist_ok=True)
        save_particles(subset, warm_star)
        subprocess.run([sys.executable, "-m", "cryocv", "refine", "--particles", warm_star, "--ref", args.map,
                        "--out", os.path.join(args.out, "warmup", "job"), "--regularizer", args.regularizer,
                        "--sym", args.sym, "--max-iterations", "1", "--quiet", "--overwrite"], check=True)
        warmup_s = round(time.time() - t0, 1)
    if args.pageable_reads:
        import cryocv.source
        cryocv.source._PinnedSlots = lambda xp, image_shape: None
    t0 = time.time()
    params = RefineParams(regularizer=args.regularizer, symmetry=args.sym, max_iterations=args.max_iterations,
                          base_step_deg=args.base_step_deg, n_candidates=args.candidates,
                          n_base_candidates=args.base_candidates, batch_size=args.batch_size,
                          nu_max_window_fraction=args.nu_max_window_fraction,
                          marginalize_step_deg=args.marginalize_step_deg)
    job = os.path.join(args.out, f"refine_base{args.base_step_deg:g}_b{args.base_candidates}_c{args.candidates}{args.tag}")
    report = run_refine(sim_star, args.map, job, params, device="auto", progress=False, overwrite=True)
    refine_s = time.time() - t0
    peak_bytes = int(xp.get_default_memory_pool().total_bytes()) if xp is not np else 0
    truth_p = load_particles(os.path.join(args.out, "sim", "particles.star"))
    refined = load_particles(os.path.join(job, "particles.star"))
    err = pose_change_deg(refined.rotations, truth_p.rotations, args.sym)
    full, _ = read_map(os.path.join(job, "map.mrc"))
    iterations = report["iterations"]
    pass_s = [it["pass_seconds"] for it in iterations]
    result = {
        "device": _device_name(xp), "box": n_box, "pixel_size_A": px, "n_particles": args.n, "snr": args.snr,
        "symmetry": args.sym, "regularizer": args.regularizer, "base_step_deg": args.base_step_deg,
        "n_candidates": args.candidates, "n_base_candidates": args.base_candidates,
        "marginalize_step_deg": args.marginalize_step_deg, "simulate_s": round(simulate_s, 1),
        "refine_wall_s": round(refine_s, 1), "warmup_job_s": warmup_s, "pageable_reads": args.pageable_reads, "iterations": len(iterations),
        "seconds_per_iteration": [round(s, 2) for s in pass_s],
        "particle_iterations_per_s_passes": round(args.n * len(pass_s) / sum(pass_s), 0),
        "particle_iterations_per_s_end_to_end": round(args.n * len(pass_s) / refine_s, 0),
        "peak_gpu_pool_GiB": round(peak_bytes / 2 ** 30, 2),
        "resolution_gold_standard_A": report["resolution_A"],
        "resolution_vs_truth_0.5_A": resolution_at(fsc_curve(full, truth), 0.5, n_box, px),
        "pose_error_median_deg": float(np.median(err)), "pose_error_p90_deg": float(np.percentile(err, 90)),
        "shift_error_median_A": float(np.median(np.linalg.norm(refined.origin_A - truth_p.origin_A, axis=1))),
        "per_iteration": iterations,
    }
    if args.truth_sym:
        err_mod = pose_change_deg(refined.rotations, truth_p.rotations, args.truth_sym)
        result[f"pose_error_median_deg_mod_{args.truth_sym}"] = float(np.median(err_mod))
        result[f"pose_error_p90_deg_mod_{args.truth_sym}"] = float(np.percentile(err_mod, 90))
    os.makedirs(os.path.dirname(os.path.abspath(args.results)), exist_ok=True)
    with open(args.results, "w") as handle:
        json.dump(result, handle, indent=2)
    print(json.dumps({k: v for k, v in result.items() if k != "per_iteration"}, indent=1))


def _device_name(xp) -> str:
    if xp is np:
        return "cpu"
    props = xp.cuda.runtime.getDeviceProperties(xp.cuda.Device().id)
    return props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])


if __name__ == "__main__":
    main()
