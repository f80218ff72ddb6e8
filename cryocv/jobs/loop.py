"""The refinement loop shared by refinement jobs: iterations of one E/M pass, regularization
and assessment, convergence, checkpoints, resume, and a final pass aligned to Nyquist.

Each iteration aligns the particles of half-set h to half-map h only (gold standard)
with the job's pose search, inserts them at the poses found, then (see
:func:`cryocv.regularize.regularize_and_assess`) regularizes the half-maps, makes a new
dynamic mask and measures the masked, corrected FSC; the next alignment cutoff is that
resolution plus a few Fourier shells. Refinement stops when resolution and pose changes
both stop improving (or at ``max_iterations``) and ends with one pass aligned to Nyquist.
With a staged start (``staged_start_res_A``) a first stage aligns no finer than that
resolution; when it stops, each half-set restarts from its own (regularized) half-map low-passed to it,
and a second stage (its own convergence test and ``max_iterations``) runs uncapped.

The job passes ``make_search(volumes, noise, cutoff_px, state)`` → :class:`PoseSearch`: the
only thing that differs between a global and a local refinement.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..accumulate import Accumulators, keep_one_half_on_device, large_grids, map_stage_device_bytes, quarter_split
from ..backend import (StageTimer, free_device_memory, free_gpu_memory_bytes, get_array_module,
                       image_cache_budget_bytes, to_device, to_numpy)
from ..em_pass import HalfReferences, em_pass
from ..errors import CryocvError
from ..fourier import lowpass_map
from ..geometry import euler_to_matrix, matrix_to_euler
from ..masks import spherical_mask
from ..noise import noise_spectrum_from_images
from ..nonuniform import NUParams
from ..particles import Particles
from ..projector import prepare_volume
from ..regularize import MapResult, regularize_and_assess
from ..relax import mode_of
from ..source import ParticleSource
from ..symmetry import pose_distance_deg, symmetry_operators
from . import jobdir
from .common import check_result, symmetry_arg
from .checkpoints import CheckpointStore, RefineState
from .registration import HALF_SET_REGISTRATION

# settings whose default changed, with the value a job recorded before the change took: a job
# continued with --continue keeps the settings it started with
DEFAULTS_BEFORE_CHANGE = {"nu_max_window_fraction": None,      # 0.125 since 2026-12-04 (issue 15)
                          "register_halves": False}            # on in refine since 2026-12-04 (issue 15)
NOISE_SAMPLE = 1000   # images of box <= 128 whose power spectrum is the first iteration's noise model
STAGE_RESTART = "staged_start_restart_A"   # history: the iteration after which the staged start restarted


def noise_sample_size(box_size: int) -> int:
    """Images to sample for the start noise spectrum: NOISE_SAMPLE up to box 128; at larger boxes
    as many bytes to read (NOISE_SAMPLE·(128/N)² images), at least 200 (every shell k then
    averages ≥ 200·πk pixels)."""
    return int(max(200, min(NOISE_SAMPLE, NOISE_SAMPLE * (128 / box_size) ** 2)))


@dataclass
class PoseSearch:
    """One iteration's E-step: ``find_poses(batch)`` → SearchResult, its ``levels`` (for the
    log and the convergence test) and the ``batch_size`` it fits in memory."""

    find_poses: Callable
    levels: list
    batch_size: int


def open_refinement(out_dir: str, resume: bool, params, params_class, input_keys: tuple, make_params=None,
                    overwrite: bool = False):
    """(config, params, checkpoint store) of a refinement job (global, local, ab-initio), nothing
    written yet. Continuing: the config and settings it was started with (``input_keys`` plus
    datadir, device and gpu must be in its config; ``make_params(parameters)``, default
    ``params_class(**parameters)``). Starting: config None, ``params`` (default
    ``params_class()``) validated with its symmetry normalised, and ``out_dir`` checked."""
    store = CheckpointStore(out_dir)
    if resume:
        make = make_params or (lambda parameters: params_class(**parameters))
        config, params = jobdir.read_job_config(out_dir, tuple(input_keys) + ("datadir", "device", "gpu"),
                                                lambda parameters: make({**DEFAULTS_BEFORE_CHANGE, **parameters}))
    else:
        config = None
        params = params or params_class()
        params.validate()
        params.symmetry = symmetry_arg(params.symmetry)
        jobdir.check_output_dir(out_dir, overwrite)
    store.keep = params.keep_checkpoints
    return config, params, store


def start_reference(volume, pixel_size_A: float, resolution_A: float) -> np.ndarray:
    """A start map of E/M refinement (host array): ``volume`` low-passed to ``resolution_A`` (never
    finer than Nyquist) on its own device, negative values set to zero."""
    xp = get_array_module(volume)
    return to_numpy(xp.clip(lowpass_map(volume, pixel_size_A, max(resolution_A, 2 * pixel_size_A)), 0, None))


def initial_state(reference: np.ndarray, reference_pixel_A: float | None, particles: Particles,
                  initial_lowpass_A: float, xp=np) -> RefineState:
    """Both half-references = the reference low-passed to ``initial_lowpass_A`` (on ``xp``'s
    device: at box 512 the FFTs take seconds on the CPU)."""
    n, px = particles.box_size, particles.pixel_size_A
    if reference.shape != (n, n, n):
        raise CryocvError(f"the reference is {reference.shape[0]} px but the particles are {n} px: "
                          f"resample one of them to match")
    if reference_pixel_A and abs(reference_pixel_A - px) > 0.01 * px:
        raise CryocvError(f"the reference's pixel size ({reference_pixel_A:.4f} Å) differs from the particles' "
                          f"({px:.4f} Å) by more than 1%")
    volume = to_device(reference, xp)
    if not bool(xp.isfinite(volume).all()) or float(xp.abs(volume).max()) == 0:
        raise CryocvError("the reference map is empty or holds non-finite values")
    start = start_reference(volume, px, initial_lowpass_A)
    volume = None
    free_device_memory(xp)              # the FFT plan's work area too: the job sizes its caches from what is free
    # a coarse soft sphere instead of a dynamic mask before there are half-maps
    return RefineState(iteration=0, references=[start.copy(), start.copy()], mask=None,
                       resolution_A=max(initial_lowpass_A, 2 * px), euler_deg=None, origin_A=None,
                       noise_var_shell=None)


def alignment_cutoff_px(box_size: int, pixel_size_A: float, resolution_A: float, extra_shells: int) -> float:
    """Fourier radius (px) used for alignment: the resolution's shell plus ``extra_shells``."""
    return float(min(box_size / 2, box_size * pixel_size_A / resolution_A + extra_shells))


def current_stage(history: list) -> tuple[list, int]:
    """The records of the current stage (those after the last staged-start restart; all without one)
    and the iteration it began after (0 without a restart)."""
    restarts = [i for i, record in enumerate(history) if STAGE_RESTART in record]
    return (history[restarts[-1] + 1:], history[restarts[-1]]["iteration"]) if restarts else (history, 0)


def restart_from_stage(state: RefineState, pixel_size_A: float, resolution_A: float) -> RefineState:
    """The end of a staged start's first stage: each half-set's next reference is its own (regularized)
    half-map low-passed to ``resolution_A`` (the halves stay independent), the next alignment starts
    there (or at the stage's own resolution if that is coarser), and the last record is marked
    (:data:`STAGE_RESTART`)."""
    state.references = [start_reference(reference, pixel_size_A, resolution_A) for reference in state.references]
    state.resolution_A = max(resolution_A, state.resolution_A, 2 * pixel_size_A)
    state.converged = False
    state.history[-1][STAGE_RESTART] = resolution_A
    return state


def convergence(history: list, min_iterations: int, final_step_deg: float) -> tuple[bool, str]:
    """Has refinement stopped improving? Returns (converged, reason for the log)."""
    if len(history) < max(min_iterations, 2):
        return False, ""
    last, previous = history[-1], history[-2]
    best_before = min(h["resolution_A"] for h in history[:-1])
    resolution_stalled = last["resolution_A"] > best_before * 0.99
    change, change_before = last.get("pose_change_median_deg"), previous.get("pose_change_median_deg")
    poses_stalled = (change is not None and change_before is not None
                     and (change >= 0.9 * change_before or change <= final_step_deg))
    agreement, agreement_before = last.get("asymmetric_agreement"), previous.get("asymmetric_agreement")
    if agreement is not None and agreement_before is not None and agreement - agreement_before > max(
            0.02, 0.05 * abs(agreement_before)):
        return False, ""                    # relaxation: the half-maps still break the symmetry further
    switches, switches_before = last.get("mode_switch_fraction"), previous.get("mode_switch_fraction")
    if switches is not None and switches_before is not None and switches > 0.01 and abs(
            switches - switches_before) > max(0.1 * switches_before, 0.005):
        return False, ""                    # relaxation: particles still settling into (or leaving) their modes
    if resolution_stalled and poses_stalled:
        poses = (f"median pose change {change:.2f}° is within the finest search step ({final_step_deg:.2f}°)"
                 if change <= final_step_deg else
                 f"pose changes stopped decreasing (median {change:.2f}° vs {change_before:.2f}°)")
        return True, (f"resolution improved by less than 1% ({last['resolution_A']:.2f} Å vs best "
                      f"{best_before:.2f} Å before) and {poses}")
    return False, ""


def min_operator_angle_deg(symmetry: str) -> float:
    """The smallest rotation angle among a group's operators other than the identity (360° for C1)."""
    ops = symmetry_operators(symmetry)[1:]
    if len(ops) == 0:
        return 360.0
    return float(min(np.degrees(np.arccos(np.clip((np.trace(g) - 1) / 2, -1, 1))) for g in ops))


def nu_params(params) -> NUParams | None:
    """The NU filter's settings of a refinement's params (None for the uniform regularizer)."""
    if params.regularizer != "nu":
        return None
    return NUParams(n_cutoffs=params.nu_cutoffs, order=params.nu_order, awf=params.nu_awf,
                    half_map_noise=params.nu_half_map_noise,
                    max_window_fraction=params.nu_max_window_fraction)


def iterate(particles: Particles, state: RefineState, params, xp, store: CheckpointStore,
            make_search: Callable[[dict, object, float, RefineState], PoseSearch], progress: bool = True,
            log=print, make_mask=None, register_halves=None) -> tuple[RefineState, MapResult]:
    """Run iterations from ``state`` until converged, then the final pass; checkpoint each
    (written while the next pass runs; the final pass's may still be being written when this
    returns: ``store.wait()`` before reading it; all written when this raises).

    ``params``: a refinement's Params (regularizer, NU settings, symmetry, iterations, seed...);
    ``make_search(references, noise, cutoff_px, state)`` → :class:`PoseSearch` (global, local...);
    ``make_mask(average map)`` replaces the dynamic mask (see :func:`regularize_and_assess`);
    ``register_halves(state)`` → state, called after each iteration that another follows (its record
    last in ``state.history``, before the convergence test), may move half-set 2's
    reference and poses (symmetry relaxation)."""
    try:
        return _iterate(particles, state, params, xp, store, make_search, progress, log, make_mask, register_halves)
    except BaseException:
        try:
            store.wait()         # a checkpoint being written is finished, not left half-written
        except Exception:
            pass                 # the error that stopped the job is the one to report
        raise


def check_against_nyquist(params, pixel_size_A: float):
    """The resolution options that mean nothing at or beyond Nyquist (2 × ``pixel_size_A``): a
    one-line :class:`CryocvError`. Jobs call it once the particles are read, before they write."""
    nyquist_A = 2 * pixel_size_A
    if params.join_halves_A is not None and params.join_halves_A <= nyquist_A:
        raise CryocvError(f"--join-halves-A {params.join_halves_A:g} Å is at or beyond Nyquist ({nyquist_A:.2f} Å): "
                          f"the two half-references would be one map; give a resolution far coarser than the "
                          f"expected one (RELION's default is 40 Å)")
    if params.staged_start_res_A is not None and params.staged_start_res_A <= nyquist_A:
        raise CryocvError(f"--staged-start-res-A {params.staged_start_res_A:g} Å is at or beyond Nyquist "
                          f"({nyquist_A:.2f} Å): the first stage would not be capped; give a coarse resolution "
                          f"(e.g. 8 Å)")


def _iterate(particles, state, params, xp, store, make_search, progress, log, make_mask, register_halves):
    n, px = particles.box_size, particles.pixel_size_A
    check_against_nyquist(params, px)
    nu = nu_params(params)
    quarters = quarter_split(particles.half_set, params.seed) if nu is not None else None
    pose_symmetry = params.reconstruction_symmetry()        # C1 when relaxing: a change of mode is a change
    ops = symmetry_operators(pose_symmetry)
    setup = StageTimer(xp)
    with setup("image source"):
        one_half = keep_one_half_on_device(n, nu is not None, free_gpu_memory_bytes() if xp is not np else 0)
        source = ParticleSource(particles, xp, 0 if params.stream else
                                image_cache_budget_bytes(xp, map_stage_device_bytes(n, nu is not None,
                                                                                    one_half_on_device=one_half)))
    log(f"  image FTs ({source.ft_bytes / 2**30:.2f} GiB) {'cached on the device' if source.cached else 'streamed'}"
        + ("; one half-set's accumulators on the device at a time (the other in host memory)" if one_half else ""))
    if state.noise_var_shell is None:
        with setup("start noise spectrum"):
            sample = np.sort(np.random.default_rng(params.seed).permutation(len(particles))[:noise_sample_size(n)])
            state.noise_var_shell = to_numpy(noise_spectrum_from_images(source.images_ft(sample)))
    release = one_half or large_grids(n, xp)      # hand cached device memory back between stages
    log("  setup: " + setup.summary())
    input_rotations = particles.rotations if particles.has_alignment else None
    if (register_halves is not None and state.history and not state.final_done
            and not {"registered_operator", HALF_SET_REGISTRATION} & state.history[-1].keys()):
        state = register_halves(state)  # a checkpoint written before registration moved to the end of an iteration
    while True:
        timer = StageTimer(xp)
        finals_before = sum(1 for h in state.history if h.get("final"))
        stage_began_after = current_stage(state.history)[1]
        staged = params.staged_start_res_A is not None and not stage_began_after   # no restart yet
        stage_iterations = state.iteration - stage_began_after
        final = state.converged or stage_iterations >= params.max_iterations or finals_before > 0
        iteration = state.iteration + 1
        cutoff = n / 2 if final else alignment_cutoff_px(n, px, state.resolution_A, params.extra_shells)
        if params.max_align_res_A:             # never align beyond this, the final pass included
            cutoff = min(cutoff, n * px / params.max_align_res_A)
        if staged and not final:               # the staged start's first stage (never the final pass)
            cutoff = min(cutoff, n * px / params.staged_start_res_A)
        with timer("references + search setup"):
            if release:
                free_device_memory(xp)     # the last iteration's grids go before this one's are made
            align_mask = (to_device(state.mask, xp) if state.mask is not None
                          else spherical_mask(n, n / 2 - 4, 3.0, xp))
            volumes = HalfReferences({h: to_device(state.references[h - 1], xp) * align_mask for h in (1, 2)},
                                     prepare_volume)
            acc = Accumulators(n, ops, xp, quarters, one_half_on_device=one_half)     # first: the search sizes its batches from what is left
            search = make_search(volumes, to_device(state.noise_var_shell.astype(np.float32), xp), cutoff, state)
        finest = search.levels[-1]
        log(f"iteration {iteration}{' (final pass, aligned to Nyquist)' if final else ''}: aligning to "
            f"{n * px / cutoff:.2f} Å, {len(search.levels)} search levels down to "
            f"{math.degrees(finest.rotation_step_rad):.2f}°/{finest.shift_step_px * px:.2f} Å")
        result = em_pass(source, search.find_poses, acc, search.batch_size, references=volumes,
                         progress=progress, log=log)
        with timer("bookkeeping"):
            volumes = search = None          # the maps below need the device memory at large boxes
            if release:
                free_device_memory(xp)
        maps = regularize_and_assess(acc, px, state.mask, nu, params.mask_threshold, seed=params.seed, timer=timer,
                                     make_mask=make_mask, join_halves_A=params.join_halves_A)
        with timer("bookkeeping"):      # pose statistics, the new state, device memory handed back
            acc = None                       # the accumulators go before the registration's and next pass's grids
            if release:
                free_device_memory(xp)
            check_result(maps.report, maps.half_maps)
            record = {"iteration": iteration, "final": final, "alignment_resolution_A": n * px / cutoff,
                      "resolution_A": maps.report["resolution_A"],
                      "resolution_unmasked_A": maps.report["resolution_unmasked_A"],
                      "pass_seconds": round(result.seconds, 2),
                      "particles_per_second": round(len(particles) / max(result.seconds, 1e-9), 1),
                      "stage_seconds": {**result.stage_seconds, **timer.rounded()}}  # + checkpoint, below
            if state.euler_deg is not None:
                change = pose_distance_deg(result.rotations, euler_to_matrix(state.euler_deg), pose_symmetry)
                shift_change = np.linalg.norm(result.origin_px * px - state.origin_A, axis=1)
                record.update(pose_change_median_deg=float(np.median(change)),
                              shift_change_median_A=float(np.median(shift_change)))
                if pose_symmetry != params.symmetry:     # relaxing: particles that moved to another mode
                    record["mode_switch_fraction"] = float(np.mean(change > 0.5 * min_operator_angle_deg(params.symmetry)))
            if input_rotations is not None:
                vs_input = pose_distance_deg(result.rotations, input_rotations, pose_symmetry)
                record["pose_change_vs_input_median_deg"] = float(np.median(vs_input))
                if pose_symmetry != params.symmetry:     # relaxing: the share of particles in each mate of their input pose
                    group = symmetry_operators(params.symmetry)
                    modes = mode_of(result.rotations, input_rotations, group)
                    record["mode_occupancy"] = (np.bincount(modes, minlength=len(group)) / len(modes)).round(4).tolist()
            state = RefineState(iteration=iteration, references=[to_numpy(m) for m in maps.references],
                                mask=None if maps.mask is None else to_numpy(maps.mask),
                                resolution_A=maps.report["resolution_A"],
                                euler_deg=matrix_to_euler(result.rotations), origin_A=result.origin_px * px,
                                noise_var_shell=result.noise_var_shell, history=state.history + [record],
                                final_done=final and finals_before >= params.extra_final_passes)
        msg = (f"  resolution {record['resolution_A']:.2f} Å (unmasked {record['resolution_unmasked_A']:.2f} Å), "
               f"{record['particles_per_second']:.0f} particles/s")
        if "pose_change_median_deg" in record:
            msg += (f", median pose change {record['pose_change_median_deg']:.2f}°, "
                    f"shift {record['shift_change_median_A']:.2f} Å")
        if "mode_switch_fraction" in record:
            msg += f", {100 * record['mode_switch_fraction']:.1f}% changed mode"
        log(msg)
        if register_halves is not None and not state.final_done:
            with timer("half-set registration"):     # before the convergence test: it records the agreement
                state = register_halves(state)
        if not final:
            state.converged, reason = convergence(current_stage(state.history)[0], params.min_iterations,
                                                  math.degrees(finest.rotation_step_rad))
            stage_over = state.converged or stage_iterations + 1 >= params.max_iterations
            if staged and stage_over:
                state = restart_from_stage(state, px, params.staged_start_res_A)
                log(f"  staged start: the first stage (aligned to {params.staged_start_res_A:g} Å at most) "
                    f"{'converged' if reason else 'reached --max-iterations'}; each half-set restarts from its "
                    f"half-map low-passed to {params.staged_start_res_A:g} Å")
            elif state.converged:
                log(f"  converged: {reason}")
            elif stage_over:
                log(f"  stopping at --max-iterations {params.max_iterations} without convergence")
        with timer("checkpoint: previous write"):
            store.wait()
        with timer("checkpoint"):      # written while the next pass runs (the final one: the job's outputs)
            store.save(state, maps, px, particles.half_set, result.scores, background=True)
        stages = record["stage_seconds"]
        stages.update(timer.rounded())
        log("  seconds per stage: " + ", ".join(f"{name} {value:.2f}" for name, value in stages.items()))
        if state.final_done:
            return state, maps
        maps = result = None             # (their device memory is handed back at the next iteration's start)
