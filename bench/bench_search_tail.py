"""The pose search before and after the base-candidate schedule (commit 0b2676d), on the
datasets of bench/bench_vs_relion.py, judged against the truth.

*before*: 8 candidates kept at every level, base grid scored to 1.5/step (as the levels);
*after* (the defaults): 32 candidates after the base grid, halved per level down to 4,
base grid scored to 2.0/step. Both refine the same particles (uniform regularizer, C4)
from the same 30 Å start. Reported per run: FSC 0.5 against the truth (whole map, and
inside the rigid core's mask for the membrane datasets), median / p90 pose error and the
fraction of particles more than 10° from their true pose (modulo C4). With
``--relion-poses DATA_STAR`` (RELION's ``run_data.star`` of the box-96 membrane dataset) the
particles are also reconstructed by cryocv with RELION's poses, which separates RELION's
poses from its reconstruction.

    python bench/bench_search_tail.py --out bench/out/search_tail --results bench/results/search_tail \\
        [--relion-poses bench/out/r96/run_data.star] [--device cpu]

Datasets are made in OUT (the rigid one as bench_vs_relion's default; membrane box 64 at
2.7 Å/px SNR 0.05 and box 96 at 1.8 Å/px SNR 0.02, 1000 particles each).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from cryocv.backend import resolve_xp, to_numpy  # noqa: E402
from cryocv.jobs.refine import RefineParams, run as run_refine  # noqa: E402
from cryocv.io.particle_files import load_particles  # noqa: E402
from cryocv.reconstruct import reconstruct  # noqa: E402
from bench_vs_relion import judge, make_dataset, make_membrane_dataset  # noqa: E402

DATASETS = {"rigid box 40": ("rigid", None, None, 0.05),
            "membrane box 64": ("membrane", 64, 2.7, 0.05),
            "membrane box 96": ("membrane", 96, 1.8, 0.02)}
SEARCHES = {"before": {"n_candidates": 8, "n_base_candidates": 8,
                       "base_cutoff_times_step": RefineParams.cutoff_times_step},
            "after": {"base_cutoff_times_step": RefineParams.base_cutoff_times_step}}


def refine_with(setting: dict, data_dir: str, job: str, device: str) -> dict:
    t0 = time.perf_counter()
    run_refine(os.path.join(data_dir, "sim", "particles.star"), os.path.join(data_dir, "start.mrc"), job,
               RefineParams(regularizer="uniform", symmetry="C4", seed=1, **setting), device=device, progress=False)
    wall = time.perf_counter() - t0
    return {**judge(os.path.join(job, "map.mrc"), os.path.join(job, "particles.star"), data_dir),
            "wall_s": round(wall, 1)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--results", required=True, help="prefix of RESULTS.{json,md}")
    parser.add_argument("--relion-poses", help="RELION run_data.star of the box-96 membrane dataset")
    parser.add_argument("--device", choices=["cpu", "gpu", "auto"], default="cpu")
    parser.add_argument("--model", default=os.path.join(HERE, "..", "..", "shared", "data", "models",
                                                        "3j5p_trpv1_c4.pdb"))
    args = parser.parse_args(argv)
    results = {"device": args.device, "cpu_count": os.cpu_count(), "searches": SEARCHES, "runs": {}}
    for name, (kind, box, px, snr) in DATASETS.items():
        data_dir = os.path.join(args.out, name.replace(" ", "_"))
        if not os.path.isfile(os.path.join(data_dir, "sim", "particles.star")):
            if kind == "rigid":
                make_dataset(data_dir, 1000, snr, 1)
            else:
                make_membrane_dataset(data_dir, 1000, snr, 1, box, px, args.model)
        rows = results["runs"][name] = {}
        for label, setting in SEARCHES.items():
            job = os.path.join(data_dir, f"uniform_{label}")
            rows[label] = refine_with(setting, data_dir, job, args.device)
            print(name, label, json.dumps(rows[label]), flush=True)
        if name == "membrane box 96" and args.relion_poses:
            # RELION read normalised copies of the one simulated stack: read the images from
            # the stack itself (same indices; a per-stack affine grey scale leaves the FSC alone)
            poses = load_particles(args.relion_poses, datadir=os.path.join(data_dir, "sim"))
            stack = load_particles(os.path.join(data_dir, "sim", "particles.star")).stack_paths[0]
            poses.stack_paths = np.full(len(poses), stack, dtype=object)
            _, _, full, _ = reconstruct(poses, resolve_xp(args.device), "C4", progress=False)
            rows["RELION's poses, cryocv reconstruction"] = judge(to_numpy(full), args.relion_poses, data_dir)
            print(name, "relion poses", json.dumps(rows["RELION's poses, cryocv reconstruction"]), flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.results)), exist_ok=True)
    with open(args.results + ".json", "w") as handle:
        json.dump(results, handle, indent=1)
    lines = ["# Pose search before / after the base-candidate schedule (uniform, C4, 1000 particles)", "",
             f"Refined on {args.device} ({os.cpu_count()} cores). before: 8 candidates at every level, base grid "
             "scored to 1.5/step; after: 32 → 16 → 8 → 4 candidates, base grid scored to 2.0/step.", "",
             "| dataset | search | whole map vs truth (FSC 0.5) | rigid core vs truth | median pose error | p90 | "
             "> 10° from truth | wall |", "|---|---|---|---|---|---|---|---|"]

    def cell(value, fmt):
        return "–" if value is None else fmt.format(value)

    for name, rows in results["runs"].items():
        for label, r in rows.items():
            lines.append(f"| {name} | {label} | {r['vs_truth_0.5_A']:.2f} Å | "
                         f"{cell(r.get('core_vs_truth_0.5_A'), '{:.2f} Å')} | {r['pose_error_median_deg']:.2f}° | "
                         f"{r['pose_error_p90_deg']:.2f}° | {100 * r['fraction_over_10deg']:.1f} % | "
                         f"{cell(r.get('wall_s'), '{:.0f} s')} |")
    with open(args.results + ".md", "w") as handle:
        handle.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
