"""Rotations in RELION's conventions.

RELION (``euler.cpp``) uses ZYZ Euler angles (rot, tilt, psi) in degrees and the
matrix ``A = Rz(psi) · Ry(tilt) · Rz(rot)`` built from *passive* elementary
rotations. A projection image of a volume V in pose A is
``P(x, y) = ∫ V(Aᵀ (x, y, z)) dz``; its Fourier transform is the central slice
``F_P(k) = F_V(Aᵀ (kx, ky, 0))``.

cryoSPARC stores the rotation as an axis-angle (rotation) vector; see
:func:`axis_angle_to_matrix`.
"""
from __future__ import annotations

import numpy as np


def euler_to_matrix(euler_deg):
    """RELION's Euler_angles2matrix. ``euler_deg`` (..., 3) = rot, tilt, psi → (..., 3, 3)."""
    euler = np.deg2rad(np.asarray(euler_deg, dtype=np.float64))
    ca, sa = np.cos(euler[..., 0]), np.sin(euler[..., 0])
    cb, sb = np.cos(euler[..., 1]), np.sin(euler[..., 1])
    cg, sg = np.cos(euler[..., 2]), np.sin(euler[..., 2])
    cc, cs, sc, ss = cb * ca, cb * sa, sb * ca, sb * sa
    a = np.empty(euler.shape[:-1] + (3, 3))
    a[..., 0, 0] = cg * cc - sg * sa
    a[..., 0, 1] = cg * cs + sg * ca
    a[..., 0, 2] = -cg * sb
    a[..., 1, 0] = -sg * cc - cg * sa
    a[..., 1, 1] = -sg * cs + cg * ca
    a[..., 1, 2] = sg * sb
    a[..., 2, 0] = sc
    a[..., 2, 1] = ss
    a[..., 2, 2] = cb
    return a


def matrix_to_euler(matrices):
    """RELION's Euler_matrix2angles: (..., 3, 3) → (..., 3) degrees, tilt in [0, 180]."""
    a = np.asarray(matrices, dtype=np.float64)
    abs_sb = np.hypot(a[..., 0, 2], a[..., 1, 2])
    regular = abs_sb > 16 * np.finfo(np.float32).eps
    psi = np.arctan2(a[..., 1, 2], -a[..., 0, 2])
    rot = np.arctan2(a[..., 2, 1], a[..., 2, 0])
    tilt = np.arctan2(abs_sb, a[..., 2, 2])  # sin(tilt) >= 0 by construction
    # gimbal lock: tilt = 0 or 180, put everything in psi
    up = a[..., 2, 2] > 0
    psi_lock = np.where(up, np.arctan2(-a[..., 1, 0], a[..., 0, 0]), np.arctan2(a[..., 1, 0], -a[..., 0, 0]))
    rot = np.where(regular, rot, 0.0)
    tilt = np.where(regular, tilt, np.where(up, 0.0, np.pi))
    psi = np.where(regular, psi, psi_lock)
    return np.rad2deg(np.stack([rot, tilt, psi], axis=-1))


def axis_angle_to_matrix(rotvec):
    """Rodrigues: rotation vector (..., 3), radians → active rotation matrix (..., 3, 3)."""
    v = np.asarray(rotvec, dtype=np.float64)
    theta = np.linalg.norm(v, axis=-1)
    safe = np.where(theta > 1e-12, theta, 1.0)
    k = v / safe[..., None]
    kx, ky, kz = k[..., 0], k[..., 1], k[..., 2]
    zero = np.zeros_like(kx)
    kmat = np.stack([np.stack([zero, -kz, ky], -1), np.stack([kz, zero, -kx], -1),
                     np.stack([-ky, kx, zero], -1)], -2)
    s, c = np.sin(theta)[..., None, None], np.cos(theta)[..., None, None]
    eye = np.broadcast_to(np.eye(3), kmat.shape)
    out = eye + s * kmat + (1 - c) * (kmat @ kmat)
    return np.where(~(theta <= 1e-12)[..., None, None], out, eye)   # NaN stays NaN (not the identity)


def matrix_to_axis_angle(matrices):
    """Inverse of :func:`axis_angle_to_matrix` (angle in [0, π]); (..., 3, 3) → (..., 3)."""
    r = np.asarray(matrices, dtype=np.float64)
    cos_theta = np.clip((np.trace(r, axis1=-2, axis2=-1) - 1) / 2, -1.0, 1.0)
    theta = np.arccos(cos_theta)
    w = np.stack([r[..., 2, 1] - r[..., 1, 2], r[..., 0, 2] - r[..., 2, 0], r[..., 1, 0] - r[..., 0, 1]], -1)
    sin_theta = np.sin(theta)
    small = sin_theta > 1e-6
    axis = w / np.where(small, 2 * sin_theta, 1.0)[..., None]
    # near pi: axis from the symmetric part, sign fixed by w
    sym = (r + np.swapaxes(r, -1, -2)) / 2 - cos_theta[..., None, None] * np.eye(3)
    diag = np.clip(np.diagonal(sym, axis1=-2, axis2=-1) / np.maximum(1 - cos_theta, 1e-12)[..., None], 0, None)
    axis_pi = np.sqrt(diag)
    ref = np.argmax(axis_pi, axis=-1)
    row = np.take_along_axis(sym, ref[..., None, None].repeat(3, axis=-1), axis=-2)[..., 0, :]
    axis_pi = row / np.maximum(np.linalg.norm(row, axis=-1, keepdims=True), 1e-12)
    sign = np.sign(np.sum(axis_pi * w, axis=-1))
    axis_pi = axis_pi * np.where(sign == 0, 1.0, sign)[..., None]
    axis = np.where(small[..., None] | (theta[..., None] < 1e-3), axis, axis_pi)
    return axis * theta[..., None]


def rotation_about_axis(axis, angle_rad):
    """Active rotation matrix by ``angle_rad`` about unit ``axis`` (3,)."""
    axis = np.asarray(axis, dtype=np.float64)
    return axis_angle_to_matrix(axis / np.linalg.norm(axis) * angle_rad)


def angular_distance_deg(a, b):
    """Geodesic angle (degrees) between rotation matrices ``a`` and ``b`` (..., 3, 3)."""
    # ||A − B||_F = 2√2·sin(θ/2): accurate for small angles, unlike arccos of the trace
    diff = np.linalg.norm(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64), axis=(-2, -1))
    return np.rad2deg(2 * np.arcsin(np.clip(diff / (2 * np.sqrt(2)), 0.0, 1.0)))


def viewing_direction(matrices):
    """Unit projection direction (..., 3) in the map frame: the third row of A."""
    return np.asarray(matrices)[..., 2, :]


def healpix_centers(nside: int):
    """Ring-scheme HEALPix pixel centres (Górski et al. 2005): (tilt, rot) radians, 12·nside² each."""
    tilts, rots = [], []
    for ring in range(1, 4 * nside):
        if ring < nside:  # north polar cap
            z = 1 - ring ** 2 / (3.0 * nside ** 2)
            phi = np.pi / (2 * ring) * (np.arange(1, 4 * ring + 1) - 0.5)
        elif ring <= 3 * nside:  # equatorial belt
            z = 4.0 / 3 - 2.0 * ring / (3 * nside)
            shift = ((ring - nside + 1) % 2) / 2.0
            phi = np.pi / (2 * nside) * (np.arange(1, 4 * nside + 1) - shift)
        else:  # south polar cap
            south = 4 * nside - ring
            z = -(1 - south ** 2 / (3.0 * nside ** 2))
            phi = np.pi / (2 * south) * (np.arange(1, 4 * south + 1) - 0.5)
        tilts.append(np.full(phi.shape, np.arccos(z)))
        rots.append(phi)
    return np.concatenate(tilts), np.concatenate(rots)


def so3_grid(angular_step_deg: float):
    """Near-uniform grid over SO(3) as RELION samples it (HEALPix directions × in-plane psi).

    The HEALPix order is the smallest whose spacing (60°/nside) is at most
    ``angular_step_deg``; psi is sampled at the same spacing. Returns Euler
    angles (M, 3) in degrees (30° gives 48 × 12 = 576 poses).
    """
    if angular_step_deg <= 0:
        raise ValueError("angular step must be positive")
    nside = 1
    while 60.0 / nside > angular_step_deg * (1 + 1e-9):
        nside *= 2
    step = 60.0 / nside
    n_psi = int(round(360.0 / step))
    tilt, rot = healpix_centers(nside)
    psi = np.arange(n_psi) * (360.0 / n_psi)
    euler = np.empty((tilt.size, n_psi, 3))
    euler[..., 0] = np.rad2deg(rot)[:, None]
    euler[..., 1] = np.rad2deg(tilt)[:, None]
    euler[..., 2] = psi[None, :]
    return euler.reshape(-1, 3)


def random_rotations(n: int, rng: np.random.Generator):
    """``n`` Haar-uniform rotation matrices (uniform unit quaternions)."""
    q = rng.normal(size=(n, 4))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    w, x, y, z = q.T
    return np.stack([
        np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
        np.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
        np.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1),
    ], -2)
