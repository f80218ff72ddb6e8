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

Three refinements of the paper's recipe, all measured on simulated data against
the true map (see ``bench/``): (0) the window's radius is capped at
``max_window_fraction`` (1/8) of the box: a window larger than a small particle
averages the loss over solvent, where leaving out the particle's signal costs
nothing, and picks coarse cutoffs inside the particle (bench/results/small_membrane.md);
(1) the quarter-maps carry twice the noise of the
half-map the filter is applied to, so plain CV picks cutoffs that are too low
for it; with ``half_map_noise`` the windowed loss subtracts half of the filtered
noise, estimated from the quarter-map difference (an unbiased risk estimate
for the half-map); (2) the per-voxel cutoff field is smoothed and neighbouring
filters are blended, because a hard per-voxel switch acts like a sharp,
signal-shaped mask and adds high-frequency content correlated between halves.
"""
from __future__ import annotations

import functools
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
    max_window_fraction: float | None = 0.125  # window radius never above this fraction of the box (0/None: no cap)


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
    radius_px = max(radius_px, 0.5)
    if xp is np:
        ball = (offset_radius <= radius_px).astype(xp.float32)
        return xp.fft.rfftn(ball / ball.sum())
    inside = int(xp.count_nonzero(offset_radius <= radius_px))
    return xp.fft.rfftn(_gpu_kernels()["ball"](offset_radius, xp.float32(radius_px), xp.float32(1.0 / inside)))


# The cross-validation loop is memory-bound on a GPU (box 512: ~30 passes over 0.5 GB per cutoff
# and half-set besides the FFTs); there each step below is one fused kernel. The numpy twins are
# the original array expressions, so CPU results are unchanged.

def _lowpassed(k, cutoff: float, order: int, *spectra):
    """Each of ``spectra`` (rfft grids) times the Butterworth low-pass at ``cutoff`` (cycles/px)."""
    xp = get_array_module(k)
    if xp is np:
        lowpass = butterworth_lowpass(k, cutoff, order).astype(xp.float32)
        return [spectrum * lowpass for spectrum in spectra]
    kernel = _gpu_kernels()["lowpass"]
    return [kernel(spectrum, k, xp.float32(1.0 / cutoff), xp.int32(2 * order)) for spectrum in spectra]


def _irfftn(spectrum, shape):
    """Inverse real FFT of a temporary ``spectrum`` (on a GPU it may be overwritten: no copy)."""
    xp = get_array_module(spectrum)
    if xp is np:
        return xp.fft.irfftn(spectrum, s=shape, axes=(0, 1, 2))
    import cupyx.scipy.fft as cufft
    return cufft.irfftn(spectrum, s=shape, axes=(0, 1, 2), overwrite_x=True)


def _cv_residual(a_f, b_f, quarter_a, quarter_b, half_map_noise: bool):
    """(B m_a − m_b)² + (B m_b − m_a)², less ½(B m_a − B m_b)² with ``half_map_noise``: the CV
    residual carries the filtered noise of a quarter-map and the half-map has half of it
    (n ≈ (m_a − m_b)/√2)."""
    xp = get_array_module(a_f)
    if xp is np:
        residual = (a_f - quarter_b) ** 2 + (b_f - quarter_a) ** 2
        if half_map_noise:
            residual -= 0.5 * (a_f - b_f) ** 2
        return residual
    return _gpu_kernels()["residual"](a_f, b_f, quarter_a, quarter_b, xp.float32(0.5 if half_map_noise else 0.0))


def _keep_better(local, j: int, best_loss, best_index):
    """(best_loss, best_index) where ``local`` < ``best_loss`` takes it and candidate ``j`` (on a
    GPU updated in place)."""
    xp = get_array_module(local)
    if xp is np:
        better = local < best_loss
        return xp.where(better, local, best_loss), xp.where(better, xp.float32(j), best_index)
    _gpu_kernels()["keep_better"](local, xp.float32(j), best_loss, best_index)
    return best_loss, best_index


def _add_blended(filtered, candidate, index, j: int):
    """``filtered`` += max(0, 1 − |index − j|) · ``candidate`` (in place)."""
    xp = get_array_module(filtered)
    if xp is np:
        filtered += xp.clip(1 - xp.abs(index - j), 0, None) * candidate
        return
    _gpu_kernels()["add_blended"](candidate, index, xp.float32(j), filtered)


@functools.cache
def _gpu_kernels() -> dict:
    import cupy as cp
    return {
        "ball": cp.ElementwiseKernel("float32 r, float32 radius, float32 weight", "float32 out",
                                     "out = r <= radius ? weight : 0.f", "cryocv_nu_ball"),
        "lowpass": cp.ElementwiseKernel(
            "complex64 f, float32 k, float32 inv_cutoff, int32 two_order", "complex64 out",
            "out = f * (1.f / sqrtf(1.f + powf(k * inv_cutoff, (float)two_order)))", "cryocv_nu_lowpass"),
        "residual": cp.ElementwiseKernel(
            "float32 af, float32 bf, float32 qa, float32 qb, float32 noise", "float32 out",
            "float u = af - qb, v = bf - qa, d = af - bf; out = u * u + v * v - noise * d * d",
            "cryocv_nu_residual"),
        "keep_better": cp.ElementwiseKernel(
            "float32 local, float32 j", "float32 best, float32 index",
            "if (local < best) { best = local; index = j; }", "cryocv_nu_keep_better"),
        "add_blended": cp.ElementwiseKernel(
            "float32 x, float32 index, float32 j", "float32 filtered",
            "filtered += fmaxf(1.f - fabsf(index - j), 0.f) * x", "cryocv_nu_add_blended"),
    }


def _gaussian_smooth(volume, sigma_px: float):
    """Periodic Gaussian smoothing (FFT) of a real (N, N, N) volume."""
    xp = get_array_module(volume)
    kernel = xp.exp(-2 * np.pi ** 2 * sigma_px ** 2 * rfft_frequency_squared(volume.shape[0], xp))
    return xp.fft.irfftn(xp.fft.rfftn(volume) * kernel, s=volume.shape, axes=(0, 1, 2)).astype(xp.float32)


def nu_filter(half_map, quarter_a, quarter_b, n_cutoffs: int = NUParams.n_cutoffs, order: int = NUParams.order,
              awf: float = NUParams.awf, smoothing_px: float = NUParams.smoothing_px,
              half_map_noise: bool = NUParams.half_map_noise,
              max_window_fraction: float | None = NUParams.max_window_fraction):
    """Space-varying low-pass of one half-map chosen by quarter-map cross-validation.

    All maps (N, N, N) on one device. For each candidate cutoff the CV residual
    of the quarter-maps is averaged over a ball of radius ``awf`` wavelengths (at most
    ``max_window_fraction`` of the box; None or 0: no cap) and
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
        a_f, b_f = (_irfftn(x, shape) for x in _lowpassed(k, float(cutoff), order, fa, fb))
        residual = _cv_residual(a_f, b_f, quarter_a, quarter_b, half_map_noise)
        a_f = b_f = None
        windowed = xp.fft.rfftn(residual)
        residual = None
        radius = awf / float(cutoff)
        if max_window_fraction:
            radius = min(radius, max_window_fraction * n)
        windowed *= _ball_kernel_ft(offset_radius, radius)
        best_loss, best_index = _keep_better(_irfftn(windowed, shape), j, best_loss, best_index)
        windowed = None
    offset_radius = fa = fb = None
    index = xp.clip(_gaussian_smooth(best_index, smoothing_px) if smoothing_px > 0 else best_index, 0, n_cutoffs - 1)
    fh = xp.fft.rfftn(half_map.astype(xp.float32))
    filtered = xp.zeros(shape, dtype=xp.float32)
    lowest, highest = int(xp.floor(index.min())), int(xp.ceil(index.max()))
    for j in range(lowest, highest + 1):
        _add_blended(filtered, _irfftn(_lowpassed(k, float(cutoffs[j]), order, fh)[0], shape), index, j)
    chosen = xp.asarray(cutoffs[0] + index * (cutoffs[1] - cutoffs[0]), dtype=xp.float32)
    return filtered.astype(xp.float32), chosen


def cutoff_map_A(cutoffs_cycles_per_px, pixel_size_A: float):
    """Chosen cutoffs (cycles/px) → resolution in Å (pixel_size / f), numpy."""
    f = to_numpy(cutoffs_cycles_per_px)
    return (pixel_size_A / np.maximum(f, 1e-6)).astype(np.float32)

