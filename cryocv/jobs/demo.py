"""Simulate TRPV1 particles (bundled map, C4) and run a NU refinement from a 30 Å low-pass;
prints where the map and the plots are and how close to the truth the result is."""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass

import numpy as np

from ..fsc import fsc_curve, resolution_at
from ..io.mrc import read_map
from ..io.particle_files import load_particles
from ..symmetry import pose_distance_deg
from . import jobdir, refine, simulate
from .common import DEFAULT_DEVICE, DEFAULT_SEED, device_args, option

HELP = "simulate a small dataset and refine it (NU, C4)"

# TRPV1 (PDB 3J5P, C4) computed with gemmi at 2.8 Å/px, box 56
DEMO_MAP = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data", "trpv1_box56_2.8A.mrc.gz")
DEMO_SYMMETRY = "C4"


@dataclass
class DemoParams:
    out: str = "cryocv_demo"
    n: int = 2000
    snr: float = 0.05
    seed: int = DEFAULT_SEED
    max_iterations: int = 4


def add_args(p):
    option(p, "--out", DemoParams, "out", help="output directory")
    option(p, "--n", DemoParams, "n", help="number of particles")
    option(p, "--snr", DemoParams, "snr", help="SNR")
    device_args(p)


def main(args) -> int:
    params = DemoParams(out=args.out, n=args.n, snr=args.snr)
    report = run(params, device=args.device, progress=not args.quiet)
    job = os.path.join(args.out, jobdir.DEMO_REFINE)
    print(f"demo finished: {report['n_particles']} particles refined (NU, {DEMO_SYMMETRY}) to "
          f"{report['resolution_A']:.2f} Å gold-standard; vs the true map {report['resolution_vs_truth_0.5_A']:.2f} Å "
          f"(FSC 0.5); median pose error {report['pose_error_median_deg']:.2f}°")
    print(f"map: {jobdir.path(job, jobdir.MAP)}")
    print(f"FSC plot: {jobdir.path(job, jobdir.FSC_PNG)}, poses: {jobdir.path(job, jobdir.POSES_PNG)}")
    return 0


def run(params: DemoParams, device: str = DEFAULT_DEVICE, progress: bool = True) -> dict:
    """The README demo: simulate TRPV1 particles (CTF, shifts) and run a C4 NU refinement from a
    30 Å low-pass of the map; report the gold-standard resolution, the resolution against the
    true map and the pose error against the true poses."""
    sim_dir = os.path.join(params.out, jobdir.DEMO_SIMULATED)
    simulate.run(DEMO_MAP, sim_dir, simulate.SimulateParams(n=params.n, snr=params.snr, seed=params.seed),
                 device=device, progress=progress)
    ref_dir = os.path.join(params.out, jobdir.DEMO_REFINE)
    if os.path.isfile(jobdir.path(ref_dir, jobdir.CHECKPOINT)):
        shutil.rmtree(ref_dir)  # the demo's own folder: a rerun starts over
    refine_params = refine.RefineParams(regularizer="nu", symmetry=DEMO_SYMMETRY,
                                        max_iterations=params.max_iterations, seed=params.seed)
    star = jobdir.path(sim_dir, jobdir.PARTICLES_STAR)
    report = refine.run(star, DEMO_MAP, ref_dir, refine_params, device=device, progress=progress)
    truth, px = read_map(DEMO_MAP)
    full, _ = read_map(jobdir.path(ref_dir, jobdir.MAP))
    report["resolution_vs_truth_0.5_A"] = resolution_at(fsc_curve(full, truth), 0.5, truth.shape[0], px)
    true_poses = load_particles(star)
    refined = load_particles(jobdir.path(ref_dir, jobdir.PARTICLES_STAR))
    report["pose_error_median_deg"] = float(np.median(pose_distance_deg(refined.rotations, true_poses.rotations,
                                                                        DEMO_SYMMETRY)))
    return report
