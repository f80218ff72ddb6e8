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
from .ctf import CTFParams
from .fourier import ift2_centered
from .geometry import matrix_to_euler, random_rotations
from .io.mrc import write_stack
from .io.particle_files import save_particles
from .particles import Particles, random_half_sets
from .projector import prepare_volume, project
from .source import ParticleSource


DEFAULT_SNR = 0.1
DEFAULT_SHIFT_SIGMA_A = 3.0
DEFAULT_DEFOCUS_RANGE_A = (8000.0, 25000.0)


def random_ctf(n: int, rng, defocus_range_A=DEFAULT_DEFOCUS_RANGE_A, astigmatism_A=400.0, voltage_kV=300.0,
               cs_mm=2.7, amplitude_contrast=0.1) -> CTFParams:
    """Random CTFs: uniform mean defocus, ±astigmatism/2, uniform angle."""
    mean = rng.uniform(*defocus_range_A, size=n)
    astig = rng.uniform(0, astigmatism_A, size=n)
    full = lambda v: np.full(n, float(v))  # noqa: E731
    return CTFParams(defocus_u_A=mean + astig / 2, defocus_v_A=mean - astig / 2,
                     defocus_angle_deg=rng.uniform(-180, 180, size=n), voltage_kV=full(voltage_kV),
                     cs_mm=full(cs_mm), amplitude_contrast=full(amplitude_contrast), phase_shift_deg=full(0),
                     bfactor_A2=full(0), scale=full(1))


def clean_projections(volume_ft, rotations, origin_px, ctf, box_size: int):
    """Noise-free particle images (B, N, N) on the volume's device: projections at ``rotations``
    (B, 3, 3) moved by −``origin_px`` (B, 2), times ``ctf`` (B, N, N//2+1) unless None."""
    slices = project(volume_ft, rotations, box_size, shifts_px=-origin_px)
    if ctf is not None:
        slices = slices * ctf
    return ift2_centered(slices, box_size)


def simulate(volume, pixel_size_A: float, n: int, out_dir: str, snr: float = DEFAULT_SNR, seed: int = 0,
             xp=np, with_ctf: bool = True, shift_sigma_A: float = DEFAULT_SHIFT_SIGMA_A,
             defocus_range_A=DEFAULT_DEFOCUS_RANGE_A,
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
    origin_A = rng.normal(0, shift_sigma_A, size=(n, 2)) if shift_sigma_A > 0 else np.zeros((n, 2))
    ctf = random_ctf(n, rng, defocus_range_A) if with_ctf else None
    os.makedirs(out_dir, exist_ok=True)
    stack = os.path.abspath(os.path.join(out_dir, f"{name}.mrcs"))
    particles = Particles(
        stack_paths=np.array([stack] * n, dtype=object), stack_indices=np.arange(n),
        box_size=box, pixel_size_A=float(pixel_size_A), euler_deg=euler, origin_A=origin_A, ctf=ctf,
        half_set=random_half_sets(n, seed), optics_group=np.ones(n, dtype=int), source=stack)
    source = ParticleSource(particles, xp)
    volume_ft = prepare_volume(to_device(np.asarray(volume, dtype=np.float32), xp))
    images = np.empty((n, box, box), dtype=np.float32)
    bar = tqdm(total=n, desc="simulating", unit="particle", disable=not progress)
    for start in range(0, n, batch_size):
        batch = source.load(np.arange(start, min(start + batch_size, n)), images=False)
        images[batch.index] = to_numpy(clean_projections(volume_ft, batch.rotations, batch.origin_px, batch.ctf, box))
        bar.update(len(batch))
    bar.close()
    if np.isfinite(snr):
        signal_var = float(images.var(axis=(1, 2)).mean())
        images += rng.normal(0, np.sqrt(signal_var / snr), size=images.shape).astype(np.float32)
    write_stack(stack, images, pixel_size_A)
    star = os.path.join(out_dir, f"{name}.star")
    save_particles(particles, star)
    particles.source = star
    return particles
