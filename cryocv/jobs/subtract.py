"""Subtract signal from particle images: for each particle, the half-map of its own half-set times
(1 − keep mask), projected at its pose, CTF-modulated and scaled per particle, is subtracted
(the mask marks what to KEEP, as RELION's relion_particle_subtract --mask). Writes
particles_subtracted.mrcs and particles.star in DIR: the same rows in the same order with their
poses, CTF, half-sets and other columns, rlnImageName pointing at the new stack and
rlnImageOriginalName at the image each row came from (a .cs input gives a STAR output too).
--recenter centres the images on the keep mask's centre of mass (the origins keep the poses
consistent: a reconstruction of the output is centred there); --new-box crops them."""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, replace

import numpy as np
import pandas as pd

from ..errors import CryocvError
from ..io.mrc import StackCache, StackWriter
from ..io.particle_files import save_particles
from ..io.star import image_names
from ..reconstruct import DEFAULT_BATCH_SIZE
from ..source import ParticleSource
from ..subtraction import MASK_TOLERANCE, center_of_mass, scale_fit_radius_px, subtract_source
from . import jobdir
from .common import (DEFAULT_DEVICE, device_args, load_checked_particles, option, output_args, params_from_args,
                     read_cubic_map, select_device)

HELP = "subtract the signal outside a keep mask from particle images (own half-map per particle)"
ORIGINAL_NAME = "rlnImageOriginalName"
ORIGIN_PRIORS = ["rlnOriginXPriorAngst", "rlnOriginYPriorAngst", "rlnOriginXPrior", "rlnOriginYPrior"]
MIN_BOX = 16


@dataclass
class SubtractParams:
    recenter: bool = False               # centre the output on the keep mask's centre of mass
    new_box: int | None = None           # crop the output images to this (even) box
    fit_scale: bool = True               # per-particle least-squares scale of the subtracted signal
    scale_resolution_A: float | None = None   # fit it to this resolution (default: the half-maps' FSC 0.143)
    batch_size: int = DEFAULT_BATCH_SIZE
    strict: bool = False                 # unusable images stop the job instead of being left out

    def validate(self):
        if self.batch_size <= 0:
            raise CryocvError("--batch-size must be positive")
        if self.new_box is not None and (self.new_box < MIN_BOX or self.new_box % 2):
            raise CryocvError(f"--new-box must be an even number of pixels >= {MIN_BOX}, got {self.new_box}")
        if self.scale_resolution_A is not None and not self.scale_resolution_A > 0:
            raise CryocvError("--scale-resolution-A must be positive")


def add_args(p):
    p.add_argument("--particles", required=True, help="particles (.star or .cs) with poses and half-sets")
    p.add_argument("--half-maps", required=True, nargs=2, metavar=("H1", "H2"),
                   help="half-maps (MRC) of half-sets 1 and 2, box and pixel size of the particles")
    p.add_argument("--keep-mask", required=True, help="mask (MRC, values in [0, 1]) of the density to keep")
    p.add_argument("--out", required=True, help="output directory")
    option(p, "--recenter", SubtractParams, "recenter", action="store_true",
           help="centre the subtracted images on the projected centre of mass of the keep mask")
    p.add_argument("--new-box", dest="new_box", type=int, metavar="N",
                   help="crop the subtracted (re-centred) images to N px (even; default: keep the box)")
    option(p, "--no-scale", SubtractParams, "fit_scale", action="store_false",
           help="subtract with scale 1 instead of a per-particle least-squares scale")
    p.add_argument("--scale-resolution-A", dest="scale_resolution_A", type=float, metavar="A",
                   help="fit the scale with frequencies to this resolution (default: where the half-maps' "
                        "FSC falls below 0.143)")
    p.add_argument("--datadir", help="extra folder to look for image stacks in")
    option(p, "--batch-size", SubtractParams, "batch_size", help="images per batch")
    option(p, "--strict", SubtractParams, "strict", action="store_true",
           help="stop at an unusable image (NaN, blank, overflowing) instead of leaving it out")
    output_args(p)
    device_args(p)


def main(args) -> int:
    result = run(args.particles, args.half_maps, args.keep_mask, args.out, params_from_args(SubtractParams, args),
                 device=args.device, datadir=args.datadir, progress=not args.quiet, overwrite=args.overwrite)
    print(f"subtracted {result['n_particles']} particles (scale median {result['scale_median']:.3f}); "
          f"particles: {jobdir.path(args.out, jobdir.PARTICLES_STAR)}")
    return 0


def read_maps(half_map_paths, keep_mask_path: str, box_size: int, pixel_size_A: float):
    """(half-maps, keep mask clipped to [0, 1]) after one-line checks: cubic, the particles' box
    and pixel size (where a header gives one), mask values in [0, 1]."""
    maps = []
    for path, what in ((half_map_paths[0], "half-map"), (half_map_paths[1], "half-map"), (keep_mask_path, "keep mask")):
        volume, voxel = read_cubic_map(path)
        if volume.shape[0] != box_size:
            raise CryocvError(f"{what} {path} is {volume.shape[0]} px, the particles {box_size} px")
        if voxel is not None and abs(voxel - pixel_size_A) > 1e-3 * pixel_size_A:
            raise CryocvError(f"{what} {path} has {voxel:.4f} Å/px, the particles {pixel_size_A:.4f} Å/px")
        maps.append(volume)
    mask = maps[2]
    if mask.min() < -MASK_TOLERANCE or mask.max() > 1 + MASK_TOLERANCE:
        raise CryocvError(f"keep mask {keep_mask_path} has values in [{mask.min():.4g}, {mask.max():.4g}]; a mask "
                          f"needs values in [0, 1] (1: keep, 0: subtract)")
    return maps[:2], np.clip(mask, 0, 1)


def subtracted_particles(particles, stack_path: str, star_path: str, box_size: int, origin_A):
    """The output rows: the input's, same order, images at ``stack_path`` positions 0..n-1,
    rlnImageOriginalName the input's image names (as RELION, a subtraction of a subtraction points
    at the images it started from), ``origin_A`` (n, 2) (origin priors dropped when they changed)."""
    n = len(particles)
    table = particles.extra.get("particles_table")
    table = table.copy() if table is not None and len(table) == n else pd.DataFrame(index=range(n))
    table[ORIGINAL_NAME] = image_names(particles, star_path, table.get("rlnImageName"))
    if not np.array_equal(origin_A, particles.origin_A):
        table = table.drop(columns=[c for c in ORIGIN_PRIORS if c in table.columns])
    return replace(particles, stack_paths=np.array([os.path.abspath(stack_path)] * n, dtype=object),
                   stack_indices=np.arange(n), box_size=box_size, origin_A=origin_A,
                   extra={**particles.extra, "particles_table": table}, _cache=StackCache())


def run(particles_path: str, half_map_paths, keep_mask_path: str, out_dir: str, params: SubtractParams | None = None,
        device: str = DEFAULT_DEVICE, datadir=None, progress: bool = True, overwrite: bool = False) -> dict:
    """Subtract (see the module docstring); ``overwrite`` replaces a job already in ``out_dir``.
    Returns a summary (also in job.json)."""
    started = time.time()
    params = params or SubtractParams()
    params.validate()
    jobdir.check_output_dir(out_dir, overwrite, finished=(jobdir.MAP, jobdir.PARTICLES_STAR))
    notes = []
    particles = load_checked_particles(particles_path, datadir, params.strict, log=notes.append)
    particles.require_alignment("subtract")
    if np.any(particles.half_set == 0):
        row = int(np.argmax(particles.half_set == 0))
        raise CryocvError(f"{particles.source}: particle {row + 1} has no half-set (rlnRandomSubset or "
                          f"alignments3D/split); subtraction uses the half-map of each particle's own half-set")
    box, pixel = particles.box_size, particles.pixel_size_A
    if params.new_box is not None and params.new_box > box:
        raise CryocvError(f"--new-box {params.new_box} is larger than the particles' box ({box} px)")
    half_maps, keep_mask = read_maps(half_map_paths, keep_mask_path, box, pixel)
    center = None
    if params.recenter:
        if not keep_mask.sum() > 0:
            raise CryocvError(f"--recenter needs a keep mask with some density to centre on; {keep_mask_path} "
                              f"is all zero")
        center = center_of_mass(keep_mask)
    star_path, stack_path = jobdir.path(out_dir, jobdir.PARTICLES_STAR), jobdir.path(out_dir, jobdir.SUBTRACTED_STACK)
    input_files = {os.path.abspath(particles_path)} | {os.path.abspath(p) for p in np.unique(particles.stack_paths)}
    if {os.path.abspath(star_path), os.path.abspath(stack_path)} & input_files:
        raise CryocvError(f"--out {out_dir} would overwrite the input particles; choose another folder")
    xp, _ = select_device(device)
    jobdir.create_output_dir(out_dir, overwrite, also=(jobdir.PARTICLES_STAR, jobdir.SUBTRACTED_STACK))
    log = jobdir.JobLog(out_dir)
    for note in notes:
        log(note)
    r_max = (box * pixel / params.scale_resolution_A if params.scale_resolution_A
             else scale_fit_radius_px(*half_maps))
    out_box = params.new_box or box
    with StackWriter(stack_path, len(particles), out_box, pixel) as stack:
        scales, origin_px = subtract_source(ParticleSource(particles, xp), half_maps, keep_mask, stack.write,
                                            params.batch_size, params.fit_scale, r_max, center,
                                            params.new_box, progress=progress, log=log)
    result = {"n_particles": len(particles), "box_size": out_box, "scale_median": float(np.median(scales)),
              "scale_p5_p95": [float(v) for v in np.percentile(scales, [5, 95])],
              "scale_fit_resolution_A": box * pixel / r_max if params.fit_scale else None,
              "recenter_xyz_A": None if center is None else [float(c * pixel) for c in center]}
    log(f"scales: median {result['scale_median']:.3f}, 5–95% {result['scale_p5_p95'][0]:.3f}–"
        f"{result['scale_p5_p95'][1]:.3f}" + (f" (fit to {result['scale_fit_resolution_A']:.2f} Å)"
                                              if params.fit_scale else " (not fitted)"))
    output = subtracted_particles(particles, stack_path, star_path, out_box,
                                  origin_px.astype(np.float64) * pixel if center is not None else particles.origin_A)
    inputs = {"particles": os.path.abspath(particles_path), "half_maps": [os.path.abspath(p) for p in half_map_paths],
              "keep_mask": os.path.abspath(keep_mask_path)}
    jobdir.write_json(jobdir.path(out_dir, jobdir.JOB_JSON),
                      jobdir.job_record("subtract", {**inputs, **asdict(params)}, xp, started, result))
    save_particles(output, star_path)          # last: marks the job finished
    return result
