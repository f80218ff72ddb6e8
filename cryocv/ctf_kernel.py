"""The CTFs of a batch on the half-plane grid in one GPU kernel: twin of
:func:`cryocv.ctf.evaluate_ctf` on the grid of :func:`cryocv.ctf.ctf_half_plane`. Every pass
evaluates the CTF of every batch; the array expression takes about 20 launches over
(B, N, N//2+1) float64 temporaries, this kernel one, with the same float64 arithmetic (to about
an ulp: fused multiply-adds and CUDA's maths library; the float32 results agree to ~1e-7)."""
from __future__ import annotations

import cupy as cp
import numpy as np

_CTF_HALF_PLANE = cp.ElementwiseKernel(
    "raw float64 p, float32 scale, int32 n, int32 w", "float32 ctf",
    r"""
    const double PI = 3.141592653589793;
    const long long plane = (long long)n * w;
    const long long b = i / plane;
    const int rem = (int)(i - b * plane);
    const int y = rem / w, x = rem - y * w;
    // frequencies in 1/Å rounded to float32, as the twin's float32 grid times the Python scale
    const double kx = (double)((float)x * scale), ky = (double)((float)(y - n / 2) * scale);
    const double u = p[b * 9 + 0], v = p[b * 9 + 1], angle = p[b * 9 + 2], kv = p[b * 9 + 3];
    const double cs = p[b * 9 + 4], q0 = p[b * 9 + 5], phase = p[b * 9 + 6], bfac = p[b * 9 + 7];
    const double amplitude = p[b * 9 + 8];
    const double volts = kv * 1e3;
    const double lam = 12.2643247 / sqrt(volts * (1.0 + volts * 0.978466e-6));
    const double k1 = PI * lam;
    const double k2 = PI / 2 * (cs * 1e7) * pow(lam, 3.0);
    const double k3 = atan(q0 / sqrt(1 - q0 * q0));
    const double k4 = -bfac / 4.0;
    const double k5 = phase * (PI / 180.0);
    const double u2 = kx * kx + ky * ky;
    const double azimuth = atan2(ky, kx);
    const double deltaf = -(u + v) / 2 - (u - v) / 2 * cos(2 * (azimuth - angle * (PI / 180.0)));
    const double argument = k1 * deltaf * u2 + k2 * (u2 * u2) - k5 - k3;
    ctf = (float)(-sin(argument) * exp(k4 * u2) * amplitude);
    """, "cryocv_ctf_half_plane")


def ctf_half_plane_gpu(params_matrix, box_size: int, pixel_size_A: float):
    """CTFs (B, N, N//2+1) float32 of ``params_matrix`` (B, 9) as :meth:`cryocv.ctf.CTFParams.as_matrix`."""
    params = cp.ascontiguousarray(params_matrix, dtype=cp.float64)
    out = cp.empty((params.shape[0], box_size, box_size // 2 + 1), dtype=cp.float32)
    _CTF_HALF_PLANE(params, np.float32(1.0 / (box_size * pixel_size_A)), np.int32(box_size),
                    np.int32(box_size // 2 + 1), out)
    return out
