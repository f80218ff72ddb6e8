"""Judge a RELION 3.1 auto-refine of a small-membrane dataset (bench/small_membrane_dataset.py) as
bench_small_membrane.py judges cryocv's refinements: per iteration that RELION finished, the
average of its two half-maps against the protein-only truth in the protein's mask (FSC 0.5 and
0.143, also after turning the map by the poses' global rotation) and its poses against the true
ones (median raw, after one global rotation, after each half-set's; fraction > 6°). A run
stopped before convergence is judged at its last finished iteration.

    python bench/judge_relion_small_membrane.py RELION_DIR DATA_DIR --results bench/results/relion_sm
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys

import numpy as np
import starfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

from bench_small_membrane import judge_map_and_poses  # noqa: E402

from cryocv.geometry import euler_to_matrix  # noqa: E402
from cryocv.io.mrc import read_map  # noqa: E402
from cryocv.io.particle_files import load_particles  # noqa: E402


def finished_iterations(relion_dir: str, root: str = "run") -> list:
    """Iterations (ints, from 1: iteration 0 holds the input) whose half-maps and data STAR RELION wrote."""
    found = []
    for path in glob.glob(os.path.join(relion_dir, f"{root}_it*_data.star")):
        k = int(re.search(r"_it(\d+)_data\.star$", path).group(1))
        if k > 0 and all(os.path.isfile(os.path.join(relion_dir, f"{root}_it{k:03d}_half{h}_class001.mrc")) for h in (1, 2)):
            found.append(k)
    return sorted(found)


def judge_iteration(relion_dir: str, k: int, truth, mask, px: float, true_particles, root: str = "run") -> dict:
    """One RELION iteration against the truth (see the module docstring)."""
    halves = [read_map(os.path.join(relion_dir, f"{root}_it{k:03d}_half{h}_class001.mrc"))[0] for h in (1, 2)]
    volume = 0.5 * (halves[0] + halves[1])
    data = starfile.read(os.path.join(relion_dir, f"{root}_it{k:03d}_data.star"), always_dict=True)["particles"]
    # RELION keeps the input's row order; its image names point at its normalised copy of the one stack
    # the dataset has, so the image number is the row of the dataset's particles.star (a run continued
    # with --continue writes run_ct*_it* files: pass that root)
    index = np.array([int(name.split("@")[0]) - 1 for name in data["rlnImageName"]])
    true = true_particles.rotations[index]
    refined = euler_to_matrix(data[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy(dtype=float))
    return {**judge_map_and_poses(volume, refined, true, data["rlnRandomSubset"].to_numpy(), truth, mask, px),
            "iteration": k, "n_particles": int(len(data))}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("relion_dir", help="RELION's output folder (run_it*_half*_class001.mrc, run_it*_data.star)")
    parser.add_argument("data_dir", help="the dataset (truth_protein.mrc, protein_mask.mrc, particles.star)")
    parser.add_argument("--results", required=True, help="path prefix for .json and .md")
    parser.add_argument("--root", default="run", help="RELION's output root (run; run_ct<N> after --continue)")
    args = parser.parse_args(argv)
    truth, px = read_map(os.path.join(args.data_dir, "truth_protein.mrc"))
    mask, _ = read_map(os.path.join(args.data_dir, "protein_mask.mrc"))
    true_particles = load_particles(os.path.join(args.data_dir, "particles.star"))
    iterations = finished_iterations(args.relion_dir, args.root)
    if not iterations:
        raise SystemExit(f"{args.relion_dir}: no finished RELION iteration")
    rows = [judge_iteration(args.relion_dir, k, truth, mask, px, true_particles, args.root) for k in iterations]
    with open(args.results + ".json", "w") as handle:
        json.dump({"relion_dir": os.path.abspath(args.relion_dir), "iterations": rows}, handle, indent=1)
    lines = ["| RELION iteration | protein FSC 0.5 vs truth (in its mask) | after one global rotation | FSC 0.143 "
             "| median pose error | after one global rotation | > 6° |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['iteration']} | {r['fsc05_A']:.2f} Å | {r['after_global_rotation']['fsc05_A']:.2f} Å | "
              f"{r['fsc0143_A']:.2f} Å | {r['pose_error_median_deg']:.2f}° | "
              f"{r['pose_error_joint_registered_median_deg']:.2f}° | {100 * r['fraction_over_6_deg']:.0f}% |"
              for r in rows]
    with open(args.results + ".md", "w") as handle:
        handle.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
