"""Central-slice projection and back-projection on a padded half-space Fourier grid.

A volume of box N is zero-padded to ``Np = pad·N`` (pad 2 by default),
pre-divided by the trilinear gridding profile and transformed with
:func:`cryocv.fourier.ft3_centered` → array ``(Np, Np, Np//2+1)`` complex64.
A 2D frequency ``(kx, ky)`` of an image (integer units of 1/N) in pose ``A``
(RELION matrix) samples the volume at ``q = pad · Aᵀ (kx, ky, 0)`` by trilinear
interpolation; points with ``qx < 0`` use the Friedel mate (``-q``, conjugated).

Frequencies are passed as flat lists ``kx, ky`` (M,) — usually every half-plane
point with ``|k| <= r_max`` from :func:`frequency_points` — so scoring can work on
any band. Each operation has a numpy twin and a CuPy kernel (``cryocv.kernels``)
selected by the type of the volume.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .backend import get_array_module, is_cupy, to_device
from .fourier import (ft3_centered_padded, half_plane_frequencies, ift3_centered_crop, phase_shift_images,
                      trilinear_gridding_profile, zero_beyond_radius)
from .masks import spherical_mask

DEFAULT_PADDING = 2
_ROTATION_CHUNK = 256  # numpy twin: rotations per chunk (bounds temporary memory)


@dataclass
class FrequencyPoints:
    """Half-plane points with |k| <= r_max of an N-box image.

    ``kx``, ``ky`` (M,) float32 integer frequencies; ``flat_index`` (M,) index into
    the flattened (N, N//2+1) half plane.
    """

    box_size: int
    r_max: float
    kx: object
    ky: object
    flat_index: object

    def gather(self, half_plane_ft):
        """(..., N, N//2+1) → (..., M) values at the points."""
        flat = half_plane_ft.reshape(half_plane_ft.shape[:-2] + (-1,))
        return flat[..., self.flat_index]

    def scatter(self, values):
        """(..., M) → (..., N, N//2+1) half plane, zero elsewhere."""
        xp = get_array_module(values)
        n = self.box_size
        out = xp.zeros(values.shape[:-1] + (n * (n // 2 + 1),), dtype=values.dtype)
        out[..., self.flat_index] = values
        return out.reshape(values.shape[:-1] + (n, n // 2 + 1))


def frequency_points(box_size: int, r_max: float | None = None, xp=np) -> FrequencyPoints:
    """Points of the half plane within radius ``r_max`` (default N/2, Nyquist); read-only arrays,
    made once per (box, radius, device) and then reused: the search asks for them per batch and
    level, and on a GPU their making would wait for the device's queue."""
    r_max = float(box_size / 2 if r_max is None else r_max)
    key = (box_size, r_max, None if xp is np else xp.cuda.Device().id)
    if key not in _POINTS:
        kx, ky = half_plane_frequencies(box_size)
        flat = np.nonzero(((kx ** 2 + ky ** 2) <= r_max ** 2).ravel())[0]
        points = [to_device(a, xp) for a in (kx.ravel()[flat], ky.ravel()[flat], flat)]
        if xp is np:          # shared by every caller: a write into them would corrupt later searches
            for a in points:
                a.flags.writeable = False
        if len(_POINTS) >= 64:
            _POINTS.pop(next(iter(_POINTS)))
        _POINTS[key] = FrequencyPoints(box_size, r_max, *points)
    return _POINTS[key]


_POINTS: dict = {}


def prepare_volume(volume, padding: int = DEFAULT_PADDING):
    """Real-space map (N, N, N) → padded half-space FT (Np, Np, Np//2+1) complex64,
    pre-corrected for trilinear interpolation."""
    xp = get_array_module(volume)
    n = volume.shape[0]
    if volume.shape != (n, n, n):
        raise ValueError(f"volume must be cubic, got shape {volume.shape}")
    padded_size = padding * n
    corrected = volume.astype(xp.float32) / trilinear_gridding_profile(n, padded_size, xp)
    return ft3_centered_padded(corrected, padded_size).astype(xp.complex64, copy=False)


def _slice_coordinates(rotations, kx, ky, padding):
    """3D coordinates q = pad·Aᵀ(kx, ky, 0): three arrays (B, M)."""
    r = rotations
    qx = padding * (r[:, 0, 0, None] * kx[None] + r[:, 1, 0, None] * ky[None])
    qy = padding * (r[:, 0, 1, None] * kx[None] + r[:, 1, 1, None] * ky[None])
    qz = padding * (r[:, 0, 2, None] * kx[None] + r[:, 1, 2, None] * ky[None])
    return qx, qy, qz


def _trilinear_corners(qx, qy, qz, shape):
    """Yield (flat_index, weight) for the 8 corners of each point (numpy); corners outside
    the grid get weight 0 (and a clipped index). Per-axis weights and index sums are
    formed once and combined, not recomputed per corner."""
    np_, _, nh = shape
    center = np_ // 2

    def axis(coordinate, offset, size):
        start = np.floor(coordinate)
        frac = (coordinate - start).astype(np.float32)
        start = start.astype(np.int64) + offset
        pairs = []
        for step, weight in ((0, 1 - frac), (1, frac)):
            index = start + step
            inside = (index >= 0) & (index < size)
            pairs.append((np.clip(index, 0, size - 1), weight * inside))
        return pairs

    xs, ys, zs = axis(qx, 0, nh), axis(qy, center, np_), axis(qz, center, np_)
    for zi, wz in zs:
        z_flat = zi * (np_ * nh)
        for yi, wy in ys:
            zy_flat = z_flat + yi * nh
            wzy = wz * wy
            for xi, wx in xs:
                yield zy_flat + xi, wzy * wx


def extract_slices(volume_ft, rotations, points: FrequencyPoints, padding: int = DEFAULT_PADDING,
                   for_scores: bool = False):
    """Central slices of ``volume_ft`` at ``rotations`` (B, 3, 3): → (B, M) complex64.
    ``for_scores``: on a GPU the texture units may sample them (:data:`cryocv.kernels.SAMPLING`;
    values within ~0.2 %), for pose scores and noise estimates, never for maps or subtraction."""
    if is_cupy(volume_ft):
        from . import kernels
        return kernels.extract_slices_gpu(volume_ft, rotations, points.kx, points.ky, padding, texture=for_scores)
    rotations = np.asarray(rotations, dtype=np.float32)
    flat_volume = volume_ft.ravel()
    out = np.empty((rotations.shape[0], points.kx.size), dtype=np.complex64)
    for start in range(0, rotations.shape[0], _ROTATION_CHUNK):
        rot = rotations[start:start + _ROTATION_CHUNK]
        qx, qy, qz = _slice_coordinates(rot, points.kx, points.ky, padding)
        mate = qx < 0
        qx, qy, qz = np.where(mate, -qx, qx), np.where(mate, -qy, qy), np.where(mate, -qz, qz)
        acc = np.zeros(qx.shape, dtype=np.complex64)
        for flat, weight in _trilinear_corners(qx, qy, qz, volume_ft.shape):
            acc += weight * flat_volume[flat]
        out[start:start + rot.shape[0]] = np.where(mate, np.conj(acc), acc)
    return out


def insert_slices(data_ft, weight, rotations, points: FrequencyPoints, values, value_weights,
                  padding: int = DEFAULT_PADDING):
    """Back-project in place: add ``values`` (B, M) complex into ``data_ft`` and
    ``value_weights`` (B, M) real into ``weight`` (both padded half-space grids)
    at slice coordinates ``pad·Aᵀ(kx, ky, 0)`` with trilinear weights.

    Points whose folded ``qx < 1`` also deposit their Friedel mate on the x = 0
    plane, so the half-space grid holds what a full grid would.
    """
    if is_cupy(data_ft):
        from . import kernels
        kernels.insert_slices_gpu(data_ft, weight, rotations, points.kx, points.ky,
                                  values, value_weights, padding)
        return
    rotations = np.asarray(rotations, dtype=np.float32)
    size = data_ft.size
    sum_re = np.zeros(size)
    sum_im = np.zeros(size)
    sum_w = np.zeros(size)
    # one bincount per component and chunk over all 8 corners of both passes; its output is the whole
    # grid, so a chunk holds about as many corner entries as the grid has voxels
    chunk = int(np.clip(size // (8 * max(points.kx.size, 1)), 1, _ROTATION_CHUNK))
    for start in range(0, rotations.shape[0], chunk):
        stop = start + chunk
        qx, qy, qz = _slice_coordinates(rotations[start:stop], points.kx, points.ky, padding)
        val = np.asarray(values[start:stop])
        wgt = np.broadcast_to(np.asarray(value_weights[start:stop], dtype=np.float32), qx.shape)
        mate = qx < 0
        qx, qy, qz = np.where(mate, -qx, qx), np.where(mate, -qy, qy), np.where(mate, -qz, qz)
        val = np.where(mate, np.conj(val), val)
        near = qx < 1  # the mate at -q also reaches the x = 0 plane
        passes = [(qx, qy, qz, val, wgt), (-qx[near], -qy[near], -qz[near], np.conj(val[near]), wgt[near])]
        corners = [(flat.ravel(), w.ravel(), pv.ravel(), pw.ravel()) for px, py, pz, pv, pw in passes
                   for flat, w in _trilinear_corners(px, py, pz, data_ft.shape)]
        idx = np.concatenate([c[0] for c in corners])
        sum_re += np.bincount(idx, weights=np.concatenate([w * v.real for _, w, v, _ in corners]), minlength=size)
        sum_im += np.bincount(idx, weights=np.concatenate([w * v.imag for _, w, v, _ in corners]), minlength=size)
        sum_w += np.bincount(idx, weights=np.concatenate([w * vw for _, w, _, vw in corners]), minlength=size)
    data_ft += (sum_re + 1j * sum_im).reshape(data_ft.shape).astype(data_ft.dtype)
    weight += sum_w.reshape(weight.shape).astype(weight.dtype)


def project(volume_ft, rotations, box_size: int, shifts_px=None, padding: int = DEFAULT_PADDING):
    """Full projection images' half-plane FTs (B, N, N//2+1), optionally phase-shifted."""
    xp = get_array_module(volume_ft)
    points = frequency_points(box_size, xp=xp)
    slices = points.scatter(extract_slices(volume_ft, rotations, points, padding))
    if shifts_px is not None:
        slices = phase_shift_images(slices, shifts_px)
    return slices


def empty_accumulators(box_size: int, padding: int = DEFAULT_PADDING, xp=np):
    """Zeroed (data complex64, weight float32) padded half-space accumulators."""
    np_ = padding * box_size
    shape = (np_, np_, np_ // 2 + 1)
    return xp.zeros(shape, dtype=xp.complex64), xp.zeros(shape, dtype=xp.float32)


def weight_floor(weight) -> float:
    """The default regularization of :func:`accumulators_to_map`: 1e-3 of the mean non-zero
    weight (guards empty voxels only)."""
    xp = get_array_module(weight)
    count = int(xp.count_nonzero(weight))
    return 1e-3 * float(weight.sum(dtype=xp.float64)) / count if count else 1.0


def accumulators_to_map(data_ft, weight, box_size: int, regularization=None,
                        padding: int = DEFAULT_PADDING):
    """Divide accumulated data by weight and return the real-space map (N, N, N) float32.

    ``regularization`` is added to the weight: a scalar, an array of the
    accumulators' shape (Wiener term σ²/τ² per voxel), or None for :func:`weight_floor`.
    See :func:`divided_to_map` for the rest."""
    xp = get_array_module(data_ft)
    regularization = weight_floor(weight) if regularization is None else regularization
    ft = (data_ft / (weight + regularization)).astype(xp.complex64, copy=False)
    return divided_to_map(ft, box_size, padding)


def divided_to_map(ft, box_size: int, padding: int = DEFAULT_PADDING):
    """Real-space map (N, N, N) float32 of the padded half-space grid ``ft`` (data / weight; it is
    destroyed: used as the inverse FFT's scratch). Voxels beyond Nyquist are zeroed, and, as RELION
    does, the map is zeroed outside the box's inscribed sphere (cosine edge over the last 3
    pixels): corners are only noise amplified by the gridding correction."""
    xp = get_array_module(ft)
    np_ = padding * box_size
    zero_beyond_radius(ft, np_ / 2)
    cropped = ift3_centered_crop(ft, np_, box_size, overwrite=True)
    window = spherical_mask(box_size, box_size / 2 - 3, 3.0, xp)
    return (cropped * window / trilinear_gridding_profile(box_size, np_, xp)).astype(xp.float32)


def sample_volume_ft(volume_ft, qx, qy, qz):
    """Trilinear samples of a prepared padded half-space FT at 3D points ``q`` (padded grid
    units, any sign: ``qx < 0`` reads the Friedel mate): arrays of one shape → complex64 of
    that shape. Array-module generic (numpy or CuPy, no kernel): for 3D maps (alignment,
    rotation), not the per-image hot path."""
    xp = get_array_module(volume_ft)
    np_, _, nh = volume_ft.shape
    center = np_ // 2
    mate = qx < 0
    qx, qy, qz = xp.where(mate, -qx, qx), xp.where(mate, -qy, qy), xp.where(mate, -qz, qz)
    flat = volume_ft.ravel()
    out = xp.zeros(qx.shape, dtype=xp.complex64)
    x0, y0, z0 = xp.floor(qx), xp.floor(qy), xp.floor(qz)
    fx, fy, fz = (qx - x0).astype(xp.float32), (qy - y0).astype(xp.float32), (qz - z0).astype(xp.float32)
    x0, y0, z0 = x0.astype(xp.int64), y0.astype(xp.int64) + center, z0.astype(xp.int64) + center
    for dz, wz in ((0, 1 - fz), (1, fz)):
        zi = z0 + dz
        for dy, wy in ((0, 1 - fy), (1, fy)):
            yi = y0 + dy
            for dx, wx in ((0, 1 - fx), (1, fx)):
                xi = x0 + dx
                inside = (xi < nh) & (yi >= 0) & (yi < np_) & (zi >= 0) & (zi < np_)
                index = (xp.clip(zi, 0, np_ - 1) * np_ + xp.clip(yi, 0, np_ - 1)) * nh + xp.clip(xi, 0, nh - 1)
                out += (wz * wy * wx * inside) * flat[index]
    return xp.where(mate, xp.conj(out), out)
