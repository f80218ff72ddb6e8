"""Per-shell noise model of the images: σ²(k) for whitening the pose-search scores.

The first iteration takes the mean power of raw image FTs per shell; later
iterations take the mean residual power |X − α·C·P|² at each particle's chosen
pose (α: the per-image least-squares scale), as RELION's noise spectra.
"""
from __future__ import annotations

from .backend import get_array_module
from .fourier import shell_index_2d
from .projector import FrequencyPoints, extract_slices, frequency_points


def shell_sums(values, points: FrequencyPoints):
    """Sums of ``values`` (B, M) over images and points per shell, and the point counts:
    ((N//2+1,), (N//2+1,)) float64."""
    xp = get_array_module(values)
    n = points.box_size
    shells = shell_index_2d(points.kx, points.ky, n // 2)
    values = values.reshape(-1, values.shape[-1])
    # images summed first: a bincount over B·M points into N/2 shells serializes on its atomics
    sums = xp.bincount(shells, weights=values.sum(axis=0, dtype=xp.float64), minlength=n // 2 + 1)
    return sums, xp.bincount(shells, minlength=n // 2 + 1).astype(xp.float64) * values.shape[0]


def shell_mean(sums, counts):
    """Per-shell mean (N//2+1,) float32 from :func:`shell_sums` (summed over any number of batches)."""
    xp = get_array_module(sums)
    return (sums / xp.maximum(counts, 1)).astype(xp.float32)


def noise_spectrum_from_images(images_ft):
    """Per-shell mean |X|² (N//2+1,) of raw image FTs (B, N, N//2+1): the first iteration's noise model."""
    xp = get_array_module(images_ft)
    points = frequency_points(images_ft.shape[-2], xp=xp)
    return shell_mean(*shell_sums(xp.abs(points.gather(images_ft)) ** 2, points))


def residual_power(volume_ft, rotations, points: FrequencyPoints, x, ctf, padding: int):
    """Per-shell sums of |X − α·C·P|² at the chosen poses (α: per-image least-squares scale),
    as :func:`shell_sums`. ``x`` (B, M) re-centred image values and ``ctf`` (B, M) at ``points``."""
    xp = get_array_module(volume_ft)
    model = ctf * extract_slices(volume_ft, rotations, points, padding, for_scores=True)  # C·P (B, M)
    cross = xp.sum(xp.real(x * xp.conj(model)), axis=1)
    power = xp.sum(model.real ** 2 + model.imag ** 2, axis=1)
    alpha = cross / xp.maximum(power, 1e-30)
    return shell_sums(xp.abs(x - alpha[:, None] * model) ** 2, points)
