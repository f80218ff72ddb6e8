"""Keeping a refinement's two half-sets in one frame (``--register-halves``).

Each half-set is refined against its own reference from a common low-pass start, so nothing
holds the two frames together but that start. When the particle's low-resolution shape leaves a
rotation weakly determined (a small protein in a round micelle: the turn about the membrane
normal), the two references drift apart by a few degrees; the FSC between them, and so the
filter, the alignment resolution and the combined map, pay for it. After each iteration
:func:`drift_registration` aligns half-set 2's reference to half-set 1's within a few degrees
(:func:`cryocv.register.align_maps_locally`, inside the dynamic mask, on Fourier components no
finer than the current resolution) and moves that reference and half-set 2's poses onto it,
unless they are already within 0.5° and 0.5 px (half-maps from true poses come out 0.1–0.25°
apart inside the mask; the estimate on a late iteration's references scatters by 0.02°). With
Cn symmetry only the turn about the axis and the shift along it are free, and only they are
applied; D, T, O and I fix both frames to the box (no registration). Six numbers at most pass
between the half-sets; their images, maps and filters stay apart (RELION's
``--low_resol_join_halves`` shares far more: every component coarser than 40 Å). The
iteration's checkpointed half-maps are those before the move; its references and poses those
after it.
"""
from __future__ import annotations

import numpy as np

from ..backend import to_device, to_numpy
from ..geometry import euler_to_matrix, matrix_to_euler
from ..register import MapTransform, align_maps_locally, transform_poses, transform_volume
from ..symmetry import parse_symmetry
from .checkpoints import RefineState

HALF_SET_REGISTRATION = "half_set_registration"   # history key: this iteration's registration (resume: done)
MAX_DRIFT_DEG = 8.0                               # searched per axis-angle component around the identity
REGISTRATION_FINE_STEP_DEG = 0.125
MIN_MOVE_DEG, MIN_MOVE_PX = 0.5, 0.5              # closer: left as they are (set for the grid estimate; polished, 10x its scatter)


def registration_series(history: list) -> list:
    """[(iteration, rotation °, moved)] of the registrations recorded in a job's history."""
    return [(h["iteration"], h[HALF_SET_REGISTRATION]["rotation_deg"], h[HALF_SET_REGISTRATION]["moved"])
            for h in history if HALF_SET_REGISTRATION in h]


def can_drift(symmetry: str) -> bool:
    """Whether half-maps reconstructed with ``symmetry`` can drift apart at all: C1 in every
    direction, Cn (n ≥ 2) only by a turn about and a shift along its axis (z); the axes of D, T,
    O and I are fixed to the box, so their half-maps cannot."""
    group = parse_symmetry(symmetry)
    return group.startswith("C")


def symmetry_allowed(transform: MapTransform, symmetry: str) -> MapTransform:
    """``transform`` reduced to the motion ``symmetry``'s reconstruction leaves free (see
    :func:`can_drift`): unchanged in C1; in Cn the turn about z nearest to it (the angle of its
    x-y block) and its shift along z. Any other part is estimation noise that would tilt the
    next reconstruction's symmetry axis."""
    if parse_symmetry(symmetry) == "C1":
        return transform
    L = transform.matrix
    angle = np.arctan2(L[1, 0] - L[0, 1], L[0, 0] + L[1, 1])
    c, s = np.cos(angle), np.sin(angle)
    about_z = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    return MapTransform(about_z, np.array([0.0, 0.0, float(transform.shift_px[2])]), transform.score)


def registration_hook(params, particles, xp, log):
    """A refinement job's ``register_halves`` for :func:`cryocv.jobs.loop.iterate`:
    :func:`drift_registration` with ``params.register_halves`` and a group whose half-maps can
    drift (:func:`can_drift`), else None."""
    if not (params.register_halves and can_drift(params.symmetry)):
        return None
    return drift_registration(particles.half_set, particles.pixel_size_A, xp, log, params.symmetry)


def drift_registration(half_set: np.ndarray, pixel_size_A: float, xp, log, symmetry: str = "C1"):
    """``register_halves(state)`` for :func:`cryocv.jobs.loop.iterate` (see the module docstring).
    ``half_set`` (n,) 1 or 2 per particle; ``symmetry``: the maps' (C1 or Cn, :func:`can_drift`),
    whose free motion alone is applied (:func:`symmetry_allowed`). Records ``{rotation_deg,
    shift_A, score, resolution_A, moved}`` under :data:`HALF_SET_REGISTRATION` in the
    iteration's history entry."""
    if not can_drift(symmetry):
        raise ValueError(f"half-maps in {symmetry} cannot drift apart: no registration")
    members = half_set == 2

    def register_halves(state: RefineState) -> RefineState:
        first, second = (to_device(r, xp) for r in state.references)
        mask = 1.0 if state.mask is None else to_device(state.mask, xp)     # the solvent's noise out
        resolution_A = max(state.resolution_A, 4 * pixel_size_A)
        transform = symmetry_allowed(align_maps_locally(first * mask, second * mask, pixel_size_A, resolution_A,
                                                        max_deg=MAX_DRIFT_DEG,
                                                        fine_step_deg=REGISTRATION_FINE_STEP_DEG), symmetry)
        shift_A = float(np.linalg.norm(transform.shift_px)) * pixel_size_A
        record = {"rotation_deg": round(transform.rotation_deg, 3), "shift_A": round(shift_A, 3),
                  "score": round(transform.score, 5), "resolution_A": round(resolution_A, 2)}
        record["moved"] = not transform.is_identity(max_deg=MIN_MOVE_DEG, max_px=MIN_MOVE_PX)
        if state.history:
            state.history[-1][HALF_SET_REGISTRATION] = record
        if not record["moved"]:
            log(f"  half-sets in register: {record['rotation_deg']:.2f}° and {shift_A:.2f} Å apart "
                f"(maps compared to {resolution_A:.1f} Å)")
            return state
        state.references[1] = to_numpy(transform_volume(second, transform))
        if state.euler_deg is not None:
            rotations, origin_px = transform_poses(euler_to_matrix(state.euler_deg[members]),
                                                   state.origin_A[members] / pixel_size_A, transform)
            state.euler_deg[members] = matrix_to_euler(rotations)
            state.origin_A[members] = origin_px * pixel_size_A
        log(f"  half-set 2 moved onto half-set 1 by {record['rotation_deg']:.2f}° and {shift_A:.2f} Å "
            f"(maps compared to {resolution_A:.1f} Å)")
        return state

    return register_halves
