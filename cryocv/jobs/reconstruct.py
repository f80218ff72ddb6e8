"""Back-project particles into half-set reconstructions from their poses; write half_map_1.mrc,
half_map_2.mrc, map.mrc (FSC-weighted), mask.mrc, fsc.json, fsc.png, particles.star and
job.json in DIR."""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass

from ..backend import to_device, to_numpy
from ..errors import CryocvError
from ..fsc import combine_half_maps, gold_standard_fsc
from ..io.mrc import read_map
from ..masks import auto_threshold_mask
from ..reconstruct import DEFAULT_BATCH_SIZE, reconstruct_half_maps
from ..symmetry import DEFAULT_SYMMETRY
from . import jobdir
from .common import (DEFAULT_DEVICE, DEFAULT_SEED, check_result, device_args, output_args, load_checked_particles, option, params_from_args,
                     require_half_sets, select_device, symmetry_arg)

HELP = "gold-standard reconstruction from given poses"


@dataclass
class ReconstructParams:
    symmetry: str = DEFAULT_SYMMETRY
    batch_size: int = DEFAULT_BATCH_SIZE
    seed: int = DEFAULT_SEED             # half-set split when the particles have none
    strict: bool = False                 # unusable images stop the job instead of being left out


def add_args(p):
    p.add_argument("--particles", required=True, help="particles (.star or .cs) with poses")
    p.add_argument("--out", required=True, help="output directory")
    option(p, "--sym", ReconstructParams, "symmetry", help="point group: C<n>, D<n>, T, O, I")
    p.add_argument("--mask", help="mask (MRC) for the masked FSC (default: automatic threshold mask)")
    p.add_argument("--datadir", help="extra folder to look for image stacks in")
    option(p, "--batch-size", ReconstructParams, "batch_size", help="images per batch")
    option(p, "--seed", ReconstructParams, "seed", help="seed for the half-set split when none is given")
    option(p, "--strict", ReconstructParams, "strict", action="store_true",
           help="stop at an unusable image (NaN, blank, overflowing) instead of leaving it out")
    output_args(p)
    device_args(p)


def main(args) -> int:
    report = run(args.particles, args.out, params_from_args(ReconstructParams, args), mask_path=args.mask,
                 device=args.device, datadir=args.datadir, progress=not args.quiet, overwrite=args.overwrite)
    print(f"gold-standard resolution {report['resolution_A']:.2f} Å (FSC 0.143); "
          f"map: {jobdir.path(args.out, jobdir.MAP)}, plot: {jobdir.path(args.out, jobdir.FSC_PNG)}")
    return 0


def run(particles_path: str, out_dir: str, params: ReconstructParams | None = None, mask_path=None,
        device: str = DEFAULT_DEVICE, datadir=None, progress: bool = True, overwrite: bool = False) -> dict:
    """Gold-standard reconstruction from given poses (:func:`cryocv.reconstruct.reconstruct_half_maps`);
    ``overwrite`` replaces a job already in ``out_dir``. Returns the FSC report."""
    started = time.time()
    params = params or ReconstructParams()
    if params.batch_size <= 0:
        raise CryocvError("--batch-size must be positive")
    params.symmetry = symmetry_arg(params.symmetry)
    jobdir.check_output_dir(out_dir, overwrite)
    particles = load_checked_particles(particles_path, datadir, params.strict)
    particles.require_alignment("reconstruct")
    require_half_sets(particles, params.seed, 1)
    mask = None
    if mask_path:
        mask, _ = read_map(mask_path)
        if mask.shape != (particles.box_size,) * 3:
            raise CryocvError(f"mask {mask_path} is {mask.shape[0]} px, particles are {particles.box_size} px")
    xp, _ = select_device(device)
    jobdir.create_output_dir(out_dir, overwrite)
    half1, half2 = reconstruct_half_maps(particles, xp, params.symmetry, params.batch_size, progress=progress)
    average = (half1 + half2) / 2
    if mask is None and float(xp.max(average)) > 0:
        try:
            mask = to_numpy(auto_threshold_mask(average, particles.pixel_size_A))
        except ValueError:
            mask = None
    report = gold_standard_fsc(half1, half2, particles.pixel_size_A,
                               mask=None if mask is None else to_device(mask, xp), seed=params.seed)
    full = combine_half_maps(half1, half2, report.get("fsc_corrected", report["fsc_unmasked"]))
    check_result(report, (half1, half2))
    report["symmetry"] = params.symmetry
    report["n_particles"] = len(particles)
    record = jobdir.job_record("reconstruct", {"particles": os.path.abspath(particles_path), "mask": mask_path,
                                               **asdict(params)}, xp, started,
                               {"resolution_A": report["resolution_A"], "n_particles": len(particles)})
    jobdir.write_results(out_dir, particles.pixel_size_A, (half1, half2), full, mask, report, particles,
                         f"{len(particles)} particles, {params.symmetry}: {report['resolution_A']:.2f} Å", record)
    return report
