"""Symmetry relaxation for pseudo-symmetric particles: refine against a C1 reference, but let each
particle choose among the N symmetry-related poses of its best pose under a point group G
(the mates ``A·gᵀ``, g ∈ G: the poses at which a G-symmetric map looks the same), and
reconstruct in C1 (cryoSPARC's symmetry relaxation; RELION's ``--relax_sym`` for cyclic groups).

Each mate is refined by a short branch-and-bound subdivision around it (so a mate is not lost
to the grid), scored against the C1 reference, and the best is kept (maximization): every
particle contributes to exactly one of the N modes. The half-sets may break the symmetry at
different, equivalent sites; :func:`register_over_group` finds the operator that brings half-map
2 onto half-map 1 (their asymmetric parts).
"""
from __future__ import annotations

import numpy as np

from .backend import get_array_module, to_device, to_numpy
from .fsc import fsc_curve
from .geometry import angular_distance_deg
from .register import MapTransform, transform_volume
from .search import Candidates, SearchLevel, SearchParams, SearchResult, subdivide


def mates(rotations, operators):
    """The N poses (B, G, 3, 3) related to ``rotations`` (B, 3, 3) by ``operators`` (G, 3, 3):
    ``A·gᵀ``, identity first when ``operators`` starts with it."""
    xp = get_array_module(rotations)
    ops_t = to_device(np.ascontiguousarray(np.transpose(operators, (0, 2, 1))).astype(np.float32), xp)
    return xp.matmul(rotations[:, None], ops_t[None])


def relaxed_poses(volume_ft, images_ft, ctf, noise_var_shell, best: SearchResult, operators,
                  levels: list[SearchLevel], params: SearchParams) -> tuple[SearchResult, object]:
    """Maximization over the mates of each image's ``best`` pose: each mate is the start cell
    of a subdivision through ``levels`` (its first level the cell size), scored against the C1
    reference ``volume_ft``. Returns the best refined mate per image and the index (B,) of its
    operator."""
    xp = get_array_module(images_ft)
    b = images_ft.shape[0]
    related = mates(best.rotations, operators)                               # (B, G, 3, 3)
    results = []
    for g in range(related.shape[1]):
        start = Candidates(related[:, g][:, None], best.shifts_px[:, None], best.scores[:, None])
        results.append(subdivide(volume_ft, images_ft, ctf, noise_var_shell, levels, params, start))
    scores = xp.stack([r.scores for r in results], axis=1)                   # (B, G)
    choice = xp.argmax(scores, axis=1)
    rows = xp.arange(b)
    rotations = xp.stack([r.rotations for r in results], axis=1)[rows, choice]
    shifts = xp.stack([r.shifts_px for r in results], axis=1)[rows, choice]
    return SearchResult(rotations, shifts, scores[rows, choice]), choice


def mode_of(rotations: np.ndarray, reference_rotations: np.ndarray, operators: np.ndarray) -> np.ndarray:
    """Index (n,) of the operator g whose mate ``reference·gᵀ`` is nearest each of ``rotations``
    (n, 3, 3): which of the N modes a particle sits in, relative to reference poses."""
    distances = np.stack([angular_distance_deg(rotations, reference_rotations @ g.T) for g in operators], axis=1)
    return np.argmin(distances, axis=1)


def symmetrized(volume, operators):
    """The G-average of a map (N, N, N): Σ_g V(g·x) / G."""
    xp = get_array_module(volume)
    total = xp.zeros_like(volume)
    for g in operators:
        total += transform_volume(volume, MapTransform(np.asarray(g, dtype=np.float64), np.zeros(3)))
    return total / len(operators)


def register_over_group(reference, moving, operators, mask=None) -> tuple[int, np.ndarray]:
    """The operator g (index, (3, 3)) for which ``moving(g·x)`` best matches ``reference``
    (correlation, inside ``mask``): the symmetry mate at which half-set 2 broke the symmetry,
    relative to half-set 1."""
    xp = get_array_module(reference)
    scores = []
    weight = 1 if mask is None else mask
    ref = reference * weight
    for g in operators:
        turned = transform_volume(moving, MapTransform(np.asarray(g, dtype=np.float64), np.zeros(3))) * weight
        scores.append(float((ref * turned).sum()) / max(float(xp.sqrt((turned * turned).sum())), 1e-30))
    best = int(np.argmax(scores))
    return best, np.asarray(operators[best], dtype=np.float64)


def asymmetric_fsc(map1, map2, operators) -> np.ndarray:
    """FSC (per shell) of the asymmetric parts (map minus its G-average) of two maps."""
    return to_numpy(fsc_curve(map1 - symmetrized(map1, operators), map2 - symmetrized(map2, operators)))
