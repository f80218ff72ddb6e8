"""M-step accumulators: Σ CTF·X and Σ CTF² per half-set (and, for the NU regularizer, per
quarter-set inside each half-set) on the padded half-space Fourier grid.

Each image is inserted once per symmetry operator g at pose ``A·gᵀ`` (the slice of a
symmetric map at Aᵀk equals the one at g·Aᵀk).
"""
from __future__ import annotations

import numpy as np

from .backend import get_array_module, to_device
from .projector import (DEFAULT_PADDING, FrequencyPoints, accumulators_to_map, divided_to_map, empty_accumulators,
                        insert_slices, weight_floor)


def insert_with_symmetry(accumulator, rotations, points: FrequencyPoints, values, weights, operators,
                         padding: int = DEFAULT_PADDING):
    """Insert a batch once per symmetry operator g at pose ``A·gᵀ`` into ``accumulator``
    (data, weight); ``rotations`` (B, 3, 3) on the accumulator's device, ``operators``
    (G, 3, 3) numpy; ``values``/``weights`` (B, M) at ``points``."""
    xp = get_array_module(rotations)
    for g in operators:
        rot_g = xp.matmul(rotations, xp.asarray(g.T.astype(np.float32)))
        insert_slices(*accumulator, rot_g, points, values, weights, padding)


class Accumulators:
    """(data, weight) grids keyed by (half, part): part 0 only, or parts 0/1 (quarter-sets)
    when ``quarters`` (n,) 0/1 labels per particle are given.

    ``operators`` (G, 3, 3) symmetry operators (numpy); ``xp`` the device's array module."""

    def __init__(self, box_size: int, operators, xp, quarters: np.ndarray | None = None,
                 padding: int = DEFAULT_PADDING):
        self.box_size = box_size
        self.operators = operators
        self.padding = padding
        self.quarters = quarters
        parts = (0, 1) if quarters is not None else (0,)
        self.grids = {(h, q): empty_accumulators(box_size, padding, xp) for h in (1, 2) for q in parts}

    def insert(self, half: int, index: np.ndarray, rotations, points: FrequencyPoints, values, weights):
        """Insert images of half-set ``half`` (particle positions ``index`` (B,)) at ``rotations``
        (B, 3, 3) with ``values``/``weights`` (B, M) at ``points``."""
        if self.quarters is None:
            insert_with_symmetry(self.grids[(half, 0)], rotations, points, values, weights, self.operators,
                                 self.padding)
            return
        xp = get_array_module(rotations)
        for q in (0, 1):
            in_q = self.quarters[index] == q
            if in_q.any():
                idx = to_device(np.nonzero(in_q)[0], xp)
                insert_with_symmetry(self.grids[(half, q)], rotations[idx], points, values[idx], weights[idx],
                                     self.operators, self.padding)

    def half(self, h: int):
        """(data, weight) of half-set ``h``, summed over its parts."""
        if self.quarters is None:
            return self.grids[(h, 0)]
        (da, wa), (db, wb) = self.grids[(h, 0)], self.grids[(h, 1)]
        return da + db, wa + wb

    def half_map(self, h: int, regularization=None):
        """Map (N, N, N) of half-set ``h`` (see :func:`cryocv.projector.accumulators_to_map`); with
        quarters the half-set's sums are formed once and divided in place, so a large box needs
        one data grid and one weight grid beyond the accumulators, and the weight is freed before
        the inverse FFT."""
        if self.quarters is None:
            return accumulators_to_map(*self.grids[(h, 0)], self.box_size, regularization, self.padding)
        weight = self.half_weight(h)
        weight += weight_floor(weight) if regularization is None else regularization
        data = self.grids[(h, 0)][0] + self.grids[(h, 1)][0]
        data /= weight
        weight = None
        return divided_to_map(data, self.box_size, self.padding)

    def half_weight(self, h: int):
        """Σ CTF² of half-set ``h`` (the weight grid of :meth:`half`)."""
        if self.quarters is None:
            return self.grids[(h, 0)][1]
        return self.grids[(h, 0)][1] + self.grids[(h, 1)][1]

    def quarter(self, h: int, q: int):
        """(data, weight) of quarter-set ``q`` of half-set ``h`` (only with quarters)."""
        return self.grids[(h, q)]

    def half_maps(self):
        """Unregularized half-maps [1, 2] (N, N, N) float32."""
        return [self.half_map(h) for h in (1, 2)]


def map_stage_device_bytes(box_size: int, nu: bool, padding: int = DEFAULT_PADDING) -> int:
    """Device bytes a refinement iteration holds besides images and search work: the
    accumulators (2 or, for NU, 4 grids of complex data + weight), one prepared reference and
    the working grids of forming a map (a half-set sum, an inverse FFT and its workspace)."""
    np_ = padding * box_size
    grid = np_ * np_ * (np_ // 2 + 1) * 4            # one float32 half-space grid
    return ((4 if nu else 2) * 3 + 2 + 6) * grid


def quarter_split(half_set: np.ndarray, seed: int) -> np.ndarray:
    """Balanced random 0/1 quarter label inside each half-set (n,)."""
    rng = np.random.default_rng(seed + 7919)
    quarters = np.zeros(half_set.size, dtype=np.int8)
    for h in (1, 2):
        members = np.nonzero(half_set == h)[0]
        labels = (np.arange(members.size) % 2).astype(np.int8)
        rng.shuffle(labels)
        quarters[members] = labels
    return quarters
