"""How far two runs' poses of the same particles are apart (e.g. a GPU path before and after a
change): median and 90th percentile of the angle between them (modulo a symmetry group), the
fraction of particles whose pose moved by more than a threshold, and the origin differences.

    python bench/pose_agreement.py A/particles.star B/particles.star --sym C1 --threshold-deg 0.5 --out agreement.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cryocv.io.particle_files import load_particles  # noqa: E402
from cryocv.symmetry import pose_distance_deg  # noqa: E402


def pose_agreement(star_a: str, star_b: str, symmetry: str = "C1", threshold_deg: float = 0.5) -> dict:
    a, b = load_particles(star_a), load_particles(star_b)
    if len(a) != len(b):
        raise SystemExit(f"{star_a} has {len(a)} particles, {star_b} {len(b)}")
    angle = pose_distance_deg(a.rotations, b.rotations, symmetry)
    shift = np.linalg.norm(a.origin_A - b.origin_A, axis=1)
    return {"particles": len(a), "symmetry": symmetry, "angle_median_deg": float(np.median(angle)),
            "angle_p90_deg": float(np.percentile(angle, 90)), "threshold_deg": threshold_deg,
            "fraction_moved": float(np.mean(angle > threshold_deg)),
            "fraction_identical": float(np.mean(angle < 1e-3)),
            "origin_difference_median_A": float(np.median(shift))}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("star_a")
    parser.add_argument("star_b")
    parser.add_argument("--sym", default="C1")
    parser.add_argument("--threshold-deg", type=float, default=0.5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    result = pose_agreement(args.star_a, args.star_b, args.sym, args.threshold_deg)
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(result, handle, indent=1)


if __name__ == "__main__":
    main()
