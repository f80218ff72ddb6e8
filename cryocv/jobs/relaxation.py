"""Symmetry relaxation in a refinement job (``--relax maximize|marginalize``, see
:mod:`cryocv.relax`): the pieces a job composes with its pose search and the shared loop
(:func:`compose` puts them together).

- :func:`relaxing`: wraps a job's ``make_search``: after its search against the C1 reference,
  each particle takes the best of the N mates of its pose (scored exactly to
  ``--relax-max-align-res-A``, then polished by a short subdivision); ``marginalize`` then spreads it over the poses
  around that mate, weighted by likelihood.
- :func:`broken_symmetry_state`: ``--break-symmetry``: C1 half-maps from the input poses, each
  particle turned by a random mate (a reference whose symmetry is already broken).
- :func:`half_set_registration`: before each iteration, half-set 2's reference (and poses) is
  turned by the group operator that brings its asymmetric part onto half-set 1's.
- :func:`relaxation_outputs`: the mode occupancy and the change from the input (symmetric
  consensus) poses, ``difference_map.mrc`` (the relaxed map minus its G-average) and
  ``relax.png``.
"""
from __future__ import annotations

import numpy as np

from ..backend import to_device, to_numpy
from ..fourier import lowpass_map
from ..geometry import angular_distance_deg, euler_to_matrix, matrix_to_euler
from ..io.mrc import write_map
from ..plotting import history_series, plot_relaxation
from ..reconstruct import reconstruct_half_maps
from ..register import MapTransform, transform_volume
from ..relax import asymmetric_agreement, mode_of, mode_spread, relaxed_poses, symmetrized
from ..search import search_schedule
from ..symmetry import symmetry_operators
from . import jobdir
from .checkpoints import RefineState
from .loop import PoseSearch
from .registration import registration_hook

RELAX_LEVELS = 2          # the chosen mate is polished from cells of the second-finest level of the search


def compose(make_search, params, particles, state: RefineState, xp, log, where: str = ""):
    """A refinement job's ``(make_search, register_halves, state)`` for :func:`cryocv.jobs.loop.iterate`:
    without ``params.relax``, the search unchanged and
    :func:`cryocv.jobs.registration.registration_hook`'s registration (or none); else :func:`relaxing` around the job's search, :func:`half_set_registration`, and at the
    start the log line and ``--break-symmetry``'s references. ``where``: what the log adds about
    the mates."""
    if not params.relax:
        return make_search, registration_hook(params, particles, xp, log), state
    n, px = particles.box_size, particles.pixel_size_A
    if state.iteration == 0:
        log(f"  symmetry relaxation ({params.relax}) over the {params.symmetry} mates{where}; maps in C1")
        if params.break_symmetry:
            state = broken_symmetry_state(particles, state, params, xp, log)
    return (relaxing(make_search, params, n, px), half_set_registration(params, particles.half_set, px, xp, log),
            state)


def relaxing(make_search, params, box_size: int, pixel_size_A: float):
    """``make_search`` whose ``find_poses`` ends with the maximization over the mates of
    ``params.symmetry`` (each half-set against its own C1 reference)."""
    operators = symmetry_operators(params.symmetry)
    search = params.search_params(box_size, pixel_size_A)
    marginalize = params.relax == "marginalize"

    def make_relaxed_search(volumes, noise, cutoff_px: float, state=None) -> PoseSearch:
        inner = make_search(volumes, noise, cutoff_px, state)
        relax_cutoff = cutoff_px if not params.relax_max_align_res_A else min(
            cutoff_px, box_size * pixel_size_A / params.relax_max_align_res_A)
        levels = search_schedule(box_size, relax_cutoff, search)[-RELAX_LEVELS:]

        def find_poses(batch):
            best = inner.find_poses(batch)
            volume = volumes[batch.half]
            found, _ = relaxed_poses(volume, batch.images_ft, batch.ctf, noise, best, operators, levels, search)
            if marginalize:
                found.spread = mode_spread(volume, batch.images_ft, batch.ctf, noise, found, levels[-1])
            return found
        # N mate slices per image: as many as the global search's finest level scores for N = 32
        return PoseSearch(find_poses, inner.levels, max(1, int(inner.batch_size * min(1.0, 32 / len(operators)))))

    return make_relaxed_search


def broken_symmetry_state(particles, state: RefineState, params, xp, log) -> RefineState:
    """``--break-symmetry``: the references become C1 half-maps of the input poses, each
    particle turned by a random mate (seeded), low-passed as the start is."""
    operators = symmetry_operators(params.symmetry)
    rng = np.random.default_rng([params.seed, 31])
    original = particles.euler_deg.copy()
    pick = rng.integers(0, len(operators), len(particles))
    turned = np.einsum("nij,njk->nik", particles.rotations, np.transpose(operators[pick], (0, 2, 1)))
    particles.euler_deg = matrix_to_euler(turned)
    halves = reconstruct_half_maps(particles, xp, "C1", progress=False)
    particles.euler_deg = original
    px = particles.pixel_size_A
    state.references = [np.clip(to_numpy(lowpass_map(h, px, state.resolution_A)), 0, None) for h in halves]
    log(f"  --break-symmetry: C1 half-maps from the input poses, each particle turned by a random {params.symmetry} "
        f"mate, low-passed to {state.resolution_A:.1f} Å")
    return state


def half_set_registration(params, half_set: np.ndarray, pixel_size_A: float, xp, log):
    """``register_halves(state)`` for :func:`cryocv.jobs.loop.iterate`: turn half-set 2's
    reference by the operator g that brings its asymmetric part onto half-set 1's (compared inside
    the mask, low-passed to twice the resolution),
    and its poses by the same (A' = A·g), so that the FSC and the final map compare like with like."""
    operators = symmetry_operators(params.symmetry)
    members = half_set == 2

    def register_halves(state: RefineState) -> RefineState:
        first, second = (to_device(r, xp) for r in state.references)          # on the device: N rotations of a map
        mask = None if state.mask is None else to_device(state.mask, xp)
        # compared where the asymmetric part is clear of interpolation error: twice the resolution
        index, agreement = asymmetric_agreement(first, second, operators, mask, pixel_size_A,
                                                max(2 * state.resolution_A, 4 * pixel_size_A))
        if state.history:
            state.history[-1].update(registered_operator=index, asymmetric_agreement=round(agreement, 4))
        if index == 0:
            log(f"  half-sets in register (operator 0 of {params.symmetry}); agreement of their asymmetric "
                f"parts {agreement:.3f}")
            return state
        g = np.asarray(operators[index], dtype=np.float64)
        state.references[1] = np.clip(to_numpy(transform_volume(second, MapTransform(g, np.zeros(3)))), 0, None)
        if state.euler_deg is not None:
            rotations = euler_to_matrix(state.euler_deg[members]) @ g
            state.euler_deg[members] = matrix_to_euler(rotations)
        log(f"  half-set 2 turned by operator {index} of {params.symmetry} "
            f"({np.degrees(np.arccos(np.clip((np.trace(g) - 1) / 2, -1, 1))):.0f}°) onto half-set 1; agreement "
            f"of their asymmetric parts {agreement:.3f}")
        return state

    return register_halves


def relaxation_outputs(out_dir: str, full_map, particles, input_rotations, params, pixel_size_A: float,
                       history: list) -> dict:
    """Write ``difference_map.mrc`` and ``relax.png``; return the record for fsc.json: mode
    occupancy per operator and the angle between each particle's relaxed pose and its input
    (symmetric consensus) pose, both relative to the input poses when there are any."""
    operators = symmetry_operators(params.symmetry)
    full = to_numpy(full_map)
    difference = full - to_numpy(symmetrized(full, operators))
    write_map(jobdir.path(out_dir, jobdir.DIFFERENCE_MAP), difference.astype(np.float32), pixel_size_A)
    record = {"group": params.symmetry, "mode": params.relax}
    change = occupancy = None
    if input_rotations is not None:
        modes = mode_of(particles.rotations, input_rotations, operators)
        occupancy = np.bincount(modes, minlength=len(operators)) / len(modes)
        change = angular_distance_deg(particles.rotations, input_rotations)
        record.update(mode_occupancy=occupancy.tolist(), change_from_input_median_deg=float(np.median(change)))
    plot_relaxation(difference, change, occupancy, params.symmetry, jobdir.path(out_dir, jobdir.RELAX_PNG),
                    mode_switch=history_series(history, "mode_switch_fraction"),
                    agreement=history_series(history, "asymmetric_agreement"))
    return record
