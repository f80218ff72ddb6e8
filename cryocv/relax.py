"""Symmetry relaxation for pseudo-symmetric particles: refine against a C1 reference, but let each
particle choose among the N symmetry-related poses of its best pose under a point group G
(the mates ``A·gᵀ``, g ∈ G: the poses at which a G-symmetric map looks the same), and
reconstruct in C1 (cryoSPARC's symmetry relaxation; RELION's ``--relax_sym`` for cyclic groups).

The mates are scored exactly against the C1 reference and the best is kept, then polished by a
short branch-and-bound subdivision (maximization): every
particle contributes to exactly one of the N modes. Marginalization (:func:`mode_spread`) then
weighs the poses around the best mate by their likelihood: the particle still contributes to one
mode only, spread over the poses that mode allows (RELION's ``--relax_sym`` marginalizes over
all mates; here the mate is chosen first). The half-sets may break the symmetry at
different, equivalent sites; :func:`register_over_group` finds the operator that brings half-map
2 onto half-map 1 (their asymmetric parts).
"""
from __future__ import annotations

import math

import numpy as np

from .backend import device_constant, get_array_module, to_device, to_numpy
from .fourier import lowpass_map
from .fsc import fsc_curve
from .geometry import angular_distance_deg, euler_to_matrix
from .local_search import rotation_offsets, to_fulcrum_frame
from .projector import DEFAULT_PADDING
from .register import MapTransform, transform_volume
from .search import (Candidates, PoseSpread, SearchLevel, SearchParams, SearchResult, _top_k, log_likelihood,
                     score_poses, shift_grid, subdivide)
from .symmetry import symmetry_operators

SPREAD_KEPT = 16         # poses per image kept by marginalization (the rest carry < a few % of the weight)


def mates(rotations, operators):
    """The N poses (B, G, 3, 3) related to ``rotations`` (B, 3, 3) by ``operators`` (G, 3, 3):
    ``A·gᵀ``, identity first when ``operators`` starts with it."""
    xp = get_array_module(rotations)
    ops_t = to_device(np.ascontiguousarray(np.transpose(operators, (0, 2, 1))).astype(np.float32), xp)
    return xp.matmul(rotations[:, None], ops_t[None])


def relaxed_poses(volume_ft, images_ft, ctf, noise_var_shell, best: SearchResult, operators,
                  levels: list[SearchLevel], params: SearchParams,
                  padding: int = DEFAULT_PADDING) -> tuple[SearchResult, object]:
    """Maximization over the mates of each image's ``best`` pose. Each mate ``A·gᵀ`` is scored
    exactly (at ``best``'s shift and the last level's cutoff) against the C1 reference
    ``volume_ft``: a mate is an exact copy of a refined pose for the symmetric core, so the scores
    differ by the asymmetric part alone. Subdivision cells around every mate would not do: their
    children sit off the refined pose, and the strong core's misfit there, different for each mate,
    can outweigh a small partner (on a noise-free T test with 7.5° cells the true mate won for
    about three quarters of the images; scored exactly, for all). The best mate is then polished by
    a subdivision through ``levels`` (its first level the cell size), kept where it scores better
    than the mate itself. Returns the polished pose per image and the index (B,) of the chosen mate
    (operator)."""
    xp = get_array_module(images_ft)
    related = mates(best.rotations, operators).astype(xp.float32)                 # (B, G, 3, 3)
    scores = score_poses(volume_ft, images_ft, ctf, noise_var_shell, related, best.shifts_px[:, None],
                         levels[-1].cutoff_px, padding)[:, 0]                      # (B, G)
    choice = xp.argmax(scores, axis=1)
    rows = xp.arange(related.shape[0])
    chosen, chosen_scores = related[rows, choice], scores[rows, choice]
    start = Candidates(chosen[:, None], best.shifts_px[:, None], chosen_scores[:, None])
    polished = subdivide(volume_ft, images_ft, ctf, noise_var_shell, levels, params, start, padding)
    # the subdivision only visits cells beside the mate: keep the mate itself where it scores better
    better = polished.scores > chosen_scores
    return SearchResult(xp.where(better[:, None, None], polished.rotations, chosen),
                        xp.where(better[:, None], polished.shifts_px, best.shifts_px),
                        xp.maximum(polished.scores, chosen_scores)), choice


def marginalization_level(levels: list, step_deg: float | None) -> SearchLevel | None:
    """The level :func:`mode_spread` scores at for marginalization over ± ``step_deg`` (None: off):
    that rotation step, the shift step of the search level whose rotation step is nearest it, and
    the finest level's cutoff."""
    if not step_deg:
        return None
    step = math.radians(step_deg)
    nearest = min(levels, key=lambda level: abs(level.rotation_step_rad - step))
    return SearchLevel(step, nearest.shift_step_px, levels[-1].cutoff_px)


def mode_spread(volume_ft, images_ft, ctf, noise_var_shell, best: SearchResult, level: SearchLevel,
                n_kept: int = SPREAD_KEPT, padding: int = DEFAULT_PADDING) -> PoseSpread:
    """Marginalization inside the mode of ``best``: the 27 rotations ``A·Δ`` (axis-angle Δ ∈
    {−1, 0, 1}³ × the level's step, as :func:`cryocv.local_search.rotation_offsets`) × 9 shifts
    (±1 shift step) around each image's best pose, scored at the level's cutoff, weighted by their
    likelihood ``exp(s·|s|/2)`` (see :func:`cryocv.search.log_likelihood`); the ``n_kept``
    heaviest are returned with weights renormalized to sum to one per image."""
    xp = get_array_module(images_ft)
    b = images_ft.shape[0]
    step, shift_step = level.rotation_step_rad, level.shift_step_px
    deltas = device_constant(rotation_offsets(math.sqrt(3) * step, step), xp)      # the 3 × 3 × 3 cube
    rotations = xp.matmul(best.rotations[:, None], deltas[None])                   # (B, 27, 3, 3)
    shifts = best.shifts_px[:, None, :] + device_constant(shift_grid(math.sqrt(2) * shift_step, shift_step), xp)  # (B, 9, 2)
    r = deltas.shape[0]
    scores = score_poses(volume_ft, images_ft, ctf, noise_var_shell, rotations, shifts, level.cutoff_px,
                         padding)                                                  # (B, 9, 27)
    gain = log_likelihood(scores.astype(xp.float64)).reshape(b, -1)
    keep = _top_k(gain, n_kept)                                                    # (B, K), best first
    kept = xp.take_along_axis(gain, keep, axis=1)
    weights = xp.exp(kept - kept[:, :1])
    weights = (weights / weights.sum(axis=1, keepdims=True)).astype(xp.float32)
    rows = xp.arange(b)[:, None]
    return PoseSpread(rotations[rows, keep % r], shifts[rows, keep // r], weights)


def prior_in_mode(prior_rotations, current_rotations, operators):
    """The mate of each prior pose (B, 3, 3) nearest its current pose (B, 3, 3): where a local
    search around a symmetric consensus pose must look once relaxation moved the particle to
    another mode (extents bound the change modulo the group). Same array module."""
    xp = get_array_module(prior_rotations)
    related = mates(prior_rotations, operators)                                   # (B, G, 3, 3)
    return related[xp.arange(related.shape[0]), mode_of(current_rotations, prior_rotations, operators)]


def mode_of(rotations, reference_rotations, operators):
    """Index (n,) of the operator g whose mate ``reference·gᵀ`` is nearest each of ``rotations``
    (n, 3, 3): which of the N modes a particle sits in, relative to reference poses. Same array
    module (nearest: the largest ``tr(Mᵀ R)``)."""
    xp = get_array_module(rotations)
    related = mates(reference_rotations, operators)                              # (n, G, 3, 3)
    return xp.argmax(xp.sum(related * rotations[:, None], axis=(-2, -1)), axis=1)


def symmetrized(volume, operators):
    """The G-average of a map (N, N, N): Σ_g V(g·x) / G."""
    xp = get_array_module(volume)
    total = xp.zeros_like(volume)
    for g in operators:
        total += transform_volume(volume, MapTransform(np.asarray(g, dtype=np.float64), np.zeros(3)))
    return total / len(operators)


def register_over_group(reference, moving, operators, mask=None, pixel_size_A: float | None = None,
                        resolution_A: float | None = None) -> tuple[int, np.ndarray]:
    """The operator g (index, (3, 3)) for which the asymmetric part of ``moving(g·x)`` best matches
    that of ``reference`` (normalized correlation inside ``mask``; both low-passed to
    ``resolution_A`` when it and ``pixel_size_A`` are given): the symmetry mate at which half-set 2
    broke the symmetry, relative to half-set 1. The asymmetric part is the map minus its G-average:
    the symmetric core is the same under every g, and the interpolation error of turning it (about
    axes off the grid's, as T's 3-folds) can outweigh a small partner's signal in a whole-map
    correlation."""
    best, _ = asymmetric_agreement(reference, moving, operators, mask, pixel_size_A, resolution_A)
    return best, np.asarray(operators[best], dtype=np.float64)


def asymmetric_agreement(reference, moving, operators, mask=None, pixel_size_A: float | None = None,
                         resolution_A: float | None = None) -> tuple[int, float]:
    """(index of the best operator g, correlation): the normalized correlation, inside ``mask``,
    of the asymmetric parts of ``reference`` and of ``moving(g·x)`` (see
    :func:`register_over_group`), maximized over the group. Near 0 while two half-maps are still
    symmetric (their asymmetric parts are noise); it rises as both break the symmetry the same
    way: a relaxation has not converged while it still rises."""
    xp = get_array_module(reference)
    if pixel_size_A and resolution_A:
        reference, moving = (lowpass_map(m, pixel_size_A, resolution_A) for m in (reference, moving))
    weight = 1 if mask is None else mask
    ref = (reference - symmetrized(reference, operators)) * weight
    ref_norm = float(xp.sqrt((ref * ref).sum()))
    mov = moving - symmetrized(moving, operators)
    scores = []
    for g in operators:
        turned = transform_volume(mov, MapTransform(np.asarray(g, dtype=np.float64), np.zeros(3))) * weight
        scores.append(float((ref * turned).sum()) / max(float(xp.sqrt((turned * turned).sum())) * ref_norm, 1e-30))
    best = int(np.argmax(scores))
    return best, scores[best]


def asymmetric_fsc(map1, map2, operators) -> np.ndarray:
    """FSC (per shell) of the asymmetric parts (map minus its G-average) of two maps."""
    return to_numpy(fsc_curve(map1 - symmetrized(map1, operators), map2 - symmetrized(map2, operators)))


def pose_change(particles, input_euler, input_origin_A, fulcrum, symmetry: str) -> tuple:
    """Per particle of ``particles`` (refined poses): rotation change (°) from the input pose
    (``input_euler`` (n, 3), ``input_origin_A`` (n, 2)), and the shift change (Å) of the image of
    ``fulcrum`` (px from the box centre), both from the mate of the input pose (under ``symmetry``)
    nearest the refined pose (local refinement's pose-change diagnostics)."""
    refined = particles.rotations.astype(np.float32)
    start = prior_in_mode(euler_to_matrix(input_euler).astype(np.float32), refined, symmetry_operators(symmetry))
    rotation = angular_distance_deg(refined, start)
    px = particles.pixel_size_A
    before = to_fulcrum_frame(start, input_origin_A / px, fulcrum)
    after = to_fulcrum_frame(refined, particles.origin_A / px, fulcrum)
    return rotation, np.linalg.norm(after - before, axis=1) * px
