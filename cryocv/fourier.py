"""Centered Fourier transforms with half-plane (rfft) storage.

Conventions (match RELION):
- real-space arrays are indexed ``[y, x]`` (images) and ``[z, y, x]`` (volumes),
  with the origin at index ``N // 2`` along every axis;
- a 2D transform has shape ``(N, N//2 + 1)``: rows are ``ky = i - N//2``
  (centered), columns ``kx = j >= 0``; a 3D transform has shape
  ``(N, N, N//2 + 1)`` with ``kz``, ``ky`` centered;
- transforms are unnormalised forward DFTs (numpy's default), so the central
  section theorem holds with no scale factor.
"""
from __future__ import annotations

import numpy as np

from .backend import get_array_module


def ft2_centered(images):
    """Half-plane centered FT of ``images`` (..., N, N) → (..., N, N//2+1) complex."""
    xp = get_array_module(images)
    shifted = xp.fft.ifftshift(images, axes=(-2, -1))
    return xp.fft.fftshift(xp.fft.rfft2(shifted), axes=-2)


def ift2_centered(ft, box_size: int):
    """Inverse of :func:`ft2_centered`: (..., N, N//2+1) → (..., N, N) real."""
    xp = get_array_module(ft)
    real = xp.fft.irfft2(xp.fft.ifftshift(ft, axes=-2), s=(box_size, box_size))
    return xp.fft.fftshift(real, axes=(-2, -1))


def ft3_centered(volume):
    """Half-space centered FT of a cubic volume (N, N, N) → (N, N, N//2+1)."""
    xp = get_array_module(volume)
    shifted = xp.fft.ifftshift(volume)
    return xp.fft.fftshift(xp.fft.rfftn(shifted), axes=(0, 1))


def ift3_centered(ft, box_size: int):
    """Inverse of :func:`ft3_centered`: (N, N, N//2+1) → (N, N, N) real."""
    xp = get_array_module(ft)
    real = xp.fft.irfftn(xp.fft.ifftshift(ft, axes=(0, 1)), s=(box_size,) * 3, axes=(0, 1, 2))
    return xp.fft.fftshift(real)


def ift3_centered_crop(ft, padded_size: int, box_size: int):
    """The central ``box_size``³ of ``ift3_centered(ft, padded_size)`` (the inverse of
    :func:`pad_volume`), picked from the unshifted inverse transform: the same values without
    the full-size shifted copy."""
    xp = get_array_module(ft)
    real = xp.fft.irfftn(xp.fft.ifftshift(ft, axes=(0, 1)), s=(padded_size,) * 3, axes=(0, 1, 2))
    start = padded_size // 2 - box_size // 2
    index = (xp.arange(start, start + box_size) - padded_size // 2) % padded_size   # fftshift: j ← j − P//2
    return real[xp.ix_(index, index, index)]


def half_plane_frequencies(box_size: int, xp=np):
    """Integer frequencies of the 2D half plane: (kx, ky), each (N, N//2+1) float32."""
    ky = xp.arange(box_size, dtype=xp.float32) - box_size // 2
    kx = xp.arange(box_size // 2 + 1, dtype=xp.float32)
    ky_grid, kx_grid = xp.meshgrid(ky, kx, indexing="ij")
    return kx_grid, ky_grid


def half_volume_radius(box_size: int, xp=np):
    """|k| (in voxels) on the 3D half-space grid of a centered rfft volume."""
    k = xp.arange(box_size, dtype=xp.float32) - box_size // 2
    kx = xp.arange(box_size // 2 + 1, dtype=xp.float32)
    return xp.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + kx[None, None, :] ** 2)


def shell_index_3d(box_size: int, xp=np):
    """Integer shell (rounded |k|) of each voxel of the 3D half-space grid."""
    return shell_index(half_volume_radius(box_size, xp))


def shell_index(radius, max_shell: int | None = None):
    """The one shell rule: integer shell ``rint(|k|)`` of frequencies of radius ``radius``
    (any shape, in pixels of the transform), int32, capped at ``max_shell`` when given."""
    xp = get_array_module(radius)
    shells = xp.rint(radius).astype(xp.int32)
    return shells if max_shell is None else xp.minimum(shells, max_shell)


def shell_index_2d(kx, ky, max_shell: int | None = None):
    """Integer shell of 2D frequencies ``kx``, ``ky`` (same shape), see :func:`shell_index`."""
    xp = get_array_module(kx)
    return shell_index(xp.sqrt(kx ** 2 + ky ** 2), max_shell)


def rfft_frequency_squared(box_size: int, xp=np):
    """|f|² in (cycles/px)² on the *unshifted* rfftn grid of a cubic volume (N, N, N//2+1) float32."""
    f = xp.fft.fftfreq(box_size).astype(xp.float32)
    fx = xp.fft.rfftfreq(box_size).astype(xp.float32)
    return f[:, None, None] ** 2 + f[None, :, None] ** 2 + fx[None, None, :] ** 2


def rfft_radius_cycles(box_size: int, xp=np):
    """|f| in cycles/px on the *unshifted* rfftn grid of a cubic volume (N, N, N//2+1) float32."""
    return xp.sqrt(rfft_frequency_squared(box_size, xp))


def phase_factors(kx, ky, shifts_px, box_size: int):
    """exp(−2πi(k·t)/N): factors that translate content by ``shifts_px`` (..., 2) = (sx, sy) px.

    ``kx``, ``ky`` broadcast against ``shifts_px[..., 0:1]`` (e.g. (M,) points or (N, N//2+1)
    grids with shifts reshaped to (..., 1, 1)); complex64."""
    xp = get_array_module(shifts_px, kx)
    phase = (-2.0 * np.pi / box_size) * (shifts_px[..., 0] * kx + shifts_px[..., 1] * ky)
    return (xp.cos(phase) + 1j * xp.sin(phase)).astype(xp.complex64)


def phase_shift_images(ft, shifts_px):
    """Translate images by ``shifts_px`` (..., 2) = (sx, sy) pixels in Fourier space.

    ``ft`` is (..., N, N//2+1) from :func:`ft2_centered`; the result is the FT of
    ``image(x - sx, y - sy)``, i.e. content moves by +shift.
    """
    xp = get_array_module(ft)
    box_size = ft.shape[-2]
    kx, ky = half_plane_frequencies(box_size, xp)
    shifts_px = xp.asarray(shifts_px, dtype=xp.float32)[..., None, None, :]
    return ft * phase_factors(kx, ky, shifts_px, box_size).astype(ft.dtype)


def pad_volume(volume, padded_size: int):
    """Zero-pad a cubic volume to ``padded_size`` keeping the center at N//2."""
    xp = get_array_module(volume)
    n = volume.shape[0]
    out = xp.zeros((padded_size,) * 3, dtype=volume.dtype)
    start = padded_size // 2 - n // 2
    out[start:start + n, start:start + n, start:start + n] = volume
    return out


def trilinear_gridding_profile(box_size: int, padded_size: int, xp=np):
    """Real-space apodization of trilinear interpolation on a padded Fourier grid.

    Separable sinc²(x / padded_size) over the ``box_size``³ grid (centered),
    shape (N, N, N); divide by it to correct for the interpolation kernel.
    """
    r = (xp.arange(box_size, dtype=xp.float64) - box_size // 2) / padded_size
    s = xp.sinc(r) ** 2
    return (s[:, None, None] * s[None, :, None] * s[None, None, :]).astype(xp.float32)


def radial_average(values, shells, n_shells: int):
    """Mean of ``values`` per integer shell (0..n_shells-1); empty shells give 0."""
    xp = get_array_module(values)
    flat_shell = shells.ravel()
    keep = flat_shell < n_shells
    sums = xp.bincount(flat_shell[keep], weights=values.ravel()[keep], minlength=n_shells)
    counts = xp.bincount(flat_shell[keep], minlength=n_shells)
    return sums[:n_shells] / xp.maximum(counts[:n_shells], 1)


def lowpass_map(volume, pixel_size_A: float, resolution_A: float, edge_shells: float = 2.0):
    """Low-pass a map to ``resolution_A`` with a raised-cosine edge of ``edge_shells`` shells."""
    xp = get_array_module(volume)
    n = volume.shape[0]
    cutoff = n * pixel_size_A / resolution_A
    radius = half_volume_radius(n, xp)
    t = xp.clip((radius - cutoff) / edge_shells + 0.5, 0, 1)
    profile = 0.5 * (1 + xp.cos(np.pi * t))
    return ift3_centered(ft3_centered(volume.astype(xp.float32)) * profile, n).astype(xp.float32)
