"""Local refinement of a masked region (a domain, a bound partner, a subparticle) from the poses of
a consensus refinement: each particle is searched inside --rotation-extent-deg / --shift-extent-A
of its input pose (extents bound the change over the whole job), rotating about a fulcrum (default
the mask's centre of mass), by a coarse grid then branch-and-bound subdivision down to
--fine-step-deg; each half-set starts from its own half-map. --subtract first subtracts the signal
outside the mask (as `cryocv subtract`, each particle with its own half-map; the images are
written to particles_subtracted.mrcs and particles.star names them, keeping rlnImageOriginalName).
Writes what refine writes (half-maps, map.mrc, mask.mrc = the mask the FSC used, fsc.json,
particles.star, checkpoints, job.json) in the input frame, plus pose_change.png (rotation and
shift change from the input poses); the mass in the mask is logged and recorded."""
from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass

import numpy as np

from ..backend import StageTimer, memory_budget_bytes, to_device
from ..em_pass import HalfReferences
from ..errors import CryocvError
from ..fourier import shift_volume
from ..geometry import euler_to_matrix
from ..io.mrc import StackWriter
from ..io.particle_files import load_particles
from ..local_search import LocalPrior, from_fulcrum_frame, local_batch_size, local_start, start_plan, to_fulcrum_frame
from ..masks import auto_threshold_mask, mask_report
from ..plot_worker import BackgroundPlotter
from ..projector import prepare_volume
from ..relax import marginalization_level, mode_spread, pose_change, prior_in_mode
from ..search import SearchParams, SearchResult, search_schedule, shift_grid, subdivide
from ..source import ParticleSource
from ..subtraction import center_of_mass, scale_fit_radius_px, subtract_source
from ..symmetry import symmetry_operators
from . import jobdir, relaxation
from .common import (device_args, load_checked_particles, option, output_args, params_from_args, select_device)
from .checkpoints import RefineState, finishes_writes_on_error
from .jobdir import JobLog
from .loop import PoseSearch, check_against_nyquist, iterate, open_refinement, start_reference
from .refine import RefineParams, add_marginalization_args, add_relaxation_args, add_search_and_regularizer_args
from .subtract import read_maps, subtracted_particles

HELP = "local refinement of a masked region from prior poses (optionally after signal subtraction)"


@dataclass
class LocalRefineParams(RefineParams):
    """Settings of a local refinement (angles in degrees, lengths in Å); the rest as refine."""

    # uniform by default: with the NU filter the references of a small masked region went wrong
    # over the iterations (bench/results/local_two_body*.md: 50 kDa domain 17.8 Å with NU, 3.64 Å uniform)
    regularizer: str = "uniform"
    register_halves: bool = False            # the input poses start in register and the local search keeps them
    initial_lowpass_A: float = 12.0
    max_iterations: int = 8
    rotation_extent_deg: float = 20.0
    shift_extent_A: float = 10.0
    coarse_step_deg: float | None = None     # default: the extent / 4, within [2 × fine step, 10°]
    prior_sigma_deg: float | None = None     # Gaussian prior on the rotation change (off)
    prior_sigma_A: float | None = None       # Gaussian prior on the shift change (off)
    fulcrum: str = "mask-center"             # mask-center, box-center or X,Y,Z (Å, map frame, from the corner)
    recenter_each_iteration: bool = False    # extents around the last iteration's poses, not the input's
    # after the first iteration: start at the second search level, within this many of its steps
    # around each particle's last pose (the extents around the input still bound it); 0: every
    # iteration starts from the whole extents
    narrow_steps: int = 2               # bench/results/local_throughput.md: same accuracy, ~2x faster
    mask_mode: str = "static"                # static: the mask is used as given; dynamic: thresholded inside it
    subtract: bool = False                   # subtract the signal outside the mask first
    fit_scale: bool = True                   # --subtract: per-particle scale of the subtracted signal

    def validate(self):
        super().validate()
        checks = [(0 < self.rotation_extent_deg <= 180, "--rotation-extent-deg must be in (0, 180]"),
                  (self.shift_extent_A >= 0, "--shift-extent-A must be >= 0"),
                  (self.coarse_step_deg is None or self.coarse_step_deg >= self.fine_step_deg,
                   "--coarse-step-deg must be >= --fine-step-deg"),
                  (self.prior_sigma_deg is None or self.prior_sigma_deg > 0, "--prior-sigma-deg must be positive"),
                  (self.prior_sigma_A is None or self.prior_sigma_A > 0, "--prior-sigma-A must be positive"),
                  (self.mask_mode in MASK_MODES, "--mask-mode must be static or dynamic"),
                  (self.narrow_steps >= 0, "--narrow-steps must be >= 0")]
        for ok, message in checks:
            if not ok:
                raise CryocvError(message)
        if self.fulcrum not in FULCRUM_NAMES:
            fulcrum_point_A(self.fulcrum)                  # a one-line error for a bad value

    def coarse_step(self) -> float:
        if self.coarse_step_deg is not None:
            return self.coarse_step_deg
        return float(np.clip(self.rotation_extent_deg / 4, 2 * self.fine_step_deg, 10.0))


FULCRUM_NAMES = ("mask-center", "box-center")
MASK_MODES = ("static", "dynamic")


def fulcrum_point_A(spec: str) -> np.ndarray:
    """The point "X,Y,Z" (Å) of a --fulcrum value."""
    try:
        xyz = np.array([float(v) for v in spec.split(",")])
    except ValueError:
        xyz = np.array([])
    if xyz.size != 3 or not np.isfinite(xyz).all():
        raise CryocvError(f"--fulcrum takes {' or '.join(FULCRUM_NAMES)} or X,Y,Z in Å; got {spec!r}")
    return xyz


def fulcrum_px(spec: str, mask, pixel_size_A: float) -> np.ndarray:
    """The fulcrum (x, y, z) in px from the box centre: the mask's centre of mass, the box centre,
    or a point "X,Y,Z" in Å from the map's corner (as ChimeraX shows a map with origin 0)."""
    if spec == "mask-center":
        return center_of_mass(mask)
    if spec == "box-center":
        return np.zeros(3)
    return fulcrum_point_A(spec) / pixel_size_A - mask.shape[0] // 2


def local_search(params: LocalRefineParams, box_size: int, pixel_size_A: float, xp, fulcrum: np.ndarray,
                 operators: np.ndarray | None = None):
    """``make_search`` of :func:`cryocv.jobs.loop.iterate` for a local search about ``fulcrum``
    (px from the box centre) inside the extents around the prior poses. ``operators`` (G, 3, 3)
    (symmetry relaxation): the extents hold modulo the group: each particle is searched around
    the mate of its prior pose nearest its last pose."""
    search = SearchParams(base_step_deg=params.coarse_step(), fine_step_deg=params.fine_step_deg,
                          max_shift_px=params.shift_extent_A / pixel_size_A, n_candidates=params.n_candidates,
                          n_base_candidates=params.n_base_candidates, cutoff_times_step=params.cutoff_times_step,
                          base_cutoff_times_step=params.base_cutoff_times_step, candidate_decay=params.candidate_decay)
    extent_rad, shift_px = math.radians(params.rotation_extent_deg), params.shift_extent_A / pixel_size_A
    sigma_rad = math.radians(params.prior_sigma_deg) if params.prior_sigma_deg else None
    sigma_px = params.prior_sigma_A / pixel_size_A if params.prior_sigma_A else None

    def make_search(volumes, noise, cutoff_px: float, state: RefineState) -> PoseSearch:
        levels = search_schedule(box_size, cutoff_px, search)
        whole = start_plan(levels, search, extent_rad)
        # after the first iteration, optionally a small window around the last poses (narrowed)
        plan = start_plan(levels, search, extent_rad, params.narrow_steps) if state.iteration > 0 else whole
        start_offsets = to_device(plan.offsets, xp)
        # batches sized for the whole start grid (a narrowed start is smaller; its subdivision is not)
        n_shifts = shift_grid(shift_px, levels[0].shift_step_px).shape[0]
        # the search's references: each half-map with the fulcrum moved to the box centre
        refs = HalfReferences({h: shift_volume(volumes.maps[h], -fulcrum) for h in (1, 2)}, prepare_volume)
        batch_size = params.batch_size or local_batch_size(box_size, levels[0], whole.offsets.shape[0], n_shifts,
                                                           memory_budget_bytes(xp), cpu=xp is np)
        recentre = params.recenter_each_iteration and state.euler_deg is not None
        spread_level = marginalization_level(levels, params.marginalize_step_deg)

        def find_poses(batch) -> SearchResult:
            rotations, origins = batch.rotations, batch.origin_px
            if recentre:
                rotations = to_device(euler_to_matrix(state.euler_deg[batch.index]).astype(np.float32), xp)
                origins = to_device((state.origin_A[batch.index] / pixel_size_A).astype(np.float32), xp)
            elif operators is not None and state.euler_deg is not None:
                current = to_device(euler_to_matrix(state.euler_deg[batch.index]).astype(np.float32), xp)
                rotations = prior_in_mode(rotations, current, operators)
            prior = LocalPrior(rotations, to_fulcrum_frame(rotations, origins, fulcrum), extent_rad, shift_px,
                               sigma_rad, sigma_px)
            centre = None
            if plan.first_level:
                last = to_device(euler_to_matrix(state.euler_deg[batch.index]).astype(np.float32), xp)
                last_origins = to_device((state.origin_A[batch.index] / pixel_size_A).astype(np.float32), xp)
                centre = (last, to_fulcrum_frame(last, last_origins, fulcrum))
            volume = refs[batch.half]
            start = local_start(volume, batch.images_ft, batch.ctf, noise, levels[plan.first_level], prior,
                                start_offsets, plan.n_kept, centre=centre, window_px=plan.window_px)
            found = subdivide(volume, batch.images_ft, batch.ctf, noise, levels[plan.first_level:], plan.subdivision,
                              start, prior=prior)
            spread = None
            if spread_level is not None:
                spread = mode_spread(volume, batch.images_ft, batch.ctf, noise, found, spread_level)
                b, k = spread.shifts_px.shape[:2]
                spread.shifts_px = from_fulcrum_frame(spread.rotations.reshape(b * k, 3, 3),
                                                      spread.shifts_px.reshape(b * k, 2), fulcrum).reshape(b, k, 2)
            return SearchResult(found.rotations, from_fulcrum_frame(found.rotations, found.shifts_px, fulcrum),
                                found.scores, spread)
        return PoseSearch(find_poses, levels, batch_size)

    return make_search


def add_args(p):
    p.add_argument("--particles", help="particles (.star or .cs) with poses, CTF and half-sets (a consensus)")
    p.add_argument("--half-maps", nargs=2, metavar=("H1", "H2"), help="the consensus half-maps (MRC)")
    p.add_argument("--mask", help="mask (MRC, values in [0, 1]) of the region to refine")
    p.add_argument("--out", help="output directory")
    p.add_argument("--continue", dest="continue_dir", metavar="DIR",
                   help="continue the local refinement in DIR from its last checkpoint")
    option(p, "--subtract", LocalRefineParams, "subtract", action="store_true",
           help="subtract the signal outside the mask first (each particle with its own half-map)")
    option(p, "--fulcrum", LocalRefineParams, "fulcrum",
           help="centre of the rotations: mask-center, box-center or X,Y,Z (Å from the map's corner)")
    option(p, "--rotation-extent-deg", LocalRefineParams, "rotation_extent_deg",
           help="largest rotation change from the input pose")
    option(p, "--shift-extent-A", LocalRefineParams, "shift_extent_A", help="largest shift change of the fulcrum")
    p.add_argument("--coarse-step-deg", dest="coarse_step_deg", type=float, default=None,
                   help="angular step of the starting grid (default: extent/4, 2× fine step to 10°)")
    p.add_argument("--prior-sigma-deg", dest="prior_sigma_deg", type=float, default=None,
                   help="Gaussian prior width on the rotation change (default: none)")
    p.add_argument("--prior-sigma-A", dest="prior_sigma_A", type=float, default=None,
                   help="Gaussian prior width on the shift change (default: none)")
    option(p, "--recenter-each-iteration", LocalRefineParams, "recenter_each_iteration", action="store_true",
           help="search around the last iteration's poses instead of the input's")
    option(p, "--narrow-steps", LocalRefineParams, "narrow_steps",
           help="after the first iteration, search within this many second-level steps (2.5° with the default "
                "extents) of each particle's last pose, still inside the extents; 0: the whole extents every iteration")
    option(p, "--mask-mode", LocalRefineParams, "mask_mode", choices=list(MASK_MODES),
           help="static: the mask as given for alignment and FSC; dynamic: thresholded map inside it")
    option(p, "--no-scale", LocalRefineParams, "fit_scale", action="store_false",
           help="--subtract: no per-particle scale of the subtracted signal (as RELION)")
    add_search_and_regularizer_args(p, LocalRefineParams)
    add_relaxation_args(p, LocalRefineParams)
    add_marginalization_args(p, LocalRefineParams)
    output_args(p)
    device_args(p, gpu=True)


def main(args) -> int:
    if args.continue_dir:
        args.out = args.continue_dir
        report = run(None, None, None, args.continue_dir, resume=True, progress=not args.quiet)
    else:
        missing = [flag for flag, value in (("--particles", args.particles), ("--half-maps", args.half_maps),
                                            ("--mask", args.mask), ("--out", args.out)) if not value]
        if missing:
            raise CryocvError(f"local-refine needs {', '.join(missing)} (or --continue DIR)")
        report = run(args.particles, args.half_maps, args.mask, args.out, params_from_args(LocalRefineParams, args),
                     device=args.device, gpu_ids=args.gpu, datadir=args.datadir, progress=not args.quiet,
                     overwrite=args.overwrite)
    print(f"gold-standard resolution in the mask {report['resolution_A']:.2f} Å; map: "
          f"{jobdir.path(args.out, jobdir.MAP)}, pose change: {jobdir.path(args.out, jobdir.POSE_CHANGE_PNG)}")
    return 0


def initial_local_state(half_maps, mask, pixel_size_A: float, lowpass_A: float, xp=np) -> RefineState:
    """Each half-set's reference = its own half-map low-passed to ``lowpass_A`` (on ``xp``'s
    device, :func:`~.loop.start_reference`); the mask aligns."""
    references = [start_reference(to_device(m, xp), pixel_size_A, lowpass_A) for m in half_maps]
    return RefineState(iteration=0, references=references, mask=mask, resolution_A=max(lowpass_A, 2 * pixel_size_A),
                       euler_deg=None, origin_A=None, noise_var_shell=None)


def subtract_into(out_dir: str, particles, half_maps, mask, xp, params: LocalRefineParams, progress: bool, log):
    """--subtract: particles (as `cryocv subtract` writes them) whose images lack the signal outside
    ``mask``, written to the job's particles_subtracted.mrcs."""
    stack_path = jobdir.path(out_dir, jobdir.SUBTRACTED_STACK)
    n, px = particles.box_size, particles.pixel_size_A
    with StackWriter(stack_path, len(particles), n, px) as stack:
        scales, _ = subtract_source(ParticleSource(particles, xp), half_maps, mask, stack.write, 256,
                                    params.fit_scale, scale_fit_radius_px(*half_maps), progress=progress, log=log)
    log(f"subtracted the signal outside the mask; scales median {np.median(scales):.3f}")
    return subtracted_particles(particles, stack_path, jobdir.path(out_dir, jobdir.PARTICLES_STAR), n,
                                particles.origin_A)


def pose_change_diagnostics(job_dir: str, input_particles: str | None = None) -> dict:
    """What pose_change.png shows, read from a finished job's files (a viewer redraws it): keyword
    arguments of :func:`cryocv.plotting.draw_pose_change`. ``input_particles``: the job's input
    (default: the path recorded at its start), rows matched on rlnImageId when the job left some out."""
    config = jobdir.read_json(jobdir.path(job_dir, jobdir.REFINE_CONFIG))
    params = LocalRefineParams(**config["parameters"])
    report = jobdir.read_json(jobdir.path(job_dir, jobdir.FSC_JSON))
    refined = load_particles(jobdir.path(job_dir, jobdir.PARTICLES_STAR))
    start = load_particles(input_particles or config["particles"], config["datadir"])  # metadata only
    if len(start) != len(refined):
        ids = [p.extra.get("particles_table", {}).get("rlnImageId") for p in (start, refined)]
        if any(i is None for i in ids):
            raise CryocvError(f"{job_dir} has {len(refined)} particles, its input {len(start)}, without "
                              f"rlnImageId to match them")
        row = {int(image_id): i for i, image_id in enumerate(ids[0])}
        start = start.subset(np.array([row[int(image_id)] for image_id in ids[1]]))
    grid = np.broadcast_to(np.float32(0), (refined.box_size,) * 3)        # only its shape counts
    fulcrum = fulcrum_px(",".join(str(c) for c in report["local"]["fulcrum_A"]), grid, refined.pixel_size_A)
    rotation, shift = pose_change(refined, start.euler_deg, start.origin_A, fulcrum, report["symmetry"])
    return {"rotation_change_deg": rotation, "shift_change_A": shift, "rotation_extent_deg": params.rotation_extent_deg,
            "shift_extent_A": params.shift_extent_A,
            "title": f"{len(refined)} particles, {report['resolution_A']:.2f} Å in the mask: change from the input poses"}


@finishes_writes_on_error
def run(particles_path, half_map_paths, mask_path, out_dir: str, params: LocalRefineParams | None = None,
        device: str = "auto", gpu_ids=None, datadir=None, resume: bool = False, progress: bool = True,
        overwrite: bool = False) -> dict:
    """Local refinement job (see the module docstring); returns the FSC report (+ ``local``)."""
    started, startup = time.time(), StageTimer()     # host stages before the first pass, logged
    config_path = jobdir.path(out_dir, jobdir.REFINE_CONFIG)
    config, params, store = open_refinement(out_dir, resume, params, LocalRefineParams,
                                            ("particles", "half_maps", "mask"), overwrite=overwrite)
    if resume:
        particles_path, half_map_paths, mask_path = config["particles"], config["half_maps"], config["mask"]
        datadir, device, gpu_ids = config["datadir"], config["device"], config["gpu"]
    with startup("device"):
        xp, ids = select_device(device, gpu_ids)
    notes = []
    with startup("particles: read + check"):
        particles = load_checked_particles(particles_path, datadir, params.strict, notes.append)
    particles.require_alignment("local refinement")
    if np.any(particles.half_set == 0):
        raise CryocvError(f"{particles.source} has particles without a half-set (rlnRandomSubset): local "
                          f"refinement keeps the consensus half-sets")
    if particles.ctf is None:
        raise CryocvError(f"{particles_path} has no CTF parameters: local refinement needs them")
    n, px = particles.box_size, particles.pixel_size_A
    check_against_nyquist(params, px)
    with startup("half-maps and mask"):
        half_maps, mask = read_maps(half_map_paths, mask_path, n, px)
    if not mask.max() > 0.5:
        raise CryocvError(f"mask {mask_path} is empty (no value above 0.5): it must mark the region to refine")
    fulcrum = fulcrum_px(params.fulcrum, mask, px)
    input_euler, input_origin_A = particles.euler_deg.copy(), particles.origin_A.copy()
    state = store.load_latest() if resume else None
    if not resume:
        jobdir.create_output_dir(out_dir, overwrite, also=(jobdir.SUBTRACTED_STACK, jobdir.DIFFERENCE_MAP,
                                                           jobdir.RELAX_PNG))
        jobdir.write_json(config_path, {"particles": os.path.abspath(particles_path),
                                        "half_maps": [os.path.abspath(p) for p in half_map_paths],
                                        "mask": os.path.abspath(mask_path), "datadir": datadir, "device": device,
                                        "gpu": gpu_ids, "parameters": asdict(params)})
    log, plotter = JobLog(out_dir), BackgroundPlotter()     # the plotter imports matplotlib meanwhile
    for note in notes:
        log(note)
    with startup("mask report"):
        masses = mask_report(mask, px)
    log(f"local refinement of {len(particles)} particles ({n} px, {px:.3f} Å/px): mask {masses['mask_mass_kDa']:.0f} "
        f"kDa of protein volume, soft edge {masses['mask_soft_edge_A']:.1f} Å; fulcrum "
        f"({', '.join(f'{(c + n // 2) * px:.1f}' for c in fulcrum)}) Å; extents {params.rotation_extent_deg:g}° / "
        f"{params.shift_extent_A:g} Å, {params.mask_mode} mask, {params.regularizer.upper()}")
    if params.subtract:
        with startup("subtraction"):
            if resume and os.path.isfile(jobdir.path(out_dir, jobdir.SUBTRACTED_STACK)):
                particles = subtracted_particles(particles, jobdir.path(out_dir, jobdir.SUBTRACTED_STACK),
                                                 jobdir.path(out_dir, jobdir.PARTICLES_STAR), n, particles.origin_A)
            else:
                particles = subtract_into(out_dir, particles, half_maps, mask, xp, params, progress, log)
    if state is None:
        with startup("start references"):
            state = initial_local_state(half_maps, mask, px, params.initial_lowpass_A, xp)
    log("  startup: " + startup.summary())
    device_mask = to_device(mask, xp)
    if params.mask_mode == "static":
        def make_mask(average):
            return device_mask
    else:
        def make_mask(average):
            try:
                return auto_threshold_mask(average * device_mask, px, params.mask_threshold)
            except ValueError:
                return device_mask
    operators = symmetry_operators(params.symmetry) if params.relax else None
    make_search, register_halves, state = relaxation.compose(
        local_search(params, n, px, xp, fulcrum, operators), params, particles, state, xp, log,
        where=f" about the box centre (the extents hold modulo {params.symmetry})")
    if not state.final_done:
        state, maps = iterate(particles, state, params, xp, store, make_search, progress=progress, log=log,
                              make_mask=make_mask, register_halves=register_halves)
        half, out_mask, report, full = maps.half_maps, maps.mask, maps.report, maps.full_map
    else:
        half, out_mask, report, full, _ = store.final_outputs(state)
    particles.euler_deg = state.euler_deg.astype(np.float64)
    particles.origin_A = state.origin_A.astype(np.float64)
    rotation, shift = pose_change(particles, input_euler, input_origin_A, fulcrum, params.symmetry)
    at_limit = {"rotation": float(np.mean(rotation >= 0.95 * params.rotation_extent_deg)),
                "shift": float(np.mean(shift >= 0.95 * params.shift_extent_A)) if params.shift_extent_A else 0.0}
    local = {**masses, "fulcrum_A": [float((c + n // 2) * px) for c in fulcrum],
             "rotation_change_median_deg": float(np.median(rotation)),
             "shift_change_median_A": float(np.median(shift)), "fraction_at_extent": at_limit}
    report.update(symmetry=params.symmetry, n_particles=len(particles), regularizer=params.regularizer,
                  iterations=state.history, local=local, map_symmetry=params.reconstruction_symmetry())
    if params.relax:
        report["relax"] = relaxation.relaxation_outputs(out_dir, full, particles, euler_to_matrix(input_euler),
                                                        params, px, state.history)
    log(f"pose change from the input: median {local['rotation_change_median_deg']:.2f}°, "
        f"{local['shift_change_median_A']:.2f} Å; at the extents: {100 * at_limit['rotation']:.1f}% (rotation), "
        f"{100 * at_limit['shift']:.1f}% (shift)" + ("  -- many at an extent: widen it" if max(at_limit.values()) > 0.05
                                                     else ""))
    rule_A = 5 * report["resolution_A"]
    if masses["mask_soft_edge_A"] < min(rule_A, 0.25 * n * px):
        log(f"warning: the mask's soft edge ({masses['mask_soft_edge_A']:.1f} Å) is narrower than the usual rule "
            f"(about 5 × resolution = {rule_A:.1f} Å): a sharp mask can inflate the FSC")
    title = f"{len(particles)} particles, local {params.regularizer.upper()}: {report['resolution_A']:.2f} Å in the mask"
    record = jobdir.job_record("local-refine", {"particles": os.path.abspath(particles_path), "resumed": resume,
                                                **asdict(params)}, xp, started,
                               {"resolution_A": report["resolution_A"], "iterations": state.iteration,
                                "n_particles": len(particles), **local})

    def plots(plotter):
        plotter.plot("plot_pose_change", rotation, shift, params.rotation_extent_deg, params.shift_extent_A,
                     jobdir.path(out_dir, jobdir.POSE_CHANGE_PNG), title)
    outputs_started = time.time()
    jobdir.write_results(out_dir, px, half, full, out_mask, report, particles, title, record, {},
                         before_record=plots, checkpoint=store, iteration=state.iteration, plotter=plotter)
    log(f"done: {report['resolution_A']:.2f} Å gold-standard in the mask after {state.iteration} iterations "
        f"({jobdir.outputs_note(record, outputs_started, started)})")
    return report
