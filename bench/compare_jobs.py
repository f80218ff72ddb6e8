"""Compare two folders written by bench/capture_cli.sh (before/after a change): the simulated
stack, maps (largest difference relative to the map's maximum), FSC and poses (largest angle
between the two runs' poses, raw and modulo the job's symmetry: with a symmetric reference,
round-off may pick another of the symmetry-equivalent poses).

    python bench/compare_jobs.py BEFORE AFTER [--out RESULTS.md]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from cryocv.geometry import angular_distance_deg  # noqa: E402
from cryocv.io.mrc import read_map  # noqa: E402
from cryocv.io.particle_files import load_particles  # noqa: E402
from cryocv.symmetry import pose_distance_deg  # noqa: E402

JOBS = {"rec": "C4", "ref_uni": "C4", "ref_nu": "C1", "demo/refine": "C4"}


def relative_difference(a: str, b: str) -> float:
    x, y = read_map(a)[0].astype(np.float64), read_map(b)[0].astype(np.float64)
    return float(np.abs(x - y).max() / max(np.abs(x).max(), 1e-30))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("before")
    parser.add_argument("after")
    parser.add_argument("--out", help="write the table here (markdown)")
    args = parser.parse_args(argv)
    rows = ["| job | half-map 1 | map.mrc | resolution before / after (Å) | poses differing (raw) | "
            "largest pose difference modulo symmetry | largest shift difference (Å) |", "|---|---|---|---|---|---|---|"]
    stack = os.path.join("sim", "particles.mrcs")
    rows.append(f"| simulate | stack {relative_difference(os.path.join(args.before, stack), os.path.join(args.after, stack)):.1e} "
                f"| | | | | |")
    for job, symmetry in JOBS.items():
        a, b = os.path.join(args.before, job), os.path.join(args.after, job)
        with open(os.path.join(a, "fsc.json")) as ha, open(os.path.join(b, "fsc.json")) as hb:
            ra, rb = json.load(ha)["resolution_A"], json.load(hb)["resolution_A"]
        poses = ["", "", ""]
        if job != "rec":
            pa, pb = (load_particles(os.path.join(x, "particles.star")) for x in (a, b))
            raw = angular_distance_deg(pa.rotations, pb.rotations)
            poses = [f"{int((raw > 1e-3).sum())} of {raw.size}",
                     f"{pose_distance_deg(pa.rotations, pb.rotations, symmetry).max():.1e}°",
                     f"{np.abs(pa.origin_A - pb.origin_A).max():.1e}"]
        rows.append(f"| {job} ({symmetry}) | {relative_difference(os.path.join(a, 'half_map_1.mrc'), os.path.join(b, 'half_map_1.mrc')):.1e} "
                    f"| {relative_difference(os.path.join(a, 'map.mrc'), os.path.join(b, 'map.mrc')):.1e} "
                    f"| {ra:.4f} / {rb:.4f} | {' | '.join(poses)} |")
    text = "\n".join(rows)
    print(text)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(text + "\n")


if __name__ == "__main__":
    main()
