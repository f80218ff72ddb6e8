"""Local pose search around prior poses: the start of the branch-and-bound subdivision
(:func:`cryocv.search.subdivide`, Punjani, Rubinstein, Fleet & Brubaker 2017) is a grid inside
given extents around each particle's prior pose, as in cryoSPARC's local refinement, instead of
the global SO(3) grid.

Extents bound the change from the *prior* (consensus) pose over the whole job: every
iteration searches ``rotation_extent`` / ``shift_extent`` around the same prior, and no
candidate outside them is ever kept (their log-prior is −∞). Optional Gaussian priors on the
rotation angle and the shift change add ``−θ²/2σ²`` and ``−|Δo|²/2σ²`` to the log-likelihood,
which for the search's score ``s = c/√n`` (see :mod:`cryocv.search`) is ``s·|s|/2``.

Rotations about a fulcrum ``f`` (x, y, z px from the box centre, map frame): the search runs in
the frame of the reference translated by −f (the fulcrum at the box centre), where a particle
imaged from map ``V`` at pose ``R`` with origin ``o`` has the origin ``o_f = o − (R f)_xy``
(:func:`to_fulcrum_frame`; the image model of :func:`cryocv.simulate.clean_projections`).
There a rotation about the box centre with ``o_f`` kept is a rotation of ``V`` about ``f``, so
the shift extent bounds the motion of the fulcrum's image.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from .backend import device_constant, get_array_module
from .geometry import axis_angle_to_matrix
from .projector import DEFAULT_PADDING, frequency_points
from .search import (Candidates, SearchLevel, SearchParams, _top_k, candidates_per_level, log_likelihood,
                     score_poses, shift_grid)


@dataclass
class LocalPrior:
    """Extents (hard bounds) and optional Gaussian widths of the change from the prior pose.

    ``rotations`` (B, 3, 3) and ``shifts_px`` (B, 2) the prior poses (shifts in the search's
    frame), on the device; angles in radians, shifts in pixels; sigma None: flat inside."""

    rotations: object
    shifts_px: object
    rotation_extent_rad: float
    shift_extent_px: float
    rotation_sigma_rad: float | None = None
    shift_sigma_px: float | None = None

    def rotation(self, rotations):
        """Log-prior (B, ...) of ``rotations`` (B, ..., 3, 3)."""
        xp = get_array_module(rotations)
        prior = self.rotations.reshape((self.rotations.shape[0],) + (1,) * (rotations.ndim - 3) + (3, 3))
        cos = xp.clip((xp.sum(prior * rotations, axis=(-2, -1)) - 1) / 2, -1.0, 1.0)   # tr(AᵀR) = Σ A∘R
        angle = xp.arccos(cos)
        value = xp.zeros(angle.shape, dtype=xp.float32)
        if self.rotation_sigma_rad:
            value -= (angle ** 2 / (2 * self.rotation_sigma_rad ** 2)).astype(xp.float32)
        # the grid's cells straddle the bound: allow half a base step of slack for cell centres
        return xp.where(angle > self.rotation_extent_rad * (1 + 1e-4) + 1e-6, -xp.inf, value).astype(xp.float32)

    def shift(self, shifts_px):
        """Log-prior (B, ...) of ``shifts_px`` (B, ..., 2)."""
        xp = get_array_module(shifts_px)
        prior = self.shifts_px.reshape((self.shifts_px.shape[0],) + (1,) * (shifts_px.ndim - 2) + (2,))
        distance2 = xp.sum((shifts_px - prior) ** 2, axis=-1)
        value = xp.zeros(distance2.shape, dtype=xp.float32)
        if self.shift_sigma_px:
            value -= (distance2 / (2 * self.shift_sigma_px ** 2)).astype(xp.float32)
        bound = (self.shift_extent_px + 1e-4) ** 2
        return xp.where(distance2 > bound, -xp.inf, value).astype(xp.float32)


def rotation_offsets(extent_rad: float, step_rad: float) -> np.ndarray:
    """Rotations (K, 3, 3) float32 of a cubic axis-angle grid of spacing ``step_rad`` inside the
    ball of radius ``extent_rad`` (identity first)."""
    n = int(math.floor(extent_rad / step_rad + 1e-6))
    axis = np.arange(-n, n + 1) * step_rad
    grid = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), axis=-1).reshape(-1, 3)
    grid = grid[np.linalg.norm(grid, axis=1) <= extent_rad + 1e-9]
    grid = grid[np.argsort(np.linalg.norm(grid, axis=1), kind="stable")]
    return axis_angle_to_matrix(grid).astype(np.float32)


@dataclass
class StartPlan:
    """Where a local search starts: ``levels[first_level]`` with ``offsets`` (K, 3, 3) around
    its centres and shifts within ``window_px`` (None: the shift extent), keeping ``n_kept``;
    ``subdivision`` the settings of the levels after it."""

    first_level: int
    offsets: np.ndarray
    window_px: float | None
    n_kept: int
    subdivision: SearchParams


def start_plan(levels: list, params: SearchParams, extent_rad: float, narrow_steps: int = 0) -> StartPlan:
    """The whole extents at the first level; or, with ``narrow_steps`` > 0 (and two levels or
    more), a window of that many second-level steps (rotation and shift) around the last poses,
    keeping from there as many candidates as the whole search keeps at that level."""
    if narrow_steps <= 0 or len(levels) < 2:
        return StartPlan(0, rotation_offsets(extent_rad, levels[0].rotation_step_rad), None,
                         candidates_per_level(len(levels), params)[0], params)
    step = levels[1].rotation_step_rad
    n_kept = candidates_per_level(len(levels), params)[1]
    return StartPlan(1, rotation_offsets(min(narrow_steps * step, extent_rad), step),
                     narrow_steps * levels[1].shift_step_px, n_kept, replace(params, n_base_candidates=n_kept))


def to_fulcrum_frame(rotations, origin_px, fulcrum_px):
    """Origins (B, 2) of the particles in the frame of the reference translated by −``fulcrum_px``
    (x, y, z px): ``o − (R f)_xy``; ``rotations`` (B, 3, 3)."""
    xp = get_array_module(rotations)
    f = device_constant(np.asarray(fulcrum_px, dtype=np.float32), xp)
    return origin_px - xp.matmul(rotations, f)[:, :2]


def from_fulcrum_frame(rotations, origin_fulcrum_px, fulcrum_px):
    """Inverse of :func:`to_fulcrum_frame`: ``o_f + (R f)_xy``."""
    xp = get_array_module(rotations)
    f = device_constant(np.asarray(fulcrum_px, dtype=np.float32), xp)
    return origin_fulcrum_px + xp.matmul(rotations, f)[:, :2]


def local_start(volume_ft, images_ft, ctf, noise_var_shell, level: SearchLevel, prior: LocalPrior,
                offsets, n_kept: int, padding: int = DEFAULT_PADDING, centre=None,
                window_px: float | None = None) -> Candidates:
    """Start of a local search: every rotation ``A·Δ`` (``offsets`` Δ (K, 3, 3) on the device, see
    :func:`rotation_offsets`) × every shift of the level's grid within the shift extent around
    the prior, scored at the level's cutoff; keep the best ``n_kept`` rotations per image with
    their best shift (scores as log-likelihood + log-prior).

    ``centre`` (rotations (B, 3, 3), shifts (B, 2)) moves the grid to other poses (e.g. the last
    iteration's) and ``window_px`` narrows its shifts; the prior's extents still bound every
    candidate. ``images_ft`` (B, N, N//2+1) raw half-plane FTs; ``ctf`` same shape or None."""
    xp = get_array_module(volume_ft)
    b = images_ft.shape[0]
    centre_rotations, centre_shifts = centre if centre is not None else (prior.rotations, prior.shifts_px)
    rotations = xp.matmul(centre_rotations[:, None], offsets[None])                  # (B, K, 3, 3)
    extent = prior.shift_extent_px if window_px is None else min(window_px, prior.shift_extent_px)
    grid = device_constant(shift_grid(extent, level.shift_step_px), xp)               # (T, 2)
    shifts = centre_shifts[:, None, :] + grid[None]                                  # (B, T, 2)
    scores = score_poses(volume_ft, images_ft, ctf, noise_var_shell, rotations, shifts, level.cutoff_px,
                         padding)                                                    # (B, T, K)
    scores = (log_likelihood(scores) + prior.shift(shifts)[:, :, None]
              + prior.rotation(rotations)[:, None, :])
    best_shift = xp.argmax(scores, axis=1)                                           # (B, K)
    best = xp.max(scores, axis=1)
    keep = _top_k(best, n_kept)
    rows = xp.arange(b)[:, None]
    return Candidates(rotations[rows, keep], shifts[rows, xp.take_along_axis(best_shift, keep, axis=1)],
                      xp.take_along_axis(best, keep, axis=1))


def local_batch_size(box_size: int, level: SearchLevel, n_offsets: int, n_shifts: int, budget_bytes: int,
                     cpu: bool) -> int:
    """Images per batch so the start level's slices and scores fit ``budget_bytes``."""
    m = int(frequency_points(box_size, level.cutoff_px).kx.size)
    per_image = (8 * 4 * n_offsets * m                 # slices, stacked copy, |P|²
                 + 8 * 3 * n_shifts * m                 # shifted image terms (+ stacked)
                 + 4 * 4 * n_shifts * n_offsets         # scores and log-priors
                 + 8 * 6 * box_size * (box_size // 2 + 1))
    return int(np.clip(budget_bytes // max(per_image, 1), 8, 256 if cpu else 4096))
