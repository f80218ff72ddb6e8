"""CuPy RawKernels for slice extraction and insertion (GPU twins of ``cryocv.projector``) and
the fused scoring of the branch-and-bound subdivision (GPU twin of ``cryocv.search``'s
extract-then-score path).

Extraction and insertion run one thread per (rotation, frequency point) and use exactly the
arithmetic of the numpy twins: q = pad·Aᵀ(kx, ky, 0), Friedel folding for
qx < 0, trilinear weights, zero outside the grid. Insertion uses float atomics
on the interleaved real/imaginary parts of the complex64 accumulator.
For the pose search, the reference may instead be sampled through a 3D texture (hardware
trilinear filtering with 8-bit weights, as RELION's GPU projector does; see :data:`SAMPLING`).
Kernels compile once per device (CuPy caches them).
"""
from __future__ import annotations

import os

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

# TEXTURE compiles a kernel for a texture object of the reference instead of its array
_TEXTURE = r"""
#ifdef TEXTURE
// hardware trilinear filtering (texel centres at i + 0.5, zero outside: border addressing) of the
// same half-volume; its interpolation weights have 8 fractional bits
__device__ __forceinline__ float2 sample_texture(cudaTextureObject_t vol, float qx, float qy, float qz, int np_) {
    bool mate = qx < 0.f;
    if (mate) { qx = -qx; qy = -qy; qz = -qz; }
    float centre = (float)(np_ / 2) + 0.5f;
    float2 v = tex3D<float2>(vol, qx + 0.5f, qy + centre, qz + centre);
    return make_float2(v.x, mate ? -v.y : v.y);
}
#define VOLUME cudaTextureObject_t
#else
#define VOLUME const float2* __restrict__
#endif
"""

_EXTRACT = _COMMON + _TEXTURE + r"""
extern "C" __global__ void extract_slices(VOLUME vol, const float* __restrict__ rot,
        const float* __restrict__ kx, const float* __restrict__ ky, float2* __restrict__ out,
        int n_rot, int n_pts, int np_, int nh, float pad) {
    long long tid = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (tid >= (long long)n_rot * n_pts) return;
    int b = tid / n_pts, m = tid % n_pts;
    float qx, qy, qz;
    slice_coord(rot + 9 * b, kx[m], ky[m], pad, qx, qy, qz);
#ifdef TEXTURE
    out[tid] = sample_texture(vol, qx, qy, qz, np_);
#else
    bool mate = qx < 0.f;
    if (mate) { qx = -qx; qy = -qy; qz = -qz; }
    float re = 0.f, im = 0.f;
    for (int c = 0; c < 8; ++c) {
        Corner k = corner(qx, qy, qz, c, np_, nh);
        if (k.ok) { float2 v = vol[k.idx]; re += k.w * v.x; im += k.w * v.y; }
    }
    out[tid] = make_float2(re, mate ? -im : im);
#endif
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

# Scores without materialized slices: one block per (image, group of RC rotations with SC shifts);
# each thread walks frequency points, samples the group's RC slices there (trilinear, as
# extract_slices), forms the SC phase-shifted image terms, and accumulates the SC·RC cross terms
# Re(d_s·conj(P_r)) and the RC norms Σ C²w|P_r|²; a block reduction gives scores =
# cross / sqrt(norm), as search.score_children. The slices (B·G·RC·M complex) are never written
# to memory, and a group's nearby rotations (a subdivision's 8 children) sample nearby voxels from
# the same thread. Variants: (RC, SC) = (8, 4) for subdivision levels, (4, 16) for a start grid
# with few shifts (a narrowed local search).
_SCORE_CHILDREN = _TEXTURE + r"""
#define NACC (SC * RC + RC)

__device__ __forceinline__ float2 sample(const float2* __restrict__ vol, float qx, float qy, float qz,
                                         int np_, int nh) {
    bool mate = qx < 0.f;
    if (mate) { qx = -qx; qy = -qy; qz = -qz; }
    float x0f = floorf(qx), y0f = floorf(qy), z0f = floorf(qz);
    float fx = qx - x0f, fy = qy - y0f, fz = qz - z0f;
    int x0 = (int)x0f, y0 = (int)y0f + np_ / 2, z0 = (int)z0f + np_ / 2;
    float re = 0.f, im = 0.f;
    #pragma unroll
    for (int dz = 0; dz < 2; ++dz) {
        int zi = z0 + dz;
        if (zi < 0 || zi >= np_) continue;
        float wz = dz ? fz : 1.f - fz;
        #pragma unroll
        for (int dy = 0; dy < 2; ++dy) {
            int yi = y0 + dy;
            if (yi < 0 || yi >= np_) continue;
            float wzy = wz * (dy ? fy : 1.f - fy);
            long long row = ((long long)zi * np_ + yi) * nh;
            #pragma unroll
            for (int dx = 0; dx < 2; ++dx) {
                int xi = x0 + dx;
                if (xi < 0 || xi >= nh) continue;
                float w = wzy * (dx ? fx : 1.f - fx);
                float2 v = vol[row + xi];
                re += w * v.x; im += w * v.y;
            }
        }
    }
    return make_float2(re, mate ? -im : im);
}


extern "C" __global__ void score_children(VOLUME vol, const float* __restrict__ rot,
        const float* __restrict__ shifts, const float* __restrict__ kx, const float* __restrict__ ky,
        const float2* __restrict__ data, const float* __restrict__ ctf2, float* __restrict__ out,
        int n_kept, int n_pts, int np_, int nh, float pad, float box) {
    __shared__ float r[RC * 9];
    __shared__ float t[SC * 2];
    __shared__ float partial[32][NACC + 1];
    int bk = blockIdx.x, b = bk / n_kept;
    for (int i = threadIdx.x; i < RC * 9; i += blockDim.x) r[i] = rot[(long long)bk * RC * 9 + i];
    for (int i = threadIdx.x; i < SC * 2; i += blockDim.x) t[i] = shifts[(long long)bk * SC * 2 + i];
    __syncthreads();
    float acc[NACC];
    #pragma unroll
    for (int i = 0; i < NACC; ++i) acc[i] = 0.f;
    const float2* d_row = data + (long long)b * n_pts;
    const float* c_row = ctf2 + (long long)b * n_pts;
    for (int m = threadIdx.x; m < n_pts; m += blockDim.x) {
        float fx = kx[m], fy = ky[m];
        float2 d = d_row[m];
        float c2 = c_row[m];
        float2 ds[SC];
        #pragma unroll
        for (int s = 0; s < SC; ++s) {       // exp(-2 pi i (k . t) / N)
            float sn, cs;
            sincospif(-2.f * (t[2 * s] * fx + t[2 * s + 1] * fy) / box, &sn, &cs);
            ds[s] = make_float2(d.x * cs - d.y * sn, d.x * sn + d.y * cs);
        }
        #pragma unroll
        for (int c = 0; c < RC; ++c) {
            const float* a = r + 9 * c;
            float qx = pad * (a[0] * fx + a[3] * fy), qy = pad * (a[1] * fx + a[4] * fy), qz = pad * (a[2] * fx + a[5] * fy);
#ifdef TEXTURE
            float2 p = sample_texture(vol, qx, qy, qz, np_);
#else
            float2 p = sample(vol, qx, qy, qz, np_, nh);
#endif
            acc[SC * RC + c] += c2 * (p.x * p.x + p.y * p.y);
            #pragma unroll
            for (int s = 0; s < SC; ++s) acc[s * RC + c] += ds[s].x * p.x + ds[s].y * p.y;
        }
    }
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = (blockDim.x + 31) >> 5;
    #pragma unroll
    for (int i = 0; i < NACC; ++i) {
        float v = acc[i];
        for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffff, v, o);
        if (lane == 0) partial[warp][i] = v;
    }
    __syncthreads();
    if (threadIdx.x < SC * RC) {
        int s = threadIdx.x / RC, c = threadIdx.x % RC;
        float cross = 0.f, norm = 0.f;
        for (int w = 0; w < n_warps; ++w) { cross += partial[w][s * RC + c]; norm += partial[w][SC * RC + c]; }
        out[(long long)bk * SC * RC + threadIdx.x] = cross / sqrtf(fmaxf(norm, 1e-30f));
    }
}
"""


_BLOCK = 256
_SCORE_BLOCK = 128


def _kernel(name, source):
    return cp.RawKernel(source, name, options=("--std=c++14",))


_extract_kernels = {False: _kernel("extract_slices", _EXTRACT)}
_insert_kernel = _kernel("insert_slices", _INSERT)
_SCORE_VARIANTS = ((8, 4), (4, 16))                 # (rotations, shifts) per group of the fused scores
POSE_SCORE_MAX_SHIFTS = 16                           # score_poses_gpu: shifts per image (the (4, 16) variant)
# How the pose search samples the reference (fused scores; slices for scores and noise estimates):
# "texture" (the texture units' trilinear filter, 8-bit weights, the volume copied once into a CUDA
# array: 3-5x faster, scores within 0.2 %, bench/results/texture_sampling.md) or "memory" (trilinear
# in software from the complex64 array, exactly the CPU's arithmetic). Reconstruction and
# subtraction always sample memory. CRYOCV_GPU_SAMPLING=memory sets it for a process.
SAMPLING = os.environ.get("CRYOCV_GPU_SAMPLING", "texture")
TEXTURE_MAX_BYTES = 2 << 30                          # larger volumes are sampled from memory
_compiled = {}
_texture = {}                                        # {device id: the last volume's texture there}


def _score_kernel(rc: int, sc: int, texture: bool = False):
    key = (rc, sc, texture)
    if key not in _compiled:
        _compiled[key] = cp.RawKernel(_SCORE_CHILDREN, "score_children",
                                      options=("--std=c++14", f"-DRC={rc}", f"-DSC={sc}")
                                      + (("-DTEXTURE",) if texture else ()))
    return _compiled[key]


def volume_texture(volume_ft):
    """A 3D texture object (float2 texels, trilinear filter, zero border, unnormalized coordinates)
    holding ``volume_ft`` (P, P, P//2+1) complex64. The last one made on each device is kept with
    its volume (so its identity stays unique): a volume must not change in place after its first
    use here. The CUDA array lies outside CuPy's pool: :func:`release_texture` frees it."""
    device = volume_ft.device.id
    key = (id(volume_ft), volume_ft.data.ptr, volume_ft.shape)
    if _texture.get(device, {}).get("key") != key:
        from cupy.cuda import runtime, texture
        release_texture(device)
        nz, ny, nx = volume_ft.shape
        channels = texture.ChannelFormatDescriptor(32, 32, 0, 0, runtime.cudaChannelFormatKindFloat)
        array = texture.CUDAarray(channels, nx, ny, nz)
        array.copy_from(cp.ascontiguousarray(volume_ft, dtype=cp.complex64).view(cp.float32))
        resource = texture.ResourceDescriptor(runtime.cudaResourceTypeArray, cuArr=array)
        sampler = texture.TextureDescriptor((runtime.cudaAddressModeBorder,) * 3, runtime.cudaFilterModeLinear,
                                            runtime.cudaReadModeElementType)
        _texture[device] = dict(key=key, volume=volume_ft, array=array,
                                object=texture.TextureObject(resource, sampler))
    return _texture[device]["object"]


def release_texture(device: int | None = None):
    """Free the cached texture of ``device`` (default: every device) and the reference held with
    it, once the kernels queued there have run."""
    for found in [device] if device is not None else list(_texture):
        if found in _texture:
            cp.cuda.Device(found).synchronize()
            del _texture[found]


def _volume_argument(volume_ft, sampling: str | None):
    """(kernel argument, uses texture) for the fused scores' reference."""
    sampling = sampling or SAMPLING
    if sampling not in ("memory", "texture"):
        raise ValueError(f"sampling must be 'memory' or 'texture', got {sampling!r}")
    if sampling == "texture" and volume_ft.size * 8 <= TEXTURE_MAX_BYTES:
        try:
            return volume_texture(volume_ft), True
        except cp.cuda.runtime.CUDARuntimeError:     # no room for the CUDA array: sample memory this time
            release_texture(volume_ft.device.id)
            cp.get_default_memory_pool().free_all_blocks()
    return cp.ascontiguousarray(volume_ft, dtype=cp.complex64), False


def _prep(rotations, kx, ky):
    rot = cp.ascontiguousarray(cp.asarray(rotations, dtype=cp.float32).reshape(-1, 9))
    return rot, cp.ascontiguousarray(kx, dtype=cp.float32), cp.ascontiguousarray(ky, dtype=cp.float32)


def extract_slices_gpu(volume_ft, rotations, kx, ky, padding, texture: bool = False):
    """GPU twin of :func:`cryocv.projector.extract_slices` → (B, M) complex64; ``texture``: sampled
    by the texture units where :data:`SAMPLING` allows (for scores and noise estimates only)."""
    rot, kx, ky = _prep(rotations, kx, ky)
    vol, textured = _volume_argument(volume_ft, None if texture else "memory")
    if textured not in _extract_kernels:
        _extract_kernels[textured] = cp.RawKernel(_EXTRACT, "extract_slices", options=("--std=c++14", "-DTEXTURE"))
    n_rot, n_pts = rot.shape[0], kx.size
    out = cp.empty((n_rot, n_pts), dtype=cp.complex64)
    total = n_rot * n_pts
    if total:
        _extract_kernels[textured](((total + _BLOCK - 1) // _BLOCK,), (_BLOCK,),
                                   (vol, rot, kx, ky, out, cp.int32(n_rot), cp.int32(n_pts),
                                    cp.int32(volume_ft.shape[0]), cp.int32(volume_ft.shape[2]), cp.float32(padding)))
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


def score_groups_gpu(volume_ft, rotations, shifts_px, kx, ky, data, ctf2, padding, box_size, sampling=None):
    """Fused twin of extract-then-:func:`cryocv.search.score_children`: ``rotations`` (B, G, RC, 3, 3)
    and ``shifts_px`` (B, G, SC, 2) per image and group, (RC, SC) one of the compiled variants
    ((8, 4): a subdivision level's children; (4, 16)); ``data`` (B, M) complex64 and ``ctf2``
    (B, M) float32 image terms at points ``kx``, ``ky`` → scores (B, G, SC, RC) float32.
    ``sampling``: "memory" or "texture" (default :data:`SAMPLING`)."""
    b, g, rc = rotations.shape[:3]
    sc = shifts_px.shape[2]
    if rotations.shape[3:] != (3, 3) or shifts_px.shape[:2] != (b, g) or (rc, sc) not in _SCORE_VARIANTS:
        raise ValueError(f"fused scores take groups of (rotations, shifts) in {sorted(_SCORE_VARIANTS)}, "
                         f"got {rotations.shape} rotations and {shifts_px.shape} shifts")
    rot, kx, ky = _prep(rotations, kx, ky)
    shifts = cp.ascontiguousarray(shifts_px, dtype=cp.float32)
    vol, texture = _volume_argument(volume_ft, sampling)
    out = cp.empty((b, g, sc, rc), dtype=cp.float32)
    if b * g:
        _score_kernel(rc, sc, texture)((b * g,), (_SCORE_BLOCK,),
                              (vol, rot, shifts, kx, ky, cp.ascontiguousarray(data, dtype=cp.complex64),
                               cp.ascontiguousarray(ctf2, dtype=cp.float32), out, cp.int32(g),
                               cp.int32(kx.size), cp.int32(volume_ft.shape[0]), cp.int32(volume_ft.shape[2]),
                               cp.float32(padding), cp.float32(box_size)))
    return out


def score_poses_gpu(volume_ft, rotations, shifts_px, kx, ky, data, ctf2, padding, box_size, sampling=None):
    """Fused twin of :func:`cryocv.search.score_poses` for at most 16 shifts: each image's
    rotations (B, R, 3, 3) in groups of 4, each with all its shifts (B, T, 2) → (B, T, R)."""
    b, r = rotations.shape[:2]
    t = shifts_px.shape[1]
    rc, sc = 4, POSE_SCORE_MAX_SHIFTS
    if t > sc:
        raise ValueError(f"the fused pose scores take at most {sc} shifts per image, got {t}")
    groups = -(-r // rc)
    # whole groups: the last rotation and shift repeated (their scores are cut off below)
    rot = cp.concatenate([rotations, cp.repeat(rotations[:, -1:], groups * rc - r, axis=1)], axis=1)
    shifts = cp.concatenate([shifts_px, cp.repeat(shifts_px[:, -1:], sc - t, axis=1)], axis=1)
    scores = score_groups_gpu(volume_ft, rot.reshape(b, groups, rc, 3, 3),
                              cp.broadcast_to(shifts[:, None], (b, groups, sc, 2)), kx, ky, data, ctf2, padding,
                              box_size, sampling)                                   # (B, G, SC, RC)
    return cp.moveaxis(scores, 1, 2).reshape(b, sc, groups * rc)[:, :t, :r]
