"""Refine particles against a low-resolution reference: branch-and-bound global pose search,
back-projection into half-set maps, non-uniform (NU, default) or uniform FSC-Wiener
regularization, dynamic mask, masked and corrected FSC. Writes half_map_1/2.mrc (unfiltered),
map.mrc (FSC-weighted), map_nu_filtered.mrc and nu_cutoff_A.mrc (NU), mask.mrc, fsc.json,
fsc.png, poses.png, particles.star (new poses, half-sets), per-iteration checkpoints and
job.json in DIR. A killed job continues with --continue DIR."""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass

import numpy as np

from ..backend import StageTimer, memory_budget_bytes
from ..errors import CryocvError
from ..io.particle_files import load_particles
from ..nonuniform import NUParams
from ..plot_worker import BackgroundPlotter
from ..relax import marginalization_level, mode_spread
from ..search import BaseGrid, SearchParams, search_batch_size, search_poses, search_schedule
from ..symmetry import DEFAULT_SYMMETRY, pose_distance_deg
from . import jobdir, relaxation
from .common import (DEFAULT_DEVICE, DEFAULT_SEED, device_args, output_args, load_checked_particles, option, params_from_args, read_cubic_map,
                     require_half_sets, select_device)
from .checkpoints import finishes_writes_on_error
from .jobdir import JobLog
from .loop import PoseSearch, check_against_nyquist, initial_state, iterate, open_refinement
from .registration import MIN_MOVE_DEG, MIN_MOVE_PX, registration_series

HELP = "gold-standard 3D refinement (global pose search; NU or uniform)"
RELAX_MODES = (None, "maximize", "marginalize")     # --relax: off, best mate, likelihood-weighted inside its mode


@dataclass
class RefineParams:
    """Settings of a refinement (angles in degrees, lengths in Å); recorded in refine_config.json."""

    regularizer: str = "nu"             # "nu" or "uniform"
    symmetry: str = DEFAULT_SYMMETRY
    initial_lowpass_A: float = 30.0
    max_iterations: int = 10            # iterations before the final pass to Nyquist
    min_iterations: int = 3
    base_step_deg: float = SearchParams.base_step_deg
    fine_step_deg: float = SearchParams.fine_step_deg
    max_shift_A: float | None = None    # default: 10% of the box
    n_candidates: int = SearchParams.n_candidates
    n_base_candidates: int = SearchParams.n_base_candidates
    cutoff_times_step: float = SearchParams.cutoff_times_step
    base_cutoff_times_step: float = SearchParams.base_cutoff_times_step
    candidate_decay: int = SearchParams.candidate_decay
    extra_shells: int = 4               # alignment uses the resolution shell + this many
    max_align_res_A: float | None = None  # never align to finer than this (Å), the final pass included
    staged_start_res_A: float | None = None  # first stage aligns no finer than this (Å), then a restart from it
    nu_cutoffs: int = NUParams.n_cutoffs
    nu_order: int = NUParams.order
    nu_awf: float = NUParams.awf
    nu_half_map_noise: bool = NUParams.half_map_noise
    nu_max_window_fraction: float | None = NUParams.max_window_fraction
    mask_threshold: float = 0.2         # dynamic mask threshold, fraction of the map's maximum
    batch_size: int | None = None       # default: from the memory budget
    stream: bool = False                # read images from disk every pass even if their FTs fit the device
    strict: bool = False                # unusable images stop the job instead of being left out
    keep_checkpoints: int = 2           # iteration folders kept (the newest); 0 keeps all
    seed: int = DEFAULT_SEED
    relax: str | None = None            # symmetry relaxation (RELAX_MODES): search --sym's mates, reconstruct in C1
    break_symmetry: bool = False        # relaxation: start from C1 half-maps of the input poses turned by random mates
    relax_max_align_res_A: float | None = None  # relaxation: the mate choice never aligns finer than this (Å)
    extra_final_passes: int = 0         # passes at Nyquist after the final one
    join_halves_A: float | None = None  # the half-references share their components at this resolution and coarser
    marginalize_step_deg: float | None = None   # likelihood-weighted poses ± this step around the best (RELION-like)
    register_halves: bool = True        # after each iteration, half-set 2's reference and poses moved onto half-set 1's

    def reconstruction_symmetry(self) -> str:
        """The symmetry the maps are reconstructed with: C1 when relaxing, else ``symmetry``."""
        return "C1" if self.relax else self.symmetry

    def validate(self):
        if self.regularizer not in ("nu", "uniform"):
            raise CryocvError(f"--regularizer must be nu or uniform, got {self.regularizer!r}")
        checks = [(self.initial_lowpass_A > 0, "--initial-lowpass-A must be positive"),
                  (self.max_iterations >= 1, "--max-iterations must be at least 1"),
                  (0 < self.fine_step_deg <= self.base_step_deg <= 60, "need 0 < fine step <= base step <= 60°"),
                  (self.max_shift_A is None or self.max_shift_A >= 0, "--max-shift-A must be >= 0"),
                  (self.n_candidates >= 1, "--candidates must be >= 1"),
                  (self.n_base_candidates >= 1, "--base-candidates must be >= 1"),
                  (self.nu_cutoffs >= 2, "--nu-cutoffs must be >= 2"),
                  (self.nu_order >= 1, "--nu-order must be >= 1"),
                  (self.nu_awf > 0, "--nu-awf must be positive"),
                  (self.batch_size is None or self.batch_size >= 1, "--batch-size must be >= 1"),
                  (self.keep_checkpoints >= 0, "--keep-checkpoints must be >= 0"),
                  (self.max_align_res_A is None or self.max_align_res_A > 0, "--max-align-res-A must be positive"),
                  (self.staged_start_res_A is None or self.staged_start_res_A > 0,
                   "--staged-start-res-A must be positive"),
                  (self.relax in RELAX_MODES, "--relax must be maximize or marginalize"),
                  (not self.break_symmetry or self.relax, "--break-symmetry needs --relax"),
                  (not self.relax or self.symmetry.upper() != "C1", "--relax needs a --sym group other than C1"),
                  (self.relax_max_align_res_A is None or self.relax_max_align_res_A > 0,
                   "--relax-max-align-res-A must be positive"),
                  (self.extra_final_passes >= 0, "--extra-final-passes must be >= 0"),
                  (self.marginalize_step_deg is None or self.marginalize_step_deg > 0,
                   "--marginalize-step-deg must be positive"),
                  (not (self.marginalize_step_deg and self.relax), "--marginalize-step-deg and --relax exclude each other"),
                  (self.nu_max_window_fraction is None or 0 <= self.nu_max_window_fraction <= 0.5,
                   "--nu-max-window-fraction must be between 0 (no cap) and 0.5"),
                  (self.join_halves_A is None or self.join_halves_A > 0, "--join-halves-A must be positive")]
        for ok, message in checks:
            if not ok:
                raise CryocvError(message)

    def search_params(self, box_size: int, pixel_size_A: float) -> SearchParams:
        max_shift_A = 0.1 * box_size * pixel_size_A if self.max_shift_A is None else self.max_shift_A
        return SearchParams(base_step_deg=self.base_step_deg, fine_step_deg=self.fine_step_deg,
                            max_shift_px=max_shift_A / pixel_size_A, n_candidates=self.n_candidates,
                            n_base_candidates=self.n_base_candidates, cutoff_times_step=self.cutoff_times_step,
                            base_cutoff_times_step=self.base_cutoff_times_step,
                            candidate_decay=self.candidate_decay)


def refine_params_from_config(parameters: dict) -> RefineParams:
    """The :class:`RefineParams` a job was started with, from its refine_config.json.
    Runs started before the base-candidate schedule kept ``n_candidates`` at every level and
    keep doing so when continued."""
    parameters = dict(parameters)
    parameters.setdefault("n_base_candidates", parameters.get("n_candidates", RefineParams.n_candidates))
    return RefineParams(**parameters)


def global_search(params: RefineParams, box_size: int, pixel_size_A: float, xp):
    """``make_search`` of :func:`cryocv.jobs.loop.iterate` for a global search: the base grid,
    then branch-and-bound subdivision, each half-set against its own reference."""
    search = params.search_params(box_size, pixel_size_A)

    def make_search(volumes: dict, noise, cutoff_px: float, state=None) -> PoseSearch:
        levels = search_schedule(box_size, cutoff_px, search)
        bases = {1: BaseGrid(volumes[1], box_size, levels[0], search)}    # one half-set's at a time
        batch_size = params.batch_size or search_batch_size(box_size, levels, search, bases[1],
                                                            memory_budget_bytes(xp), cpu=xp is np)

        spread_level = marginalization_level(levels, params.marginalize_step_deg)

        def find_poses(batch):
            if batch.half not in bases:
                bases.clear()
                bases[batch.half] = BaseGrid(volumes[batch.half], box_size, levels[0], search)
            found = search_poses(volumes[batch.half], batch.images_ft, batch.ctf, noise, levels, search,
                                 bases[batch.half])
            if spread_level is not None:
                found.spread = mode_spread(volumes[batch.half], batch.images_ft, batch.ctf, noise, found, spread_level)
            return found
        return PoseSearch(find_poses, levels, batch_size)

    return make_search


def add_args(p):
    p.add_argument("--particles", help="particles (.star or .cs) with CTF; poses are not needed")
    p.add_argument("--ref", help="starting reference map (MRC), same box and pixel size as the particles")
    p.add_argument("--out", help="output directory")
    p.add_argument("--continue", dest="continue_dir", metavar="DIR",
                   help="continue the refinement in DIR from its last checkpoint (other options are ignored)")
    p.add_argument("--max-shift-A", dest="max_shift_A", type=float, default=RefineParams.max_shift_A,
                   help="shift search range ± (default 10%% of the box)")
    option(p, "--base-step-deg", RefineParams, "base_step_deg", help="base angular grid of the search")
    add_search_and_regularizer_args(p, RefineParams)
    add_relaxation_args(p, RefineParams)
    add_marginalization_args(p, RefineParams)
    p.add_argument("--staged-start-res-A", dest="staged_start_res_A", type=float, default=RefineParams.staged_start_res_A,
                   help="staged start: align no finer than this (Å) until converged or --max-iterations, then "
                        "restart each half-set from its own (regularized) half-map low-passed to it and refine on "
                        "without the cap (each stage with its own --max-iterations, so up to twice the iterations); "
                        "e.g. 8 for a small protein from a featureless start, not from a good ab-initio map, where "
                        "it hurt (default: off)")
    output_args(p)
    device_args(p, gpu=True)


def add_search_and_regularizer_args(p, params_class, initial_lowpass: bool = True):
    """Options refine, local-refine and abinitio share, defaults from ``params_class``
    (``initial_lowpass``: the job starts from a given map)."""
    option(p, "--regularizer", params_class, "regularizer", choices=["nu", "uniform"],
           help="nu: non-uniform cross-validated filter; uniform: FSC-Wiener filter")
    option(p, "--sym", params_class, "symmetry", help="point group: C<n>, D<n>, T, O, I")
    if initial_lowpass:
        option(p, "--initial-lowpass-A", params_class, "initial_lowpass_A", help="low-pass of the reference (Å)")
    option(p, "--max-iterations", params_class, "max_iterations",
           help="iterations before the final pass to Nyquist, if not converged earlier")
    option(p, "--fine-step-deg", params_class, "fine_step_deg", help="finest angular step")
    p.add_argument("--max-align-res-A", dest="max_align_res_A", type=float, default=params_class.max_align_res_A,
                   help="never align to finer than this resolution (Å), the final pass included (default: no limit)")
    option(p, "--candidates", params_class, "n_candidates", help="poses kept per image at the fine search levels")
    option(p, "--base-candidates", params_class, "n_base_candidates",
           help="poses kept per image after the coarse base grid, halved per level down to --candidates")
    option(p, "--nu-cutoffs", params_class, "nu_cutoffs", help="NU: candidate cutoffs")
    option(p, "--nu-order", params_class, "nu_order", help="NU: Butterworth filter order")
    option(p, "--nu-awf", params_class, "nu_awf", help="NU: adaptive window factor")
    option(p, "--nu-plain-cv", params_class, "nu_half_map_noise", action="store_false",
           help="NU: the paper's plain quarter-map CV loss, without the correction for the quarter-maps' "
                "extra noise")
    p.add_argument("--nu-max-window-fraction", dest="nu_max_window_fraction", type=float,
                   default=params_class.nu_max_window_fraction,
                   help="NU: the cross-validation window's radius never exceeds this fraction of the box (default "
                        f"{params_class.nu_max_window_fraction}); 0: no cap, "
                        "the paper's window (bench/results/small_membrane.md: the cap keeps NU from blurring a small "
                        "particle, and from doing worse than uniform on TRPV1 at 500 particles)")
    p.add_argument("--join-halves-A", dest="join_halves_A", type=float, default=params_class.join_halves_A,
                   help="the two half-references share their Fourier components at this resolution and coarser "
                        "(as RELION's --low_resol_join_halves; default: never)")
    registration = ("after each iteration, half-set 2's map and poses are moved onto half-set 1's when their maps are "
                    f"over {MIN_MOVE_DEG:g}° or {MIN_MOVE_PX:g} px apart (six numbers shared; "
                    "bench/results/small_membrane.md); with --relax the half-sets are registered over the group instead")
    if params_class.register_halves:
        option(p, "--no-register-halves", params_class, "register_halves", action="store_false",
               help=f"do not keep the half-sets in register (by default {registration})")
    else:
        option(p, "--register-halves", params_class, "register_halves", action="store_true", help=registration)
    p.add_argument("--batch-size", dest="batch_size", type=int, default=params_class.batch_size,
                   help="images per batch (default: from the memory budget)")
    option(p, "--stream", params_class, "stream", action="store_true",
           help="read the images from disk in every pass (overlapped with the search) instead of caching "
                "their Fourier transforms on the device (automatic when they do not fit)")
    option(p, "--seed", params_class, "seed", help="seed for the half-set and quarter-set splits")
    option(p, "--keep-checkpoints", params_class, "keep_checkpoints",
           help="iteration checkpoints kept, the newest (0 keeps all)")
    option(p, "--strict", params_class, "strict", action="store_true",
           help="stop at an unusable image (NaN, blank, overflowing) instead of leaving it out")
    p.add_argument("--datadir", help="extra folder to look for image stacks in")
    option(p, "--extra-final-passes", params_class, "extra_final_passes",
           help="passes aligned to Nyquist after the final one")


def add_relaxation_args(p, params_class):
    """Symmetry relaxation options (refine; local-refine to come)."""
    p.add_argument("--relax", choices=[m for m in RELAX_MODES if m], default=params_class.relax,
                   help="symmetry relaxation: each particle takes the best of the --sym mates of its pose against "
                        "a C1 reference (refined by a short subdivision) and the maps are reconstructed in C1 "
                        "(pseudo-symmetric particles); marginalize: then weighs the poses around that mate by "
                        "likelihood")
    option(p, "--break-symmetry", params_class, "break_symmetry", action="store_true",
           help="with --relax and input poses: start from C1 half-maps with each particle turned by a random mate")
    p.add_argument("--relax-max-align-res-A", dest="relax_max_align_res_A", type=float,
                   default=params_class.relax_max_align_res_A,
                   help="with --relax: the mate choice never aligns finer than this (Å; default: as the alignment)")


def add_marginalization_args(p, params_class):
    """``--marginalize-step-deg`` (refine, local-refine)."""
    p.add_argument("--marginalize-step-deg", dest="marginalize_step_deg", type=float,
                   default=params_class.marginalize_step_deg,
                   help="insert each particle at the 27 rotations (± this step) × 9 shifts around its best pose, "
                        "weighted by their likelihood (RELION's marginalization over poses, restricted to this "
                        "neighbourhood; default: the best pose only)")


def main(args) -> int:
    if args.continue_dir:
        args.out = args.continue_dir
        report = run(None, None, args.continue_dir, resume=True, progress=not args.quiet)
    else:
        missing = [flag for flag, value in (("--particles", args.particles), ("--ref", args.ref),
                                            ("--out", args.out)) if not value]
        if missing:
            raise CryocvError(f"refine needs {', '.join(missing)} (or --continue DIR)")
        report = run(args.particles, args.ref, args.out, params_from_args(RefineParams, args), device=args.device,
                     gpu_ids=args.gpu, datadir=args.datadir, progress=not args.quiet, overwrite=args.overwrite)
    print(f"gold-standard resolution {report['resolution_A']:.2f} Å (FSC 0.143, masked, corrected); "
          f"map: {jobdir.path(args.out, jobdir.MAP)}, plots: {jobdir.path(args.out, jobdir.FSC_PNG)}, "
          f"{jobdir.path(args.out, jobdir.POSES_PNG)}")
    return 0


@finishes_writes_on_error
def run(particles_path: str | None, reference_path: str | None, out_dir: str, params: RefineParams | None = None,
        device: str = DEFAULT_DEVICE, gpu_ids=None, datadir=None, resume: bool = False,
        progress: bool = True, overwrite: bool = False) -> dict:
    """Gold-standard refinement job; ``resume`` continues ``out_dir`` from its last checkpoint
    with the settings it was started with; ``overwrite`` replaces a job already in ``out_dir``.
    Returns the FSC report."""
    started = time.time()
    startup = StageTimer()                       # host stages before the first pass, logged with the pass stages
    config_path = jobdir.path(out_dir, jobdir.REFINE_CONFIG)
    config, params, store = open_refinement(out_dir, resume, params, RefineParams, ("particles", "reference"),
                                            refine_params_from_config, overwrite)
    if resume:
        particles_path, reference_path, datadir = config["particles"], config["reference"], config["datadir"]
        device, gpu_ids = config["device"], config["gpu"]
    # every input is checked before anything is written into out_dir
    with startup("device"):
        xp, ids = select_device(device, gpu_ids)
    notes = []                                   # logged once run.log exists
    with startup("particles: read + check"):
        particles = load_checked_particles(particles_path, datadir, params.strict, notes.append)
    if particles.ctf is None:
        raise CryocvError(f"{particles_path} has no CTF parameters (rlnDefocusU...): refinement needs them")
    with startup("reference"):
        reference, reference_px = read_cubic_map(reference_path)
    if params.break_symmetry:
        particles.require_alignment("--break-symmetry")
    require_half_sets(particles, params.seed, 2, notes.append)
    check_against_nyquist(params, particles.pixel_size_A)
    state = store.load_latest() if resume else None
    if state is None:
        with startup("reference"):
            state = initial_state(reference, reference_px, particles, params.initial_lowpass_A, xp)
    if not resume:
        jobdir.create_output_dir(out_dir, overwrite, also=(jobdir.DIFFERENCE_MAP, jobdir.RELAX_PNG))
        jobdir.write_json(config_path, {"particles": os.path.abspath(particles_path),
                                        "reference": os.path.abspath(reference_path),
                                        "datadir": datadir, "device": device, "gpu": gpu_ids,
                                        "parameters": asdict(params)})
    else:
        stale = jobdir.remove_stale_temp_files(out_dir)
        if stale:
            notes.append(f"removed {stale} temporary files left by the interrupted run")
    log = JobLog(out_dir)
    plotter = BackgroundPlotter()                # imports matplotlib in its own process while the job runs
    for note in notes:
        log(note)
    n, px = particles.box_size, particles.pixel_size_A
    for folder, reason in store.skipped:
        log(f"skipped the damaged or unfinished checkpoint {folder} ({reason})")
    if state.iteration == 0:
        log(f"refining {len(particles)} particles ({n} px, {px:.3f} Å/px), {params.regularizer.upper()} "
            f"regularizer, symmetry {params.symmetry}, start low-passed to {params.initial_lowpass_A:g} Å, on "
            f"{'GPU ' + str(ids[0]) if ids else ('GPU' if xp is not np else 'CPU')}")
        if ids and len(ids) > 1:
            log(f"  note: using GPU {ids[0]} of {ids}; multi-GPU refinement is not implemented yet")
    else:
        log(f"continuing from the checkpoint of iteration {state.iteration} ({state.resolution_A:.2f} Å)")
    log("  startup: " + startup.summary())
    input_rotations = particles.rotations if particles.has_alignment else None
    make_search, register_halves, state = relaxation.compose(global_search(params, n, px, xp), params, particles,
                                                             state, xp, log)
    if not state.final_done:
        state, maps = iterate(particles, state, params, xp, store, make_search, progress=progress, log=log,
                              register_halves=register_halves)
        half_maps, mask, report, full, cutoff_A = maps.half_maps, maps.mask, maps.report, maps.full_map, maps.cutoff_A
    else:
        half_maps, mask, report, full, cutoff_A = store.final_outputs(state)
    particles.euler_deg = state.euler_deg.astype(np.float64)
    particles.origin_A = state.origin_A.astype(np.float64)
    particles.has_alignment = True
    report.update(symmetry=params.symmetry, n_particles=len(particles), regularizer=params.regularizer,
                  iterations=state.history, map_symmetry=params.reconstruction_symmetry())
    if params.relax:
        report["relax"] = relaxation.relaxation_outputs(out_dir, full, particles, input_rotations, params, px,
                                                            state.history)
    extra_maps = {}
    if cutoff_A is not None:      # the NU-filtered map: from the final checkpoint, where it is the only copy
        extra_maps.update({jobdir.NU_CUTOFF: cutoff_A, jobdir.NU_FILTERED_MAP: None})
    title = f"{len(particles)} particles, {params.regularizer.upper()}, {params.symmetry}: {report['resolution_A']:.2f} Å"

    def plots(plotter):
        change = (None if input_rotations is None else
                  pose_distance_deg(particles.rotations, input_rotations, params.symmetry))
        plotter.plot("plot_poses", **pose_diagnostics(particles.euler_deg, state.history, change),
                   path=jobdir.path(out_dir, jobdir.POSES_PNG))      # from memory: no STAR read back

    outputs_started = time.time()
    record = jobdir.job_record("refine", {"particles": os.path.abspath(particles_path),
                                          "reference": os.path.abspath(reference_path), "resumed": resume,
                                          **asdict(params)}, xp, started,
                               {"resolution_A": report["resolution_A"], "iterations": state.iteration,
                                "n_particles": len(particles)})
    jobdir.write_results(out_dir, px, half_maps, full, mask, report, particles, title, record, extra_maps,
                         before_record=plots, checkpoint=store, iteration=state.iteration, plotter=plotter)
    log(f"done: {report['resolution_A']:.2f} Å gold-standard (FSC 0.143, masked and corrected) after "
        f"{state.iteration} iterations; map {jobdir.path(out_dir, jobdir.MAP)} "
        f"({jobdir.outputs_note(record, outputs_started, started)})")
    return report


def refine_pose_diagnostics(job_dir: str, input_particles: str | None = None) -> dict:
    """What the pose plot of a refine job shows, read from its files: ``euler_deg``
    (n, 3) refined poses, ``history`` (per-iteration resolution and pose change),
    ``change_vs_input_deg`` (n,) angle (°, smallest over the symmetry group) between
    each refined pose and the input alignment (None if the input had none), ``title``.
    ``input_particles``: the job's input file (default: the path recorded at its start).
    Keyword arguments of :func:`cryocv.plotting.plot_poses` / ``draw_poses``."""
    datadir = None
    if input_particles is None:
        config = jobdir.read_json(jobdir.path(job_dir, jobdir.REFINE_CONFIG))
        input_particles, datadir = config["particles"], config["datadir"]
    report = jobdir.read_json(jobdir.path(job_dir, jobdir.FSC_JSON))
    refined = load_particles(jobdir.path(job_dir, jobdir.PARTICLES_STAR))
    start = load_particles(input_particles, datadir)  # metadata only: images are not read
    change = None
    if start.has_alignment and len(start) == len(refined):
        change = pose_distance_deg(refined.rotations, start.rotations, report["symmetry"])
    return pose_diagnostics(refined.euler_deg, report.get("iterations") or [], change)


def pose_diagnostics(euler_deg: np.ndarray, history: list, change_vs_input_deg: np.ndarray | None) -> dict:
    """Keyword arguments of :func:`cryocv.plotting.plot_poses`: ``euler_deg`` (n, 3) refined poses,
    ``history`` per-iteration records, ``change_vs_input_deg`` (n,) or None, ``registration``
    [(iteration, angle °, moved)] of the half-set registration (None when it did not run)."""
    return {"euler_deg": euler_deg, "history": history, "change_vs_input_deg": change_vs_input_deg,
            "title": f"{len(euler_deg)} particles after {len(history)} iterations",
            "registration": registration_series(history) or None}
