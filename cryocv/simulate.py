"""Particle simulator: CTF-modulated, shifted projections of a map in white noise.

``image = IFT( CTF · shift(P_A, −origin) ) + noise`` with RELION's conventions
(the particle centre sits at box centre − origin). The SNR is the ratio of the
mean variance of the noise-free images (whole box) to the noise variance.
"""
from __future__ import annotations

import os

import numpy as np
from tqdm.auto import tqdm

from .backend import to_device, to_numpy
from .ctf import CTFParams, ctf_half_plane
from .fourier import ift2_centered
from .geometry import matrix_to_euler, random_rotations
from .io.mrc import write_stack
from .particles import Particles, random_half_sets, save_particles
from .projector import prepare_volume, project


def random_ctf(n: int, rng, defocus_range_A=(8000.0, 25000.0), astigmatism_A=400.0, voltage_kV=300.0,
               cs_mm=2.7, amplitude_contrast=0.1) -> CTFParams:
    """Random CTFs: uniform mean defocus, ±astigmatism/2, uniform angle."""
    mean = rng.uniform(*defocus_range_A, size=n)
    astig = rng.uniform(0, astigmatism_A, size=n)
    full = lambda v: np.full(n, float(v))  # noqa: E731
    return CTFParams(defocus_u_A=mean + astig / 2, defocus_v_A=mean - astig / 2,
                     defocus_angle_deg=rng.uniform(-180, 180, size=n), voltage_kV=full(voltage_kV),
                     cs_mm=full(cs_mm), amplitude_contrast=full(amplitude_contrast), phase_shift_deg=full(0),
                     bfactor_A2=full(0), scale=full(1))


def clean_projections(volume_ft, rotations, origin_px, ctf_matrix, box_size: int, pixel_size_A: float):
    """Noise-free particle images (B, N, N) on the volume's device."""
    slices = project(volume_ft, rotations, box_size, shifts_px=-origin_px)
    if ctf_matrix is not None:
        slices = slices * ctf_half_plane(ctf_matrix, box_size, pixel_size_A)
    return ift2_centered(slices, box_size)


def simulate(volume, pixel_size_A: float, n: int, out_dir: str, snr: float = 0.1, seed: int = 0,
             xp=np, with_ctf: bool = True, shift_sigma_A: float = 3.0, defocus_range_A=(8000.0, 25000.0),
             euler_deg=None, batch_size: int = 512, progress: bool = True, name: str = "particles") -> Particles:
    """Simulate ``n`` particles of ``volume`` and write ``out_dir/{name}.star`` + ``.mrcs``.

    Poses are Haar-uniform unless ``euler_deg`` (n, 3) is given; origins are
    Gaussian with ``shift_sigma_A``; half-sets are a balanced random split.
    ``snr`` = inf gives noise-free images. Returns the particles with true poses.
    """
    if n <= 0:
        raise ValueError("number of particles must be positive")
    if not snr > 0:
        raise ValueError("SNR must be positive")
    box = volume.shape[0]
    rng = np.random.default_rng(seed)
    rotations = random_rotations(n, rng) if euler_deg is None else None
    euler = matrix_to_euler(rotations) if euler_deg is None else np.asarray(euler_deg, dtype=float)
    from .geometry import euler_to_matrix
    rotations = euler_to_matrix(euler)
    origin_A = rng.normal(0, shift_sigma_A, size=(n, 2)) if shift_sigma_A > 0 else np.zeros((n, 2))
    ctf = random_ctf(n, rng, defocus_range_A) if with_ctf else None
    volume_ft = prepare_volume(to_device(np.asarray(volume, dtype=np.float32), xp))
    images = np.empty((n, box, box), dtype=np.float32)
    bar = tqdm(total=n, desc="simulating", unit="particle", disable=not progress)
    for start in range(0, n, batch_size):
        sel = slice(start, min(start + batch_size, n))
        ctf_m = None if ctf is None else to_device(ctf.as_matrix()[sel], xp)
        clean = clean_projections(volume_ft, to_device(rotations[sel].astype(np.float32), xp),
                                  to_device(origin_A[sel] / pixel_size_A, xp), ctf_m, box, pixel_size_A)
        images[sel] = to_numpy(clean)
        bar.update(sel.stop - sel.start)
    bar.close()
    if np.isfinite(snr):
        signal_var = float(images.var(axis=(1, 2)).mean())
        images += rng.normal(0, np.sqrt(signal_var / snr), size=images.shape).astype(np.float32)
    os.makedirs(out_dir, exist_ok=True)
    stack = os.path.join(out_dir, f"{name}.mrcs")
    write_stack(stack, images, pixel_size_A)
    particles = Particles(
        stack_paths=np.array([os.path.abspath(stack)] * n, dtype=object), stack_indices=np.arange(n),
        box_size=box, pixel_size_A=float(pixel_size_A), euler_deg=euler, origin_A=origin_A, ctf=ctf,
        half_set=random_half_sets(n, seed), optics_group=np.ones(n, dtype=int), source=stack)
    star = os.path.join(out_dir, f"{name}.star")
    save_particles(particles, star)
    particles.source = star
    return particles
