"""Non-uniform refinement's regularizer: a per-voxel low-pass chosen by cross-validation.

Non-uniform (Punjani, Zhang & Fleet, Nat. Methods 17, 1214 (2020), Methods):
each half-set is split into two quarter-sets with maps m_a, m_b. For candidate
cutoffs f_j (``n_cutoffs`` equispaced in (0, 0.5] cycles/px) and the
Butterworth low-pass B_j of order ``order``, the cross-validation residual
``(B_j m_a − m_b)² + (B_j m_b − m_a)²`` is averaged over a ball of radius
``awf / f_j`` voxels (the adaptive window factor times the cutoff's
wavelength); each voxel takes the cutoff θ*(x) with the least windowed
residual, and the half-map becomes ``(B_θ*(x) m)(x)``. The two half-maps are
filtered independently; they are the Wiener-regularized half-maps (the same
σ²/τ² as the uniform regularizer), so NU only adds local low-passing.

Two refinements of the paper's recipe, both measured on simulated data against
the true map (see ``bench/``): (1) the quarter-maps carry twice the noise of the
half-map the filter is applied to, so plain CV picks cutoffs that are too low
for it; with ``half_map_noise`` the windowed loss subtracts half of the filtered
noise, estimated from the quarter-map difference (an unbiased risk estimate
for the half-map); (2) the per-voxel cutoff field is smoothed and neighbouring
filters are blended, because a hard per-voxel switch acts like a sharp,
signal-shaped mask and adds high-frequency content correlated between halves.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .backend import get_array_module, to_numpy
from .fourier import rfft_frequency_squared, rfft_radius_cycles


@dataclass
class NUParams:
    """Settings of the NU filter (the paper's defaults: 50 cutoffs, order 8, window factor 3)."""

    n_cutoffs: int = 50
    order: int = 8
    awf: float = 3.0                    # adaptive window factor: window radius in wavelengths of the cutoff
    half_map_noise: bool = True         # correct the CV loss for the quarter-maps' extra noise
    smoothing_px: float = 1.0           # Gaussian smoothing of the chosen cutoff field

def butterworth_lowpass(radius_cycles_per_px, cutoff_cycles_per_px: float, order: int = NUParams.order):
    """Butterworth low-pass 1/√(1 + (|k|/f_c)^(2·order)) on frequencies in cycles/px."""
    xp = get_array_module(radius_cycles_per_px)
    ratio = radius_cycles_per_px / cutoff_cycles_per_px
    return 1.0 / xp.sqrt(1.0 + ratio ** (2 * order))


def nu_candidate_cutoffs(n_cutoffs: int = NUParams.n_cutoffs) -> np.ndarray:
    """Candidate cutoffs (cycles/px) equispaced in Fourier frequency: 0.5·j/n, j = 1..n."""
    if n_cutoffs < 2:
        raise ValueError("NU needs at least 2 candidate cutoffs")
    return 0.5 * np.arange(1, n_cutoffs + 1) / n_cutoffs


def _offset_radius(box_size: int, xp):
    """(N, N, N) float32 distance of each voxel from the origin, periodic (signed offsets)."""
    c = xp.fft.fftfreq(box_size, d=1.0 / box_size).astype(xp.float32)  # signed voxel offsets
    return xp.sqrt(c[:, None, None] ** 2 + c[None, :, None] ** 2 + c[None, None, :] ** 2)


def _ball_kernel_ft(offset_radius, radius_px: float):
    """rfft (unshifted) of a normalised ball of ``radius_px`` centred at the origin (periodic);
    ``offset_radius`` from :func:`_offset_radius` (made once for all the balls of a filter)."""
    xp = get_array_module(offset_radius)
    ball = (offset_radius <= max(radius_px, 0.5)).astype(xp.float32)
    return xp.fft.rfftn(ball / ball.sum())


def _gaussian_smooth(volume, sigma_px: float):
    """Periodic Gaussian smoothing (FFT) of a real (N, N, N) volume."""
    xp = get_array_module(volume)
    kernel = xp.exp(-2 * np.pi ** 2 * sigma_px ** 2 * rfft_frequency_squared(volume.shape[0], xp))
    return xp.fft.irfftn(xp.fft.rfftn(volume) * kernel, s=volume.shape, axes=(0, 1, 2)).astype(xp.float32)


def nu_filter(half_map, quarter_a, quarter_b, n_cutoffs: int = NUParams.n_cutoffs, order: int = NUParams.order,
              awf: float = NUParams.awf, smoothing_px: float = NUParams.smoothing_px,
              half_map_noise: bool = NUParams.half_map_noise):
    """Space-varying low-pass of one half-map chosen by quarter-map cross-validation.

    All maps (N, N, N) on one device. For each candidate cutoff the CV residual
    of the quarter-maps is averaged over a ball of radius ``awf`` wavelengths and
    each voxel takes the cutoff of least residual. The chosen cutoff field is
    then smoothed (Gaussian, ``smoothing_px``) and the half-map is filtered by
    blending the two candidate filters nearest to the smoothed cutoff: a hard
    per-voxel switch between filters would act like a sharp mask shaped by the
    signal and add high-frequency content correlated between the half-maps,
    inflating their FSC. Returns (filtered half-map (N, N, N) float32, cutoff per
    voxel (N, N, N) float32 in cycles/px).
    """
    xp = get_array_module(half_map)
    n = half_map.shape[0]
    shape = half_map.shape
    k = rfft_radius_cycles(n, xp)
    quarter_a = quarter_a.astype(xp.float32)
    quarter_b = quarter_b.astype(xp.float32)
    fa, fb = xp.fft.rfftn(quarter_a), xp.fft.rfftn(quarter_b)
    cutoffs = nu_candidate_cutoffs(n_cutoffs)
    offset_radius = _offset_radius(n, xp)
    best_loss = xp.full(shape, xp.inf, dtype=xp.float32)
    best_index = xp.zeros(shape, dtype=xp.float32)
    for j, cutoff in enumerate(cutoffs):
        lowpass = butterworth_lowpass(k, float(cutoff), order).astype(xp.float32)
        a_f = xp.fft.irfftn(fa * lowpass, s=shape, axes=(0, 1, 2))
        b_f = xp.fft.irfftn(fb * lowpass, s=shape, axes=(0, 1, 2))
        residual = (a_f - quarter_b) ** 2 + (b_f - quarter_a) ** 2
        if half_map_noise:
            # the CV residual carries the filtered noise of a quarter-map; the half-map has half
            # of it: remove ½·|B(n)|² per term, with n ≈ (m_a − m_b)/√2
            residual -= 0.5 * (a_f - b_f) ** 2
        local = xp.fft.irfftn(xp.fft.rfftn(residual) * _ball_kernel_ft(offset_radius, awf / float(cutoff)), s=shape, axes=(0, 1, 2))
        better = local < best_loss
        best_loss = xp.where(better, local, best_loss)
        best_index = xp.where(better, xp.float32(j), best_index)
    offset_radius = None
    index = xp.clip(_gaussian_smooth(best_index, smoothing_px) if smoothing_px > 0 else best_index, 0, n_cutoffs - 1)
    fh = xp.fft.rfftn(half_map.astype(xp.float32))
    filtered = xp.zeros(shape, dtype=xp.float32)
    lowest, highest = int(xp.floor(index.min())), int(xp.ceil(index.max()))
    for j in range(lowest, highest + 1):
        blend = xp.clip(1 - xp.abs(index - j), 0, None)
        lowpass = butterworth_lowpass(k, float(cutoffs[j]), order).astype(xp.float32)
        filtered += blend * xp.fft.irfftn(fh * lowpass, s=shape, axes=(0, 1, 2))
    chosen = xp.asarray(cutoffs[0] + index * (cutoffs[1] - cutoffs[0]), dtype=xp.float32)
    return filtered.astype(xp.float32), chosen


def cutoff_map_A(cutoffs_cycles_per_px, pixel_size_A: float):
    """Chosen cutoffs (cycles/px) → resolution in Å (pixel_size / f), numpy."""
    f = to_numpy(cutoffs_cycles_per_px)
    return (pixel_size_A / np.maximum(f, 1e-6)).astype(np.float32)

