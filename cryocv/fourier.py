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


def _even_checkerboard(box_size: int, padded_size: int, xp):
    """(−1)^(z' + y') with z', y' the padded grid's unshifted indices of a centred box:
    the real-space factor that stands for an fftshift of the two centred Fourier axes
    (``padded_size`` even). Shape (N, N, 1) float32."""
    parity = (xp.arange(box_size) - box_size // 2) % 2
    sign = (1 - 2 * ((parity[:, None] + parity[None, :]) % 2)).astype(xp.float32)
    return sign[:, :, None]


def _irfftn_destroying(ft, shape):
    """irfftn over all axes; on the GPU the input is used as scratch (no copy: large grids)."""
    xp = get_array_module(ft)
    if xp is np:
        return np.fft.irfftn(ft, s=shape, axes=(0, 1, 2))
    import cupyx.scipy.fft as cufft  # CuPy only; imported here so numpy-only installs work
    return cufft.irfftn(ft, s=shape, axes=(0, 1, 2), overwrite_x=True)


def ift3_centered_crop(ft, padded_size: int, box_size: int, overwrite: bool = False):
    """The central ``box_size``³ of ``ift3_centered(ft, padded_size)`` (the inverse of
    :func:`pad_volume`), without any full-size shifted copy: the inverse transform of the
    unshifted grid times a checkerboard sign stands for the shift of the centred axes.
    ``overwrite``: ``ft`` may be destroyed (saves a grid-sized copy on the GPU)."""
    xp = get_array_module(ft)
    shape = (padded_size,) * 3
    real = _irfftn_destroying(ft, shape) if overwrite else xp.fft.irfftn(ft, s=shape, axes=(0, 1, 2))
    index = (xp.arange(box_size) - box_size // 2) % padded_size     # centred box at the unshifted corners
    return real[xp.ix_(index, index, index)] * _even_checkerboard(box_size, padded_size, xp)


def ft3_centered_padded(volume, padded_size: int):
    """``ft3_centered(pad_volume(volume, padded_size))`` (N, N, N) → (P, P, P//2+1) complex,
    with one padded real grid and no shifted copies: the box goes straight to the unshifted
    corners, and a checkerboard sign on it stands for the output's shift."""
    xp = get_array_module(volume)
    n = volume.shape[0]
    padded = xp.zeros((padded_size,) * 3, dtype=volume.dtype)
    index = (xp.arange(n) - n // 2) % padded_size
    padded[xp.ix_(index, index, index)] = volume * _even_checkerboard(n, padded_size, xp).astype(volume.dtype)
    return xp.fft.rfftn(padded, axes=(0, 1, 2))


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


def _halfspace_shell_slabs(padded_size: int, rows: int, xp):
    """(start, shells (rows, P, P//2+1) int32) slabs of the centred half-space grid's shells."""
    k = xp.arange(padded_size, dtype=xp.float32) - padded_size // 2
    kx = xp.arange(padded_size // 2 + 1, dtype=xp.float32)
    plane = k[:, None] ** 2 + kx[None, :] ** 2                     # (ky, kx)
    for start in range(0, padded_size, rows):
        kz = k[start:start + rows]
        yield start, shell_index(xp.sqrt(kz[:, None, None] ** 2 + plane[None]))


def _slab_rows(values, slab_elements: int) -> int:
    return max(1, slab_elements // max(1, values[0].size)) if values.ndim > 1 else values.size


def radial_average(values, shells, n_shells: int, slab_elements: int = 1 << 24):
    """Mean of ``values`` per integer shell (0..n_shells-1); empty shells give 0. ``shells``
    None: ``values`` is a centred half-space grid (P, P, P//2+1) and its shells are formed here.
    Summed in slabs of the first axis: a large grid needs no grid-sized temporaries."""
    xp = get_array_module(values)
    sums = xp.zeros(n_shells, dtype=xp.float64)
    counts = xp.zeros(n_shells, dtype=xp.float64)
    rows = _slab_rows(values, slab_elements)
    slabs = (_halfspace_shell_slabs(values.shape[0], rows, xp) if shells is None
             else ((start, shells[start:start + rows]) for start in range(0, values.shape[0], rows)))
    for start, slab_shells in slabs:
        flat_shell = slab_shells.ravel()
        keep = flat_shell < n_shells
        sums += xp.bincount(flat_shell[keep], weights=values[start:start + rows].ravel()[keep],
                            minlength=n_shells)[:n_shells]
        counts += xp.bincount(flat_shell[keep], minlength=n_shells)[:n_shells]
    return sums / xp.maximum(counts, 1)


def zero_beyond_radius(ft, radius: float, slab_elements: int = 1 << 24):
    """Zero, in place, the voxels of a centred half-space grid (P, P, P//2+1) with |k| > ``radius``."""
    xp = get_array_module(ft)
    p = ft.shape[0]
    k = xp.arange(p, dtype=xp.float32) - p // 2
    kx = xp.arange(p // 2 + 1, dtype=xp.float32)
    plane = k[:, None] ** 2 + kx[None, :] ** 2
    rows = _slab_rows(ft, slab_elements)
    for start in range(0, p, rows):
        kz = k[start:start + rows]
        ft[start:start + rows][xp.sqrt(kz[:, None, None] ** 2 + plane[None]) > radius] = 0
    return ft


def per_shell_grid(table, padded_size: int, out_dtype=np.float32, slab_elements: int = 1 << 24):
    """Grid (P, P, P//2+1) of ``table[shell]`` (``table`` (S,) on the device, indexed by the
    integer shell of each voxel of the centred half-space grid, capped at S−1), built in
    slabs: the only full-size array is the output."""
    xp = get_array_module(table)
    p = padded_size
    out = xp.empty((p, p, p // 2 + 1), dtype=out_dtype)
    table = table.astype(out_dtype)
    for start, shells in _halfspace_shell_slabs(p, _slab_rows(out, slab_elements), xp):
        out[start:start + shells.shape[0]] = table[xp.minimum(shells, table.size - 1)]
    return out


def lowpass_map(volume, pixel_size_A: float, resolution_A: float, edge_shells: float = 2.0):
    """Low-pass a map to ``resolution_A`` with a raised-cosine edge of ``edge_shells`` shells."""
    xp = get_array_module(volume)
    n = volume.shape[0]
    cutoff = n * pixel_size_A / resolution_A
    radius = half_volume_radius(n, xp)
    t = xp.clip((radius - cutoff) / edge_shells + 0.5, 0, 1)
    profile = 0.5 * (1 + xp.cos(np.pi * t))
    return ift3_centered(ft3_centered(volume.astype(xp.float32)) * profile, n).astype(xp.float32)


def fourier_crop(volume, size: int):
    """(N, N, N) → (size, size, size) float32 (size ≤ N, even): the same map on a coarser grid
    (pixel size × N/size), by keeping the Fourier components inside the smaller box; values
    scaled by (size/N)³ so that densities keep their scale; the box centre (index N//2) stays at
    index size//2 (for odd N by a sub-voxel shift)."""
    xp = get_array_module(volume)
    n = volume.shape[0]
    if size == n:
        return volume.astype(xp.float32)
    if not 0 < size < n or size % 2:
        raise ValueError(f"fourier_crop: size {size} must be even and below the box ({n})")
    lo = n // 2 - size // 2
    ft = xp.fft.fftshift(xp.fft.fftn(volume.astype(xp.float32)))[lo:lo + size, lo:lo + size, lo:lo + size]
    cropped = (xp.fft.ifftn(xp.fft.ifftshift(ft)).real * (size / n) ** 3).astype(xp.float32)
    offset = size // 2 - (n // 2) * size / n      # odd N: the box centre N//2 falls between the small box's voxels
    return shift_volume(cropped, (offset,) * 3) if offset else cropped


def shift_volume(volume, shift_px):
    """``volume`` (N, N, N) with its content moved by ``shift_px`` (x, y, z px; sub-pixel, by a
    Fourier phase ramp, circular): ``out(r) = volume(r − shift)``."""
    xp = get_array_module(volume)
    n = volume.shape[0]
    k = xp.fft.fftfreq(n).astype(xp.float32)
    kx = xp.fft.rfftfreq(n).astype(xp.float32)
    sx, sy, sz = (float(v) for v in shift_px)
    ramp = xp.exp(-2j * np.pi * (k[:, None, None] * sz + k[None, :, None] * sy + kx[None, None, :] * sx))
    return xp.fft.irfftn(xp.fft.rfftn(volume) * ramp.astype(xp.complex64), s=volume.shape).astype(volume.dtype)
