"""CuPy RawKernels for slice extraction and insertion (GPU twins of ``cryocv.projector``).

Both kernels run one thread per (rotation, frequency point) and use exactly the
arithmetic of the numpy twins: q = pad·Aᵀ(kx, ky, 0), Friedel folding for
qx < 0, trilinear weights, zero outside the grid. Insertion uses float atomics
on the interleaved real/imaginary parts of the complex64 accumulator.
Kernels compile once per device (CuPy caches them).
"""
from __future__ import annotations

import cupy as cp

_COMMON = r"""
struct Corner { long long idx; float w; bool ok; };

__device__ __forceinline__ void slice_coord(const float* r, float kx, float ky, float pad,
                                            float& qx, float& qy, float& qz) {
    qx = pad * (r[0] * kx + r[3] * ky);
    qy = pad * (r[1] * kx + r[4] * ky);
    qz = pad * (r[2] * kx + r[5] * ky);
}

__device__ __forceinline__ Corner corner(float qx, float qy, float qz, int c,
                                         int np_, int nh) {
    float x0 = floorf(qx), y0 = floorf(qy), z0 = floorf(qz);
    float fx = qx - x0, fy = qy - y0, fz = qz - z0;
    int dx = c & 1, dy = (c >> 1) & 1, dz = (c >> 2) & 1;
    long long xi = (long long)x0 + dx;
    long long yi = (long long)y0 + np_ / 2 + dy;
    long long zi = (long long)z0 + np_ / 2 + dz;
    Corner out;
    out.w = (dx ? fx : 1.f - fx) * (dy ? fy : 1.f - fy) * (dz ? fz : 1.f - fz);
    out.ok = xi >= 0 && xi < nh && yi >= 0 && yi < np_ && zi >= 0 && zi < np_;
    out.idx = out.ok ? (zi * np_ + yi) * nh + xi : 0;
    return out;
}
"""

_EXTRACT = _COMMON + r"""
extern "C" __global__ void extract_slices(const float2* __restrict__ vol, const float* __restrict__ rot,
        const float* __restrict__ kx, const float* __restrict__ ky, float2* __restrict__ out,
        int n_rot, int n_pts, int np_, int nh, float pad) {
    long long tid = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (tid >= (long long)n_rot * n_pts) return;
    int b = tid / n_pts, m = tid % n_pts;
    float qx, qy, qz;
    slice_coord(rot + 9 * b, kx[m], ky[m], pad, qx, qy, qz);
    bool mate = qx < 0.f;
    if (mate) { qx = -qx; qy = -qy; qz = -qz; }
    float re = 0.f, im = 0.f;
    for (int c = 0; c < 8; ++c) {
        Corner k = corner(qx, qy, qz, c, np_, nh);
        if (k.ok) { float2 v = vol[k.idx]; re += k.w * v.x; im += k.w * v.y; }
    }
    out[tid] = make_float2(re, mate ? -im : im);
}
"""

_INSERT = _COMMON + r"""
__device__ __forceinline__ void deposit(float* data, float* weight, float qx, float qy, float qz,
                                        float re, float im, float w, int np_, int nh, bool x0_only) {
    for (int c = 0; c < 8; ++c) {
        Corner k = corner(qx, qy, qz, c, np_, nh);
        if (!k.ok || k.w == 0.f) continue;
        if (x0_only && (k.idx % nh) != 0) continue;
        atomicAdd(data + 2 * k.idx, k.w * re);
        atomicAdd(data + 2 * k.idx + 1, k.w * im);
        atomicAdd(weight + k.idx, k.w * w);
    }
}

extern "C" __global__ void insert_slices(float* __restrict__ data, float* __restrict__ weight,
        const float* __restrict__ rot, const float* __restrict__ kx, const float* __restrict__ ky,
        const float2* __restrict__ values, const float* __restrict__ value_weights,
        int n_rot, int n_pts, int np_, int nh, float pad, int weights_per_rotation) {
    long long tid = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (tid >= (long long)n_rot * n_pts) return;
    int b = tid / n_pts, m = tid % n_pts;
    float qx, qy, qz;
    slice_coord(rot + 9 * b, kx[m], ky[m], pad, qx, qy, qz);
    float2 v = values[tid];
    float w = weights_per_rotation ? value_weights[b] : value_weights[tid];
    if (qx < 0.f) { qx = -qx; qy = -qy; qz = -qz; v.y = -v.y; }
    deposit(data, weight, qx, qy, qz, v.x, v.y, w, np_, nh, false);
    if (qx < 1.f) deposit(data, weight, -qx, -qy, -qz, v.x, -v.y, w, np_, nh, true);
}
"""

_BLOCK = 256


def _kernel(name, source):
    return cp.RawKernel(source, name, options=("--std=c++14",))


_extract_kernel = _kernel("extract_slices", _EXTRACT)
_insert_kernel = _kernel("insert_slices", _INSERT)


def _prep(rotations, kx, ky):
    rot = cp.ascontiguousarray(cp.asarray(rotations, dtype=cp.float32).reshape(-1, 9))
    return rot, cp.ascontiguousarray(kx, dtype=cp.float32), cp.ascontiguousarray(ky, dtype=cp.float32)


def extract_slices_gpu(volume_ft, rotations, kx, ky, padding):
    """GPU twin of :func:`cryocv.projector.extract_slices` → (B, M) complex64."""
    rot, kx, ky = _prep(rotations, kx, ky)
    vol = cp.ascontiguousarray(volume_ft, dtype=cp.complex64)
    n_rot, n_pts = rot.shape[0], kx.size
    out = cp.empty((n_rot, n_pts), dtype=cp.complex64)
    total = n_rot * n_pts
    if total:
        _extract_kernel(((total + _BLOCK - 1) // _BLOCK,), (_BLOCK,),
                        (vol, rot, kx, ky, out, cp.int32(n_rot), cp.int32(n_pts),
                         cp.int32(vol.shape[0]), cp.int32(vol.shape[2]), cp.float32(padding)))
    return out


def insert_slices_gpu(data_ft, weight, rotations, kx, ky, values, value_weights, padding):
    """GPU twin of :func:`cryocv.projector.insert_slices` (in place)."""
    if data_ft.dtype != cp.complex64 or weight.dtype != cp.float32:
        raise TypeError("GPU accumulators must be complex64 data and float32 weight")
    if not (data_ft.flags.c_contiguous and weight.flags.c_contiguous):
        raise ValueError("GPU accumulators must be C-contiguous")
    rot, kx, ky = _prep(rotations, kx, ky)
    n_rot, n_pts = rot.shape[0], kx.size
    vals = cp.ascontiguousarray(values, dtype=cp.complex64)
    wts = cp.asarray(value_weights, dtype=cp.float32)
    per_rotation = wts.ndim == 1 or (wts.ndim == 2 and wts.shape[1] == 1 and n_pts != 1)
    wts = cp.ascontiguousarray(wts.reshape(n_rot) if per_rotation else cp.broadcast_to(wts, (n_rot, n_pts)))
    total = n_rot * n_pts
    if total:
        _insert_kernel(((total + _BLOCK - 1) // _BLOCK,), (_BLOCK,),
                       (data_ft.view(cp.float32), weight, rot, kx, ky, vals, wts,
                        cp.int32(n_rot), cp.int32(n_pts), cp.int32(data_ft.shape[0]),
                        cp.int32(data_ft.shape[2]), cp.float32(padding), cp.int32(per_rotation)))
