"""Prototype: standard deviation of align_maps_locally's rotation estimate from the maps' own noise
(sandwich covariance of the least-squares rotation fit, J^-1 K J^-1; noise per shell from |A - B|^2)."""
import math, sys, numpy as np
from cryocv.io.mrc import read_map
from cryocv.fourier import fourier_crop, shift_volume
from cryocv.register import center_of_mass_px, align_maps_locally, LOCAL_MIN_BOX, LOCAL_MAX_BOX

def rotation_sigma_deg(reference, moving, pixel_size_A, resolution_A):
    n = reference.shape[0]
    size = max(LOCAL_MIN_BOX, 2 * math.ceil(n * pixel_size_A / resolution_A) + 16)
    size = min(size + size % 2, LOCAL_MAX_BOX)
    if size >= n: size = n
    a, b = fourier_crop(reference, size), fourier_crop(moving, size)
    px = pixel_size_A * n / size
    radius = float(np.clip(size * px / resolution_A, 3.0, size / 2 - 1))
    c = center_of_mass_px(a)
    a = shift_volume(a, -c); b = shift_volume(b, -c)
    m = size
    idx = np.arange(m) - m // 2
    z, y, x = np.meshgrid(idx, idx, idx, indexing="ij")
    k = np.fft.fftshift(np.fft.fftfreq(m)) * m
    kz, ky, kx = np.meshgrid(k, k, k, indexing="ij")
    ft = lambda v: np.fft.fftshift(np.fft.fftn(np.fft.ifftshift(v))) / m ** 1.5
    A, B = ft(a), ft(b)
    G = [ft(-2j * np.pi * coord * a / m) for coord in (x, y, z)]       # dF/dk_j
    r = np.sqrt(kx ** 2 + ky ** 2 + kz ** 2)
    ball = (r <= radius) & (r > 0)
    kvec = [kx, ky, kz]
    D = []
    for u in np.eye(3):
        uxk = np.cross(u, np.stack(kvec, -1))            # (m,m,m,3)
        D.append(-(uxk[..., 0] * G[0] + uxk[..., 1] * G[1] + uxk[..., 2] * G[2]))
    shell = np.rint(r).astype(int)
    diff2 = np.abs(A - B) ** 2
    s2 = np.bincount(shell[ball], diff2[ball]) / np.maximum(np.bincount(shell[ball]), 1)
    noise = s2[shell[ball]]
    Dm = np.stack([d[ball] for d in D])                  # (3, P)
    J = (Dm[:, None, :] * Dm[None, :, :].conj()).real.sum(-1)
    K = (Dm[:, None, :] * Dm[None, :, :].conj() * noise).real.sum(-1)
    Ji = np.linalg.inv(J)
    cov = Ji @ K @ Ji
    return np.degrees(np.sqrt(np.diag(cov))), size, radius

if __name__ == "__main__":
    d = "/work/relion_sm/cryocv_cpu_registered/nu_registered/iterations/iter_010/"
    a, px = read_map(d + "reference_1.mrc"); b, _ = read_map(d + "reference_2.mrc"); mk, _ = read_map(d + "mask.mrc")
    for res in (12, 8, 6, 4.8):
        s, size, rad = rotation_sigma_deg(a * mk, b * mk, px, res)
        print(f"iter10 NU refs masked, {res} Å: sigma per axis {np.round(s, 3)} deg (box {size}, radius {rad:.1f})")
    # a known-answer check: rotate a by 1 deg about x, with small noise
