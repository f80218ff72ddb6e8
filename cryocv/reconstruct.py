"""Reconstruction from given poses: CTF-weighted back-projection into half-set
accumulators, symmetry, gridding correction, FSC-weighted full map.

One E+M pass (:func:`cryocv.em_pass.em_pass`) whose E-step keeps the metadata poses:
each image is shifted by +origin (RELION's convention), Fourier transformed and
inserted as ``CTF·X`` with weight ``CTF²`` into its half-set's padded accumulators
(:mod:`cryocv.accumulate`, once per symmetry operator).
"""
from __future__ import annotations

import numpy as np

from .accumulate import Accumulators, keep_one_half_on_device
from .backend import free_gpu_memory_bytes, to_device, to_numpy
from .em_pass import em_pass, given_poses
from .fsc import combine_half_maps, gold_standard_fsc
from .particles import Particles
from .projector import DEFAULT_PADDING
from .source import ParticleSource
from .symmetry import symmetry_operators

DEFAULT_BATCH_SIZE = 256


def backproject(particles: Particles, xp=np, symmetry: str = "C1", batch_size: int = DEFAULT_BATCH_SIZE,
                padding: int = DEFAULT_PADDING, progress: bool = True, shard: tuple = (0, 1)) -> Accumulators:
    """Accumulate every particle (of this ``shard``) into its half-set on ``xp``'s device.
    Particles with half-set 0 are skipped."""
    particles.require_alignment("reconstruction")
    one_half = keep_one_half_on_device(particles.box_size, False, free_gpu_memory_bytes() if xp is not np else 0,
                                       padding)
    acc = Accumulators(particles.box_size, symmetry_operators(symmetry), xp, padding=padding,
                       one_half_on_device=one_half)
    em_pass(ParticleSource(particles, xp, shard=shard), given_poses, acc, batch_size, padding=padding,
            progress=progress, desc="back-projecting")
    return acc


def reconstruct_half_maps(particles: Particles, xp=np, symmetry: str = "C1", batch_size: int = DEFAULT_BATCH_SIZE,
                          padding: int = DEFAULT_PADDING, progress: bool = True):
    """Unfiltered half-maps (two (N, N, N) float32 arrays on ``xp``'s device)."""
    return tuple(backproject(particles, xp, symmetry, batch_size, padding, progress).half_maps())


def reconstruct(particles: Particles, xp=np, symmetry: str = "C1", mask=None, batch_size: int = DEFAULT_BATCH_SIZE,
                progress: bool = True):
    """Half-maps, FSC-weighted full map (numpy) and the FSC report (dict)."""
    half1, half2 = reconstruct_half_maps(particles, xp, symmetry, batch_size, progress=progress)
    report = gold_standard_fsc(half1, half2, particles.pixel_size_A,
                               mask=None if mask is None else to_device(mask, xp))
    curve = report.get("fsc_corrected", report["fsc_unmasked"])
    full = combine_half_maps(half1, half2, curve)
    return to_numpy(half1), to_numpy(half2), to_numpy(full), report
