"""Fused top-k of score rows on the GPU (twin of :func:`cryocv.search._top_k`), which the
branch-and-bound search uses to keep its candidates: one block per row instead of CuPy's
argpartition (a sort of whole rows)."""
from __future__ import annotations

import cupy as cp

_TOP_K_BLOCK = 128
TOP_K_MAX_LENGTH = 12000           # a row in shared memory (with the kernel's own, within 48 KiB)

_TOP_K = r"""
// One block per row: the k largest of scores[row, :L] (NaN counts as -inf), best first, ties to the
// lower index; k rounds of a block-wide argmax over a shared copy of the row, each winner marked
// taken (NaN) for the next round.
#define NEG_INF __int_as_float((int)0xff800000)
#define TAKEN __int_as_float(0x7fffffff)     // a NaN: never "better", so never chosen again

__device__ __forceinline__ bool better(float v, int i, float bv, int bi) {
    return v > bv || (v == bv && i < bi);
}

extern "C" __global__ void top_k_rows(const float* __restrict__ scores, int L, int k, long long* __restrict__ out) {
    extern __shared__ float row[];
    __shared__ float warp_v[32];
    __shared__ int warp_i[32];
    const float* src = scores + (long long)blockIdx.x * L;
    for (int j = threadIdx.x; j < L; j += blockDim.x) {
        float x = src[j];
        row[j] = x != x ? NEG_INF : x;
    }
    __syncthreads();
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = (blockDim.x + 31) >> 5;
    for (int r = 0; r < k; ++r) {
        float bv = NEG_INF;
        int bi = 0x7fffffff;
        for (int j = threadIdx.x; j < L; j += blockDim.x) {
            float x = row[j];
            if (x == x && better(x, j, bv, bi)) { bv = x; bi = j; }
        }
        for (int off = 16; off > 0; off >>= 1) {
            float ov = __shfl_down_sync(0xffffffff, bv, off);
            int oi = __shfl_down_sync(0xffffffff, bi, off);
            if (better(ov, oi, bv, bi)) { bv = ov; bi = oi; }
        }
        if (lane == 0) { warp_v[warp] = bv; warp_i[warp] = bi; }
        __syncthreads();
        if (threadIdx.x == 0) {
            for (int w = 1; w < n_warps; ++w)
                if (better(warp_v[w], warp_i[w], bv, bi)) { bv = warp_v[w]; bi = warp_i[w]; }
            out[(long long)blockIdx.x * k + r] = bi;
            row[bi] = TAKEN;
        }
        __syncthreads();
    }
}
"""


_top_k_kernel = cp.RawKernel(_TOP_K, "top_k_rows", options=("--std=c++14",))


def top_k_gpu(scores, k: int):
    """Indices (B, k) int64 of the ``k`` largest entries of each row of ``scores`` (B, L), best
    first, ties to the lower index (NaN ranks as −∞); rows of at most TOP_K_MAX_LENGTH. Twin of
    :func:`cryocv.search._top_k` without its two full row sorts (CuPy's argpartition sorts)."""
    b, length = scores.shape
    if not 0 < k <= length or length > TOP_K_MAX_LENGTH:
        raise ValueError(f"top-{k} of rows of {length}: need 0 < k <= length <= {TOP_K_MAX_LENGTH}")
    rows = cp.ascontiguousarray(scores, dtype=cp.float32)
    out = cp.empty((b, k), dtype=cp.int64)
    if b:
        _top_k_kernel((b,), (_TOP_K_BLOCK,), (rows, cp.int32(length), cp.int32(k), out),
                      shared_mem=4 * length)
    return out
