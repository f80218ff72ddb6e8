"""Contrast transfer function exactly as RELION 3.1 computes it (``ctf.h``).

``CTF(k) = -scale · sin(K1·Δ(k)·|k|² + K2·|k|⁴ − K5 − K3) · exp(K4·|k|²)`` with
``Δ(k) = -(ΔU+ΔV)/2 − (ΔU−ΔV)/2 · cos(2(atan2(ky, kx) − angle))`` (defocus in Å,
positive = underfocus), ``K1 = π·λ``, ``K2 = π/2·Cs·λ³`` (Cs in Å),
``K3 = atan(Q0/√(1−Q0²))``, ``K4 = −B/4``, ``K5 = phase shift`` and the electron
wavelength ``λ = 12.2643247 / √(V·(1 + 0.978466e-6·V))`` Å for V in volts.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .backend import get_array_module
from .fourier import half_plane_frequencies


def electron_wavelength_A(voltage_kV):
    """Relativistic electron wavelength in Å (RELION's formula)."""
    volts = np.asarray(voltage_kV, dtype=np.float64) * 1e3
    return 12.2643247 / np.sqrt(volts * (1.0 + volts * 0.978466e-6))


@dataclass
class CTFParams:
    """Per-particle CTF parameters, each an array of shape (n,)."""

    defocus_u_A: np.ndarray
    defocus_v_A: np.ndarray
    defocus_angle_deg: np.ndarray
    voltage_kV: np.ndarray
    cs_mm: np.ndarray
    amplitude_contrast: np.ndarray
    phase_shift_deg: np.ndarray
    bfactor_A2: np.ndarray
    scale: np.ndarray

    FIELDS = ("defocus_u_A", "defocus_v_A", "defocus_angle_deg", "voltage_kV", "cs_mm",
              "amplitude_contrast", "phase_shift_deg", "bfactor_A2", "scale")

    def __len__(self) -> int:
        return len(self.defocus_u_A)

    def take(self, index) -> "CTFParams":
        return CTFParams(*(np.asarray(getattr(self, f))[index] for f in self.FIELDS))

    def as_matrix(self) -> np.ndarray:
        """(n, 9) float64 matrix in the order of :attr:`FIELDS` (for moving to a device)."""
        return np.stack([np.asarray(getattr(self, f), dtype=np.float64) for f in self.FIELDS], axis=1)


def evaluate_ctf(params_matrix, kx_per_A, ky_per_A):
    """Evaluate CTFs. ``params_matrix`` (n, 9) as :meth:`CTFParams.as_matrix`;
    ``kx_per_A``, ``ky_per_A`` (…) spatial frequencies in 1/Å → (n, …) float32.
    """
    xp = get_array_module(params_matrix, kx_per_A)
    p = params_matrix
    extra = (None,) * kx_per_A.ndim
    u, v, angle, kv, cs, q0, phase, bfac, scale = (p[:, i][(slice(None),) + extra] for i in range(9))
    volts = kv * 1e3
    lam = 12.2643247 / xp.sqrt(volts * (1.0 + volts * 0.978466e-6))
    k1 = np.pi * lam
    k2 = np.pi / 2 * (cs * 1e7) * lam ** 3
    k3 = xp.arctan(q0 / xp.sqrt(1 - q0 ** 2))
    k4 = -bfac / 4.0
    k5 = xp.deg2rad(phase)
    kx = kx_per_A[None].astype(xp.float64)
    ky = ky_per_A[None].astype(xp.float64)
    u2 = kx ** 2 + ky ** 2
    azimuth = xp.arctan2(ky, kx)
    deltaf = -(u + v) / 2 - (u - v) / 2 * xp.cos(2 * (azimuth - xp.deg2rad(angle)))
    argument = k1 * deltaf * u2 + k2 * u2 ** 2 - k5 - k3
    ctf = -xp.sin(argument) * xp.exp(k4 * u2) * scale
    return ctf.astype(xp.float32)


def ctf_half_plane(params_matrix, box_size: int, pixel_size_A: float):
    """CTFs on the centered half-plane grid of :func:`cryocv.fourier.ft2_centered`:
    (n, 9) → (n, N, N//2+1) float32. On the GPU one kernel (:mod:`cryocv.ctf_kernel`)."""
    xp = get_array_module(params_matrix)
    if xp is not np:
        from .ctf_kernel import ctf_half_plane_gpu
        return ctf_half_plane_gpu(params_matrix, box_size, pixel_size_A)
    kx, ky = half_plane_frequencies(box_size, xp)
    scale = 1.0 / (box_size * pixel_size_A)
    return evaluate_ctf(params_matrix, kx * scale, ky * scale)
