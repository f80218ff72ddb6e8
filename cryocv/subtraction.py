"""Particle signal subtraction on device batches (each particle with its own half-set's map).

The signal model of particle ``i`` (pose ``A_i``, origin ``o_i`` px, CTF ``C_i``) from a map ``V``
is ``M_i = C_i · shift(P_{A_i}(V), −o_i)``: the central slice at ``A_i`` moved so that the
map's centre sits at box centre − origin, exactly as :func:`cryocv.simulate.clean_projections`
makes particles and as RELION's ``relion_particle_subtract`` builds what it subtracts. With a
*keep* mask ``K`` (RELION's ``--mask`` semantics: 1 = keep, 0 = subtract), the subtracted image is

    ``X_i − s_i · C_i · shift(P_{A_i}(V·(1 − K)), −o_i)``

where ``V`` is the half-map of the particle's own half-set and ``s_i`` a per-particle amplitude
scale (:func:`fit_scales`: least squares of the *whole* map's model ``M_i`` against ``X_i``, so
that the region kept does not bias it; 1 without a fit, as RELION does). All arrays are
half-plane FTs (B, N, N//2+1) of :func:`cryocv.fourier.ft2_centered`; functions take the array
module from their inputs and loop over no particles (numpy or CuPy alike).

Re-centring (RELION's ``--recenter_on_mask``): the keep mask's centre of mass ``c`` (x, y, z px
from the box centre) projects to ``(A_i c)_xy − o_i`` from the image centre. The subtracted image
is translated (circularly, like RELION's ``WRAP``) by the whole-pixel part of ``o_i − (A_i c)_xy``
and the fractional rest becomes its new origin: a reconstruction of the output then holds the
map translated by −c, the kept region centred in the box (:func:`recentring_shifts`).
"""
from __future__ import annotations

import numpy as np

from .backend import get_array_module, to_device, to_numpy
from .fourier import half_plane_frequencies, ift2_centered, phase_shift_images, shell_index_2d
from .fsc import fsc_curve
from .projector import DEFAULT_PADDING, prepare_volume, project
from .source import ParticleSource, for_each_batch

SCALE_RANGE = (0.2, 5.0)        # fitted scales are clamped to this range
MASK_TOLERANCE = 1e-3           # keep-mask values may stray this far outside [0, 1] (then clipped)


def subtraction_volumes(half_map, keep_mask, padding: int = DEFAULT_PADDING):
    """Padded FTs (:func:`cryocv.projector.prepare_volume`) of one half-map ``(N, N, N)`` and of
    its part to subtract, ``half_map · (1 − keep_mask)``: → (full_ft, subtract_ft), each
    (pad·N, pad·N, pad·N//2+1) complex64 on the half-map's device."""
    return prepare_volume(half_map, padding), prepare_volume(half_map * (1 - keep_mask), padding)


def signal_model(volume_ft, rotations, origin_px, ctf, box_size: int, padding: int = DEFAULT_PADDING):
    """``C · shift(P_A(V), −origin)`` (B, N, N//2+1) complex64: the map's signal as it sits in
    the raw (not re-centred) images; ``rotations`` (B, 3, 3), ``origin_px`` (B, 2) (x, y),
    ``ctf`` (B, N, N//2+1) or None (no CTF)."""
    model = project(volume_ft, rotations, box_size, shifts_px=-origin_px, padding=padding)
    return model if ctf is None else model * ctf


def _fit_weights(box_size: int, r_max_px: float | None, noise_var_shell, xp):
    """Per half-plane point (N, N//2+1) weight of the scale fit: 0 at DC and beyond ``r_max_px``,
    the point's multiplicity in the full plane (2 where its Friedel mate is not stored), divided by
    the noise variance of its shell when ``noise_var_shell`` (N//2+1,) is given."""
    kx, ky = half_plane_frequencies(box_size, xp)
    radius2 = kx ** 2 + ky ** 2
    r_max = box_size / 2 if r_max_px is None else float(r_max_px)
    weights = xp.where((radius2 >= 1) & (radius2 <= r_max ** 2), 1.0, 0.0).astype(xp.float32)
    weights = weights * xp.where((kx > 0) & (2 * kx < box_size), 2.0, 1.0).astype(xp.float32)
    if noise_var_shell is not None:
        noise = xp.asarray(noise_var_shell, dtype=xp.float32)
        shells = shell_index_2d(kx, ky, max_shell=noise.size - 1)
        weights = weights / xp.maximum(noise[shells], xp.float32(1e-30))
    return weights


def fit_scales(images_ft, model_ft, r_max_px: float | None = None, noise_var_shell=None,
               scale_range=SCALE_RANGE):
    """Per-particle least-squares amplitude scale of ``model_ft`` against ``images_ft`` (both
    (B, N, N//2+1)): ``s = Σ w·Re(M̄·X) / Σ w·|M|²`` over the frequencies ``1 <= |k| <= r_max_px``
    (default Nyquist; pixels of the transform), ``w`` = full-plane multiplicity / noise variance
    of the shell (``noise_var_shell`` (N//2+1,); None: white noise). A particle whose model has no
    power there gets 1; the rest are clamped to ``scale_range``. → (B,) float32."""
    xp = get_array_module(images_ft, model_ft)
    weights = _fit_weights(images_ft.shape[-2], r_max_px, noise_var_shell, xp)
    cross = (weights * (xp.conj(model_ft) * images_ft).real).sum(axis=(-2, -1))
    power = (weights * (model_ft.real ** 2 + model_ft.imag ** 2)).sum(axis=(-2, -1))
    floor = 1e-12 * float(power.max()) if power.size else 0.0
    scales = xp.where(power > floor, cross / xp.maximum(power, 1e-30), 1.0)
    return xp.clip(scales, *scale_range).astype(xp.float32)


def subtract_images(images_ft, subtract_model_ft, scales=None):
    """``X − s·M``: the images' FTs (B, N, N//2+1) less their scaled model of the region to remove
    (:func:`signal_model` of the masked-out map); ``scales`` (B,) or None (1)."""
    if scales is None:
        return images_ft - subtract_model_ft
    return images_ft - scales[:, None, None].astype(images_ft.real.dtype) * subtract_model_ft


def subtract_batch(images_ft, ctf, rotations, origin_px, full_ft, subtract_ft, fit_scale: bool = True,
                   r_max_px: float | None = None, noise_var_shell=None, padding: int = DEFAULT_PADDING):
    """Subtract a batch of one half-set (e.g. the fields of a :class:`cryocv.source.Batch`) with
    that half-set's :func:`subtraction_volumes` ``full_ft`` / ``subtract_ft``. The scale is fit
    against the whole map's model (:func:`fit_scales`) unless ``fit_scale`` is False (then 1).
    → (subtracted raw image FTs (B, N, N//2+1) complex64, scales (B,) float32)."""
    xp = get_array_module(images_ft)
    box_size = images_ft.shape[-2]
    if fit_scale:
        full_model = signal_model(full_ft, rotations, origin_px, ctf, box_size, padding)
        scales = fit_scales(images_ft, full_model, r_max_px, noise_var_shell)
        del full_model
    else:
        scales = xp.ones(images_ft.shape[0], dtype=xp.float32)
    removed = signal_model(subtract_ft, rotations, origin_px, ctf, box_size, padding)
    return subtract_images(images_ft, removed, scales).astype(xp.complex64, copy=False), scales


def center_of_mass(mask) -> np.ndarray:
    """Centre of mass (x, y, z) in px from the box centre (index N//2) of a map (N, N, N) [z, y, x]
    as RELION's ``centerOfMass`` (the values as weights); numpy (3,) float64. Raises ValueError
    for a map without mass."""
    xp = get_array_module(mask)
    n = mask.shape[0]
    total = float(mask.sum(dtype=xp.float64))
    if not total > 0:
        raise ValueError("the mask has no mass (all zero)")
    coordinate = xp.arange(n, dtype=xp.float64) - n // 2
    z = float((mask.sum(axis=(1, 2), dtype=xp.float64) * coordinate).sum()) / total
    y = float((mask.sum(axis=(0, 2), dtype=xp.float64) * coordinate).sum()) / total
    x = float((mask.sum(axis=(0, 1), dtype=xp.float64) * coordinate).sum()) / total
    return np.array([x, y, z])


def _round_half_away(values):
    """RELION's ROUND: halves away from zero."""
    xp = get_array_module(values)
    return xp.sign(values) * xp.floor(xp.abs(values) + 0.5)


def recentring_shifts(rotations, origin_px, center_xyz_px):
    """RELION's re-centring on a 3D point ``center_xyz_px`` (3,) (x, y, z px from the box centre):
    with ``r = origin − (A·c)_xy`` per particle, the image is translated by ``t = round(r)`` whole
    pixels and its new origin is ``r − t`` (|·| <= 0.5 px). ``rotations`` (B, 3, 3), ``origin_px``
    (B, 2) → (t (B, 2), new origin (B, 2)), float32 on their device."""
    xp = get_array_module(rotations, origin_px)
    center = xp.asarray(np.asarray(to_numpy(center_xyz_px), dtype=np.float32))
    projected = (rotations[:, :2, :].astype(xp.float32) * center).sum(axis=-1)        # (A·c)_xy
    residual = origin_px.astype(xp.float32) - projected
    shifts = _round_half_away(residual)
    return shifts.astype(xp.float32), (residual - shifts).astype(xp.float32)


def crop_images(images, new_box: int):
    """Central ``new_box``² window of images (..., N, N) (the box centre, index N//2, goes to
    index new_box//2, as RELION's ``window``)."""
    n = images.shape[-1]
    start = n // 2 - new_box // 2
    return images[..., start:start + new_box, start:start + new_box]


def output_images(subtracted_ft, shifts_px=None, new_box: int | None = None):
    """Real-space images (B, n, n) float32 of subtracted FTs (B, N, N//2+1): translated by whole
    pixels ``shifts_px`` (B, 2) (a Fourier phase ramp: exactly a circular shift) when given, then
    cropped to ``new_box`` when given."""
    xp = get_array_module(subtracted_ft)
    box_size = subtracted_ft.shape[-2]
    if shifts_px is not None:
        subtracted_ft = phase_shift_images(subtracted_ft, shifts_px)
    images = ift2_centered(subtracted_ft, box_size)
    if new_box is not None and new_box != box_size:
        images = crop_images(images, new_box)
    return xp.ascontiguousarray(images, dtype=xp.float32)


def scale_fit_radius_px(half_map_1, half_map_2, threshold: float = 0.143, min_px: float = 4.0) -> float:
    """Default frequency limit (px of the transform) of the scale fit: the last shell before the
    half-maps' FSC first falls below ``threshold`` (beyond it the maps hold mostly noise, which
    would inflate ``Σ|M|²`` and bias scales low), at least ``min_px``; Nyquist when the FSC never
    falls below it or a half-map has no power (nothing to judge by)."""
    xp = get_array_module(half_map_1)
    box_size = half_map_1.shape[0]
    if not (float(xp.abs(half_map_1).max()) > 0 and float(xp.abs(half_map_2).max()) > 0):
        return box_size / 2
    curve = fsc_curve(half_map_1, half_map_2)
    below = np.nonzero(curve[1:] < threshold)[0]
    return float(min(max(below[0], min_px), box_size / 2)) if below.size else box_size / 2


def subtract_source(source: ParticleSource, half_maps, keep_mask, write, batch_size: int, fit_scale: bool = True,
                    r_max_px: float | None = None, center_xyz_px=None, new_box: int | None = None,
                    padding: int = DEFAULT_PADDING, progress: bool = True, log=print):
    """Subtract every particle of ``source`` (each half-set with its own map of ``half_maps``
    (two (N, N, N) numpy), never mixed) and hand the output images, numpy (k, n, n) float32, to
    ``write(positions, images)`` batch by batch. ``center_xyz_px``: re-centre on that point
    (:func:`recentring_shifts`); ``new_box``: crop after it. The next batch's images are read
    while the device works on this one; a batch that runs out of device memory is retried at half
    the size. → (scales (n,) float32, origins (n, 2) px float32: the new ones when re-centred,
    else the input's), numpy, rows of particles outside the source's shard as in the input."""
    xp, particles = source.xp, source.particles
    if np.any(particles.half_set == 0):
        raise ValueError("every particle needs a half-set (1 or 2) for subtraction")
    scales = np.ones(len(particles), dtype=np.float32)
    origins = particles.origin_px.astype(np.float32)
    mask = to_device(np.asarray(keep_mask, dtype=np.float32), xp)
    volumes = {}                       # {half: (full_ft, subtract_ft)}, one half-set's at a time

    def work(batch):
        if batch.half not in volumes:
            volumes.clear()
            volumes[batch.half] = subtraction_volumes(to_device(np.asarray(half_maps[batch.half - 1], np.float32),
                                                                xp), mask, padding)
        subtracted, batch_scales = subtract_batch(batch.images_ft, batch.ctf, batch.rotations, batch.origin_px,
                                                  *volumes[batch.half], fit_scale, r_max_px, padding=padding)
        shifts = new_origin = None
        if center_xyz_px is not None:
            shifts, new_origin = recentring_shifts(batch.rotations, batch.origin_px, center_xyz_px)
        return to_numpy(output_images(subtracted, shifts, new_box)), batch_scales, new_origin

    def done(batch, result):
        images, batch_scales, new_origin = result
        write(batch.index, images)
        scales[batch.index] = to_numpy(batch_scales)
        if new_origin is not None:
            origins[batch.index] = to_numpy(new_origin)

    for_each_batch(source, batch_size, work, done, progress, "subtracting", log)
    volumes.clear()
    return scales, origins
