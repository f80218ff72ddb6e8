"""Point-group symmetry operators with RELION's axis conventions (``symmetries.cpp``).

Cn: n-fold on z. Dn: n-fold on z, 2-fold on x. T: 3-fold on z, 2-fold on
(0, 0.816496, 0.577350). O: 3-fold on (1,1,1)/√3, 4-fold on z.
I (= I2, Crowther 222): 2-fold on z, 5-fold on (0.525731, 0, 0.850651).
I1 (no-Crowther 222): 2-fold on x, 5-fold on (0.850651, 0, -0.525731).
I3 (52-setting): 2-fold on (-0.525731, 0, 0.850651), 5-fold on z.
I4 (other 52-setting): 2-fold on (0.525731, 0, 0.850651), 5-fold on (0.894427, 0, 0.447214).
"""
from __future__ import annotations

import re

import numpy as np

from .geometry import angular_distance_deg, rotation_about_axis

_GENERATORS = {
    "T": [(3, (0, 0, 1)), (2, (0, 0.816496, 0.577350))],
    "O": [(3, (0.5773502, 0.5773502, 0.5773502)), (4, (0, 0, 1))],
    # the 2-fold and 5-fold generate I (their axes are 31.72° apart); RELION's 3-fold is implied
    "I1": [(2, (1, 0, 0)), (5, (0.85065080702670, 0, -0.5257311142635))],
    "I2": [(2, (0, 0, 1)), (5, (0.525731114, 0, 0.850650807))],
    "I3": [(2, (-0.5257311143, 0, 0.8506508070)), (5, (0, 0, 1))],
    "I4": [(2, (0.5257311143, 0, 0.8506508070)), (5, (0.8944271932547096, 0, 0.4472135909903704))],
}
DEFAULT_SYMMETRY = "C1"
_ORDERS = {"T": 12, "O": 24, "I1": 60, "I2": 60, "I3": 60, "I4": 60}


def parse_symmetry(name: str) -> str:
    """Normalise a symmetry name (``c4`` → ``C4``, ``I`` → ``I2``); raise ValueError if unknown."""
    text = str(name).strip().upper()
    if text == "I":
        return "I2"
    if text in _GENERATORS:
        return text
    if re.fullmatch(r"[CD][1-9][0-9]*", text):
        return text
    raise ValueError(f"unknown symmetry {name!r}: use C<n>, D<n>, T, O, I, I1, I2, I3 or I4")


def _close_group(generators, expected_order):
    ops = [np.eye(3)]
    frontier = [np.eye(3)]
    while frontier:
        new = []
        for g in frontier:
            for h in generators:
                cand = h @ g
                if not any(np.allclose(cand, o, atol=1e-4) for o in ops):
                    ops.append(cand)
                    new.append(cand)
        frontier = new
        if len(ops) > expected_order:
            raise RuntimeError("symmetry generators do not close into the expected group")
    if len(ops) != expected_order:
        raise RuntimeError(f"symmetry group has {len(ops)} operators, expected {expected_order}")
    return np.stack(ops)


def symmetry_operators(name: str) -> np.ndarray:
    """All rotation matrices (G, 3, 3) of a point group, identity first."""
    sym = parse_symmetry(name)
    if sym[0] in "CD" and sym[1:].isdigit():
        n = int(sym[1:])
        gens = [rotation_about_axis((0, 0, 1), 2 * np.pi / n)]
        if sym[0] == "D":
            gens.append(rotation_about_axis((1, 0, 0), np.pi))
        return _close_group(gens, n if sym[0] == "C" else 2 * n)
    gens = [rotation_about_axis(axis, 2 * np.pi / fold) for fold, axis in _GENERATORS[sym]]
    return _close_group(gens, _ORDERS[sym])


def pose_distance_deg(rotations_a, rotations_b, symmetry: str) -> np.ndarray:
    """Angle (n,) between poses (n, 3, 3), the smallest over the symmetry-equivalent poses B·g."""
    ops = symmetry_operators(symmetry)
    return np.min([angular_distance_deg(rotations_a, rotations_b @ g) for g in ops], axis=0)
