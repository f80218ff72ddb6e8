"""Reconstruction from given poses: CTF-weighted back-projection into half-set
accumulators, symmetry, gridding correction, FSC-weighted full map.

Each image is shifted by +origin (RELION's convention), Fourier transformed and
inserted as ``CTF·X`` with weight ``CTF²`` into its half-set's padded
accumulators; with symmetry it is inserted once per operator at pose
``A·gᵀ`` (the slice of a symmetric map at Aᵀk equals the one at g·Aᵀk).
"""
from __future__ import annotations

import numpy as np
from tqdm.auto import tqdm

from .backend import get_array_module, to_device, to_numpy
from .ctf import ctf_half_plane
from .fourier import ft2_centered, phase_shift_images
from .fsc import apply_shell_filter, fsc_weighting, gold_standard_fsc
from .particles import Particles
from .projector import (DEFAULT_PADDING, accumulators_to_map, empty_accumulators, frequency_points,
                        insert_slices)
from .symmetry import symmetry_operators


def prepare_images_ft(images, origin_px, ctf_matrix, pixel_size_A: float):
    """Re-centred image FTs and CTFs for a batch.

    ``images`` (B, N, N), ``origin_px`` (B, 2), ``ctf_matrix`` (B, 9) or None →
    (FT (B, N, N//2+1) complex64 shifted by +origin, CTF (B, N, N//2+1) float32 or None).
    """
    xp = get_array_module(images)
    n = images.shape[-1]
    ft = phase_shift_images(ft2_centered(images.astype(xp.float32)).astype(xp.complex64), origin_px)
    ctf = None if ctf_matrix is None else ctf_half_plane(ctf_matrix, n, pixel_size_A)
    return ft, ctf


def insert_with_symmetry(accumulator, rotations, points, values, weights, operators, padding: int = DEFAULT_PADDING):
    """Insert a batch once per symmetry operator g at pose ``A·gᵀ`` into ``accumulator``
    (data, weight); ``rotations`` (B, 3, 3) on the accumulator's device, ``operators``
    (G, 3, 3) numpy; ``values``/``weights`` (B, M) at ``points``."""
    xp = get_array_module(rotations)
    for g in operators:
        rot_g = xp.matmul(rotations, xp.asarray(g.T.astype(np.float32)))
        insert_slices(*accumulator, rot_g, points, values, weights, padding)


def backproject(particles: Particles, xp=np, symmetry: str = "C1", batch_size: int = 256,
                padding: int = DEFAULT_PADDING, progress: bool = True):
    """Accumulate every particle into its half-set: returns {1: (data, weight), 2: (data, weight)}
    on ``xp``'s device. Particles with half-set 0 are skipped."""
    particles.require_alignment("reconstruction")
    n = particles.box_size
    ops = symmetry_operators(symmetry)
    points = frequency_points(n, xp=xp)
    acc = {h: empty_accumulators(n, padding, xp) for h in (1, 2)}
    rotations_all = particles.rotations
    ctf_all = particles.ctf.as_matrix() if particles.ctf is not None else None
    bar = tqdm(total=len(particles), desc="back-projecting", unit="particle", disable=not progress)
    for start in range(0, len(particles), batch_size):
        sel = np.arange(start, min(start + batch_size, len(particles)))
        images = to_device(particles.read_images(sel), xp)
        ctf_batch = None if ctf_all is None else to_device(ctf_all[sel], xp)
        ft, ctf = prepare_images_ft(images, to_device(particles.origin_px[sel], xp), ctf_batch,
                                    particles.pixel_size_A)
        values = points.gather(ft if ctf is None else ft * ctf)
        weights = (xp.ones(values.shape, dtype=xp.float32) if ctf is None else points.gather(ctf * ctf))
        for half in (1, 2):
            in_half = particles.half_set[sel] == half
            if not in_half.any():
                continue
            idx = to_device(np.nonzero(in_half)[0], xp)
            rot = to_device(rotations_all[sel][in_half].astype(np.float32), xp)
            insert_with_symmetry(acc[half], rot, points, values[idx], weights[idx], ops, padding)
        bar.update(len(sel))
    bar.close()
    return acc


def reconstruct_half_maps(particles: Particles, xp=np, symmetry: str = "C1", batch_size: int = 256,
                          padding: int = DEFAULT_PADDING, progress: bool = True):
    """Unfiltered half-maps (two (N, N, N) float32 arrays on ``xp``'s device)."""
    acc = backproject(particles, xp, symmetry, batch_size, padding, progress)
    return tuple(accumulators_to_map(*acc[h], particles.box_size, padding=padding) for h in (1, 2))


def combine_half_maps(half1, half2, fsc):
    """Average of the half-maps filtered by √(2FSC/(1+FSC)) per shell."""
    return apply_shell_filter((half1 + half2) / 2, fsc_weighting(fsc))


def reconstruct(particles: Particles, xp=np, symmetry: str = "C1", mask=None, batch_size: int = 256,
                progress: bool = True):
    """Half-maps, FSC-weighted full map (numpy) and the FSC report (dict)."""
    half1, half2 = reconstruct_half_maps(particles, xp, symmetry, batch_size, progress=progress)
    report = gold_standard_fsc(half1, half2, particles.pixel_size_A,
                               mask=None if mask is None else to_device(mask, xp))
    curve = report.get("fsc_corrected", report["fsc_unmasked"])
    full = combine_half_maps(half1, half2, curve)
    return to_numpy(half1), to_numpy(half2), to_numpy(full), report
