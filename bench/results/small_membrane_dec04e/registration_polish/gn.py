"""Prototype: Gauss-Newton refinement of a near-identity rigid registration, on the exact FFT (no
interpolation in the estimate), with its sandwich covariance."""
import math, numpy as np
import cryocv.register as reg
from cryocv.fourier import fourier_crop
from cryocv.register import MapTransform, transform_volume, LOCAL_MIN_BOX, LOCAL_MAX_BOX

def _ft(v):
    m = v.shape[0]
    return np.fft.fftshift(np.fft.fftn(np.fft.ifftshift(v))) / m ** 1.5

def _so3_exp(omega):
    th = np.linalg.norm(omega)
    K = np.array([[0, -omega[2], omega[1]], [omega[2], 0, -omega[0]], [-omega[1], omega[0], 0]])
    if th < 1e-12:
        return np.eye(3) + K
    return np.eye(3) + math.sin(th) / th * K + (1 - math.cos(th)) / th ** 2 * K @ K

def gauss_newton(a, b, radius, T=None, iterations=4, padding=4):
    """a, b cropped (m,m,m); returns (T (m px), cov (6,6) [rad, rad, rad, px, px, px], steps)."""
    m = a.shape[0]
    idx = np.arange(m) - m // 2
    z, y, x = np.meshgrid(idx, idx, idx, indexing="ij")
    k = np.fft.fftshift(np.fft.fftfreq(m)) * m
    kz, ky, kx = np.meshgrid(k, k, k, indexing="ij")
    r = np.sqrt(kx ** 2 + ky ** 2 + kz ** 2)
    ball = (r <= radius) & (r > 0)
    kv = np.stack([kx[ball], ky[ball], kz[ball]])                 # (3, P)
    A = _ft(a)[ball]
    T = T or MapTransform(np.eye(3), np.zeros(3), 0.0)
    steps = []
    for it in range(iterations):
        bt = transform_volume(b, T, padding) if it or T.rotation_deg > 0 or np.any(T.shift_px) else b
        mid = 0.5 * (a + bt)
        M = _ft(mid)[ball]
        grad = np.stack([_ft(-2j * np.pi * c * mid / m)[ball] for c in (x, y, z)])   # dF/dk_j (3, P)
        D = []
        for j in range(3):                       # rotation: grad . (e_j x k)
            e = np.zeros(3); e[j] = 1
            exk = np.cross(e, kv.T).T
            D.append((grad * exk).sum(0))
        for j in range(3):                       # translation t: exp(-2 pi i k.t/m)
            D.append(-2j * np.pi * kv[j] / m * M)
        D = np.stack(D)                          # (6, P)
        B = _ft(bt)[ball]
        J = (D[:, None].conj() * D[None]).real.sum(-1)
        g = (D.conj() * (A - B)).real.sum(-1)
        p = np.linalg.solve(J, g)
        steps.append(p.copy())
        L2, t2 = _so3_exp(p[:3]), p[3:]
        # B''(x) = B'(L2 (x - t2)) = b(L1 L2 (x - t2 - L2^T t1))
        T = MapTransform(T.matrix @ L2, t2 + L2.T @ T.shift_px, 0.0)
        if np.degrees(np.linalg.norm(p[:3])) < 0.002 and np.linalg.norm(p[3:]) < 0.002:
            break
    bt = transform_volume(b, T, padding)
    resid = _ft(a)[ball] - _ft(bt)[ball]
    shell = np.rint(np.sqrt((kv ** 2).sum(0))).astype(int)
    s2 = np.bincount(shell, np.abs(resid) ** 2) / np.maximum(np.bincount(shell), 1)
    K = (D[:, None].conj() * D[None] * s2[shell]).real.sum(-1)
    Ji = np.linalg.inv(J)
    return T, Ji @ K @ Ji, steps

def align_locally_gn(reference, moving, pixel_size_A, resolution_A):
    n = reference.shape[0]
    size = max(LOCAL_MIN_BOX, 2 * math.ceil(n * pixel_size_A / resolution_A) + 16)
    size = min(size + size % 2, LOCAL_MAX_BOX)
    if size >= n: size = n
    a, b = fourier_crop(reference, size), fourier_crop(moving, size)
    coarse_px = pixel_size_A * n / size
    coarse = reg.align_maps_locally(reference, moving, pixel_size_A, resolution_A)
    T0 = MapTransform(coarse.matrix, coarse.shift_px * size / n, 0.0)
    radius = float(np.clip(size * coarse_px / resolution_A, 3.0, size / 2 - 1))
    T, cov, steps = gauss_newton(a.astype(np.float64), b.astype(np.float64), radius, T0)
    sig = np.sqrt(np.diag(cov))
    return (MapTransform(T.matrix, T.shift_px * n / size, 0.0), coarse,
            np.degrees(sig[:3]), sig[3:] * n / size, steps)
