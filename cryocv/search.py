"""Global pose search: coarse-to-fine branch-and-bound over SO(3) × shifts
(Punjani, Rubinstein, Fleet & Brubaker, Nat. Methods 14, 290 (2017)).

Score of image X (half-plane FT, CTF C) at pose (A, t) against reference slices P:
whitened by a per-shell noise variance σ²(k) and counting each half-plane
point for itself and its Friedel mate (weight w(k) = 2 for kx > 0, else 1),

    c = Σ_k w(k)/σ²(k) · Re( conj(P_A(k)) · C(k) · X_t(k) ),   n = Σ_k w(k)/σ²(k) · C(k)² |P_A(k)|²,
    score = c / √n,

where ``X_t`` is X re-centred by shift t (RELION's origin, content moved by +t).
``c/√n`` is the Gaussian log-likelihood maximised over a per-image amplitude
scale (up to a pose-independent term), so references and images need no
common intensity scale. The DC term is left out.

Search (one level = one frequency cutoff r):
1. base level: every rotation of a ~15° SO(3) grid × a grid of shifts, scored at
   a low cutoff (``BASE_cutoff_times_step / step``) as one matrix product per batch
   (images·shifts × rotations);
2. keep the best ``n_base_candidates`` (rotation, best shift) per image; the rest
   are pruned;
3. subdivide each kept rotation into 8 children (axis-angle offsets ±step/4 on
   each axis) and its shift into 4 children (±step/4), halve both steps, raise
   the cutoff so that r·step stays constant, score the children as batched
   products, keep the best again: half as many as before, never fewer than
   ``n_candidates`` (many candidates where the cutoff is low and a child is
   cheap, few where it is high; 32 → 16 → 8 → 4 by default);
4. stop when the rotation step reaches the fine alignment step.
All arrays live on the device of the reference (numpy or CuPy).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .backend import device_constant, get_array_module, is_cupy, score_products, to_device
from .fourier import phase_factors, shell_index_2d
from .geometry import axis_angle_to_matrix, euler_to_matrix, so3_grid
from .projector import DEFAULT_PADDING, FrequencyPoints, extract_slices, frequency_points



@dataclass
class SearchParams:
    """Branch-and-bound settings (angles in degrees, shifts in pixels)."""

    base_step_deg: float = 15.0
    fine_step_deg: float = 0.5          # never subdivide below this
    max_shift_px: float = 5.0           # base shift grid spans ±max_shift_px
    n_candidates: int = 4               # kept per image at the fine levels
    n_base_candidates: int = 32         # kept after the base level, then halved per level down to n_candidates
    min_cutoff_px: float = 4.0          # base level never scores fewer shells than this
    # r·step (px·rad) of the subdivision levels: a pose off by half a step moves the outermost
    # scored frequency by < 1 pixel
    cutoff_times_step: float = 1.5
    # the same for the base grid, scored further out: at 1.5 (~30 Å for a 15° grid in a box twice
    # the particle), with 8 candidates kept, 3–12 % of simulated TRPV1 particles settled > 10° from
    # the truth (bench/results/search_tail.md); the base level is one matrix product, so this is cheap
    base_cutoff_times_step: float = 2.0
    candidate_decay: int = 2            # candidates kept shrink by this factor per level


@dataclass
class SearchLevel:
    rotation_step_rad: float
    shift_step_px: float
    cutoff_px: float


def search_schedule(box_size: int, alignment_cutoff_px: float, params: SearchParams) -> list[SearchLevel]:
    """Levels of the search for alignment up to ``alignment_cutoff_px`` (Fourier radius, px).

    Rotation steps halve from ``base_step_deg`` until the step is at most
    ``max(fine_step_deg, 0.5 / cutoff)`` (finer steps move no scored frequency
    by a useful fraction of a pixel); cutoffs are ``cutoff_times_step / step`` capped at the
    alignment cutoff; shift steps start at N/(4·r₀) px and halve too.
    """
    nyquist = box_size / 2
    cutoff_max = float(min(max(alignment_cutoff_px, params.min_cutoff_px), nyquist))
    final_step = max(math.radians(params.fine_step_deg), 0.5 / cutoff_max)
    step = math.radians(params.base_step_deg)
    base_cutoff = min(max(params.base_cutoff_times_step / step, params.min_cutoff_px), cutoff_max)
    # the shift grid follows the subdivision rule's cutoff, not the base level's higher one:
    # as many base shifts as before (the base level's cost is images × shifts × rotations)
    shift_cutoff = min(max(params.cutoff_times_step / step, params.min_cutoff_px), cutoff_max)
    shift_step = max(min(box_size / (4.0 * shift_cutoff), max(params.max_shift_px, 0.5)), 0.5)
    levels = [SearchLevel(step, shift_step, base_cutoff)]
    while step > final_step * (1 + 1e-6):
        step /= 2
        shift_step /= 2
        levels.append(SearchLevel(step, shift_step, min(max(params.cutoff_times_step / step, base_cutoff), cutoff_max)))
    return levels


def candidates_per_level(n_levels: int, params: SearchParams) -> list[int]:
    """Candidates kept per image after each level (the base level first): ``n_base_candidates``,
    then divided by ``candidate_decay`` per level, never below ``n_candidates``."""
    kept = [max(params.n_base_candidates, params.n_candidates)]
    for _ in range(n_levels - 1):
        kept.append(max(kept[-1] // params.candidate_decay, params.n_candidates))
    return kept


def shift_grid(max_shift_px: float, step_px: float) -> np.ndarray:
    """Square grid of shifts (T, 2) within ±max_shift_px (disc), step ``step_px``; includes 0."""
    n = int(math.floor(max_shift_px / step_px + 1e-6))
    offsets = np.arange(-n, n + 1) * step_px
    sx, sy = np.meshgrid(offsets, offsets, indexing="xy")
    grid = np.stack([sx.ravel(), sy.ravel()], axis=1)
    keep = np.hypot(grid[:, 0], grid[:, 1]) <= max_shift_px + 1e-6 + step_px * 0.5
    return grid[keep].astype(np.float32)


_CHILD_SIGNS = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)], dtype=np.float64)
_SHIFT_SIGNS = np.array([[sx, sy] for sx in (-1, 1) for sy in (-1, 1)], dtype=np.float32)


def rotation_children(rotations, step_rad: float):
    """8 children of each rotation cell: ``Δ(δ)·A`` with axis-angle δ ∈ {±step/4}³.

    ``rotations`` (..., 3, 3) → (..., 8, 3, 3), same array module.
    """
    xp = get_array_module(rotations)
    deltas = device_constant(axis_angle_to_matrix(_CHILD_SIGNS * (step_rad / 4)).astype(np.float32), xp)
    return xp.matmul(deltas, rotations[..., None, :, :])


def shift_children(shifts, step_px: float):
    """4 children of each shift cell: ``t + {±step/4}²``; (..., 2) → (..., 4, 2)."""
    xp = get_array_module(shifts)
    return shifts[..., None, :] + device_constant(_SHIFT_SIGNS * np.float32(step_px / 4), xp)


def point_weights(points: FrequencyPoints, noise_var_shell):
    """w(k)/σ²(k) per point (M,): Friedel multiplicity over the shell noise variance; 0 at DC.
    ``noise_var_shell`` (N//2+1,) per integer shell, on the points' device."""
    xp = get_array_module(points.kx)
    shell = shell_index_2d(points.kx, points.ky, noise_var_shell.shape[0] - 1)
    mult = xp.where(points.kx > 0, 2.0, 1.0).astype(xp.float32)
    weights = mult / xp.maximum(noise_var_shell[shell], 1e-30).astype(xp.float32)
    return xp.where(shell == 0, 0.0, weights).astype(xp.float32)


def shift_phases(points: FrequencyPoints, shifts_px):
    """Phase factors (..., M) that re-centre an image by ``shifts_px`` (..., 2)
    (as :func:`cryocv.fourier.phase_shift_images`: content moves by +shift)."""
    return phase_factors(points.kx, points.ky, shifts_px[..., None, :], points.box_size)


@dataclass
class ImageTerms:
    """Per-image quantities at one cutoff: ``data`` (B, M) = w/σ²·C·X (complex64) and
    ``ctf2`` (B, M) = w/σ²·C² (float32)."""

    data: object
    ctf2: object


def image_terms(images_ft, ctf, points: FrequencyPoints, weights) -> ImageTerms:
    """Gather whitened, CTF-multiplied image terms at ``points``: ``images_ft`` (B, N, N//2+1)
    raw (not re-centred); ``ctf`` same shape or None."""
    xp = get_array_module(images_ft)
    x = points.gather(images_ft)
    if ctf is None:
        return ImageTerms((x * weights).astype(xp.complex64), xp.broadcast_to(weights, x.shape).astype(xp.float32))
    c = points.gather(ctf)
    return ImageTerms((x * (c * weights)).astype(xp.complex64), (c * c * weights).astype(xp.float32))


def stack_real_imag(z):
    """(…, M) complex → (…, 2M) float32: real parts, then imaginary parts (contiguous)."""
    xp = get_array_module(z)
    return xp.concatenate([z.real, z.imag], axis=-1).astype(xp.float32, copy=False)


def _complex_cross(a, p, p_stacked=None):
    """Re(a · conj(p)ᵀ) as one real matrix product of stacked [Re, Im] rows:
    a (..., S, M), p (..., R, M) → (..., S, R). ``p_stacked`` is ``stack_real_imag(p)``
    if already made. (Products of the strided ``.real``/``.imag`` views were ~25× slower
    in numpy.)"""
    xp = get_array_module(a)
    p_stacked = stack_real_imag(p) if p_stacked is None else p_stacked
    with score_products(xp):
        return xp.matmul(stack_real_imag(a), xp.swapaxes(p_stacked, -1, -2))


def score_base(terms: ImageTerms, slices, phases, slices_stacked=None, slices_power=None):
    """Base level: every image × shift × rotation. ``slices`` (R, M) reference slices, ``phases``
    (T, M) shift factors → scores (B, T, R) float32. ``slices_stacked`` (R, 2M) and
    ``slices_power`` (R, M) = |slices|² may be passed precomputed (:class:`BaseGrid` does)."""
    xp = get_array_module(slices)
    b, m = terms.data.shape
    t = phases.shape[0]
    shifted = (terms.data[:, None, :] * phases[None]).reshape(b * t, m)
    cross = _complex_cross(shifted, slices, slices_stacked).reshape(b, t, -1)
    power = slices.real ** 2 + slices.imag ** 2 if slices_power is None else slices_power
    norm = xp.matmul(terms.ctf2, power.T)                                   # (B, R)
    return (cross / xp.sqrt(xp.maximum(norm, 1e-30))[:, None, :]).astype(xp.float32)


def score_children(terms: ImageTerms, slices, phases):
    """Subdivision level: per image and candidate, shift children × rotation children.
    ``slices`` (B, K, Rc, M), ``phases`` (B, K, Sc, M) → scores (B, K, Sc, Rc)."""
    xp = get_array_module(slices)
    shifted = terms.data[:, None, None, :] * phases                           # (B, K, Sc, M)
    cross = _complex_cross(shifted, slices)                                    # (B, K, Sc, Rc)
    power = slices.real ** 2 + slices.imag ** 2                                # (B, K, Rc, M)
    norm = xp.matmul(power, terms.ctf2[:, None, :, None])[..., 0]              # (B, K, Rc)
    return (cross / xp.sqrt(xp.maximum(norm, 1e-30))[:, :, None, :]).astype(xp.float32)


def subdivision_scores(volume_ft, terms: ImageTerms, points: FrequencyPoints, rotations, shifts_px,
                       padding: int = DEFAULT_PADDING, fused: bool = True):
    """Scores (B, K, 4, 8) of each image's candidates' children: ``rotations`` (B, K, 8, 3, 3) ×
    ``shifts_px`` (B, K, 4, 2), as :func:`score_children` of their slices. On a GPU (``fused``)
    one kernel samples the slices and scores them without writing them to memory
    (:func:`cryocv.kernels.score_groups_gpu`); else the slices are extracted, then scored."""
    if fused and is_cupy(volume_ft):
        from . import kernels
        return kernels.score_groups_gpu(volume_ft, rotations, shifts_px, points.kx, points.ky, terms.data,
                                        terms.ctf2, padding, points.box_size)
    b, k = rotations.shape[:2]
    slices = extract_slices(volume_ft, rotations.reshape(-1, 3, 3), points, padding).reshape(b, k, 8, -1)
    return score_children(terms, slices, shift_phases(points, shifts_px))


def score_poses(volume_ft, images_ft, ctf, noise_var_shell, rotations, shifts_px, cutoff_px: float,
                padding: int = DEFAULT_PADDING, fused: bool = True):
    """Scores (B, T, R) of each image at each of its own rotations ``rotations`` (B, R, 3, 3) ×
    shifts ``shifts_px`` (B, T, 2), at Fourier radius ``cutoff_px``: the whitened, CTF-weighted
    ``c/√n`` of :func:`score_children` for poses given per image (a local start, symmetry mates,
    a marginalization neighbourhood). On a GPU with at most 16 shifts (``fused``) the slices are
    sampled and scored by one kernel (:func:`cryocv.kernels.score_poses_gpu`)."""
    xp = get_array_module(volume_ft)
    b, n = images_ft.shape[0], images_ft.shape[-2]
    r, t = rotations.shape[1], shifts_px.shape[1]
    points = frequency_points(n, cutoff_px, xp)
    terms = image_terms(images_ft, ctf, points, point_weights(points, noise_var_shell))
    if fused and is_cupy(volume_ft):
        from . import kernels
        if 0 < t <= kernels.POSE_SCORE_MAX_SHIFTS:
            return kernels.score_poses_gpu(volume_ft, rotations, shifts_px, points.kx, points.ky, terms.data,
                                           terms.ctf2, padding, n)
    slices = extract_slices(volume_ft, rotations.reshape(-1, 3, 3), points, padding, for_scores=fused)
    slices = slices.reshape(b, 1, r, -1)                                                # (B, 1, R, M)
    return score_children(terms, slices, shift_phases(points, shifts_px)[:, None])[:, 0]


def _top_k(scores, k: int):
    """Indices (B, k) of the k largest entries of each row of (B, L), best first (float32 on a GPU:
    :func:`cryocv.top_k_kernel.top_k_gpu`, ties to the lower index)."""
    xp = get_array_module(scores)
    k = min(k, scores.shape[1])
    if xp is not np and 0 < k and scores.dtype == xp.float32:
        from . import top_k_kernel
        if scores.shape[1] <= top_k_kernel.TOP_K_MAX_LENGTH:
            return top_k_kernel.top_k_gpu(scores, k)
    if k < scores.shape[1]:
        idx = xp.argpartition(-scores, k - 1, axis=1)[:, :k]
    else:
        idx = xp.broadcast_to(xp.arange(scores.shape[1]), scores.shape).copy()
    order = xp.argsort(-xp.take_along_axis(scores, idx, axis=1), axis=1)
    return xp.take_along_axis(idx, order, axis=1)


class BaseGrid:
    """Base-level rotations and their reference slices for one reference, reused by all batches."""

    def __init__(self, volume_ft, box_size: int, level: SearchLevel, params: SearchParams,
                 padding: int = DEFAULT_PADDING):
        xp = get_array_module(volume_ft)
        self.rotations = to_device(euler_to_matrix(so3_grid(math.degrees(level.rotation_step_rad)))
                                   .astype(np.float32), xp)
        self.points = frequency_points(box_size, level.cutoff_px, xp)
        self.slices = extract_slices(volume_ft, self.rotations, self.points, padding)
        self.slices_stacked = stack_real_imag(self.slices)
        self.slices_power = xp.ascontiguousarray((self.slices.real ** 2 + self.slices.imag ** 2).astype(xp.float32))
        self.shifts = to_device(shift_grid(params.max_shift_px, level.shift_step_px), xp)
        self.phases = shift_phases(self.points, self.shifts)


@dataclass
class Candidates:
    """Poses kept per image: ``rotations`` (B, K, 3, 3), ``shifts_px`` (B, K, 2), ``scores`` (B, K),
    best first. Each is the centre of a cell of the level they were scored at."""

    rotations: object
    shifts_px: object
    scores: object


@dataclass
class PoseSpread:
    """Several weighted poses per image (marginalization): ``rotations`` (B, K, 3, 3),
    ``shifts_px`` (B, K, 2), ``weights`` (B, K) summing to one per image."""

    rotations: object
    shifts_px: object
    weights: object


@dataclass
class SearchResult:
    """Best pose per image: ``rotations`` (B, 3, 3), ``shifts_px`` (B, 2) (RELION origin in
    pixels: re-centre by +shift), ``scores`` (B,) at the last level's cutoff. ``spread``: when
    set, the M-step inserts each image at these weighted poses instead of the best one."""

    rotations: object
    shifts_px: object
    scores: object
    spread: PoseSpread | None = None


def global_start(base: BaseGrid, images_ft, ctf, noise_var_shell, n_kept: int) -> Candidates:
    """Start of a global search: score every base rotation × shift (one matrix product) and keep
    the best ``n_kept`` rotations per image, each with its best shift.

    ``images_ft`` (B, N, N//2+1) raw half-plane FTs; ``ctf`` same shape or None."""
    xp = get_array_module(images_ft)
    terms = image_terms(images_ft, ctf, base.points, point_weights(base.points, noise_var_shell))
    scores = score_base(terms, base.slices, base.phases, base.slices_stacked, base.slices_power)  # (B, T, R)
    best_shift = xp.argmax(scores, axis=1)                                    # (B, R)
    best = xp.max(scores, axis=1)
    keep = _top_k(best, n_kept)                                               # (B, K)
    return Candidates(base.rotations[keep], base.shifts[xp.take_along_axis(best_shift, keep, axis=1)],
                      xp.take_along_axis(best, keep, axis=1))


def log_likelihood(scores):
    """The score ``c/√n`` as a log-likelihood gain ``s·|s|/2`` (monotonic in ``s``): the unit in
    which log-priors are added."""
    return 0.5 * scores * abs(scores)


def subdivide(volume_ft, images_ft, ctf, noise_var_shell, levels: list[SearchLevel], params: SearchParams,
              start: Candidates, padding: int = DEFAULT_PADDING, prior=None, fused: bool = True) -> SearchResult:
    """Branch-and-bound subdivision from ``start`` (cells of ``levels[0]``) through ``levels[1:]``:
    8 rotation × 4 shift children per kept cell, scored at the level's cutoff, the best
    :func:`candidates_per_level` kept. Any start works: the global grid (:func:`global_start`),
    poses around a prior, symmetry mates.

    ``volume_ft`` from :func:`cryocv.projector.prepare_volume`; ``images_ft`` (B, N, N//2+1)
    raw half-plane FTs; ``ctf`` same shape or None; ``noise_var_shell`` (N//2+1,). ``prior``
    (e.g. :class:`cryocv.local_search.LocalPrior`): children are ranked by
    :func:`log_likelihood` + ``prior.rotation(R)`` + ``prior.shift(t)`` (−∞ outside bounds).
    ``fused``: score children with the fused GPU kernel (see :func:`subdivision_scores`)."""
    xp = get_array_module(volume_ft)
    n = images_ft.shape[-2]
    b = images_ft.shape[0]
    rotations, shifts, kept_scores = start.rotations, start.shifts_px, start.scores
    kept_per_level = candidates_per_level(len(levels), params)
    for level, previous, k in zip(levels[1:], levels[:-1], kept_per_level[1:]):
        points = frequency_points(n, level.cutoff_px, xp)
        terms = image_terms(images_ft, ctf, points, point_weights(points, noise_var_shell))
        rot_children = rotation_children(rotations, previous.rotation_step_rad)      # (B, K, 8, 3, 3)
        sh_children = shift_children(shifts, previous.shift_step_px)                # (B, K, 4, 2)
        kk = rotations.shape[1]
        child_scores = subdivision_scores(volume_ft, terms, points, rot_children, sh_children, padding,
                                          fused)                                      # (B, K, 4, 8)
        if prior is not None:
            child_scores = (log_likelihood(child_scores) + prior.shift(sh_children)[..., :, None]
                            + prior.rotation(rot_children)[:, :, None, :])
        shift_pick = xp.argmax(child_scores, axis=2)                                  # (B, K, 8)
        child_best = xp.max(child_scores, axis=2).reshape(b, kk * 8)
        keep = _top_k(child_best, k)
        rotations = rot_children.reshape(b, kk * 8, 3, 3)[xp.arange(b)[:, None], keep]
        pick = xp.take_along_axis(shift_pick.reshape(b, kk * 8), keep, axis=1)
        parent = keep // 8
        shifts = sh_children[xp.arange(b)[:, None], parent, pick]
        kept_scores = xp.take_along_axis(child_best, keep, axis=1)
    return SearchResult(rotations[:, 0], shifts[:, 0], kept_scores[:, 0])


def search_poses(volume_ft, images_ft, ctf, noise_var_shell, levels: list[SearchLevel], params: SearchParams,
                 base: BaseGrid | None = None, padding: int = DEFAULT_PADDING) -> SearchResult:
    """Global branch-and-bound search of a batch of images against one reference:
    :func:`global_start` then :func:`subdivide`. ``base`` caches the base level across batches."""
    if base is None:
        base = BaseGrid(volume_ft, images_ft.shape[-2], levels[0], params, padding)
    start = global_start(base, images_ft, ctf, noise_var_shell, candidates_per_level(len(levels), params)[0])
    return subdivide(volume_ft, images_ft, ctf, noise_var_shell, levels, params, start, padding)


def search_batch_size(box_size: int, levels: list[SearchLevel], params: SearchParams, base: BaseGrid,
                      budget_bytes: int, cpu: bool) -> int:
    """Images per batch so the search's largest temporaries fit ``budget_bytes`` (8 to 256 on
    the CPU, to 4096 on a GPU)."""
    kept = candidates_per_level(len(levels), params)
    # the largest, over subdivision levels, of candidates entering the level × Fourier points scored
    candidate_points = max([kept[i - 1] * int(frequency_points(box_size, levels[i].cutoff_px).kx.size)
                            for i in range(1, len(levels))] or [0])
    per_image = (4 * 3 * base.shifts.shape[0] * base.rotations.shape[0]   # base scores and temporaries
                 + 8 * 4 * 8 * candidate_points                       # child slices (+ stacked), |P|², products
                 + 8 * 3 * 4 * candidate_points                       # shifted image terms (+ stacked)
                 + 8 * 6 * box_size * (box_size // 2 + 1))           # FT, CTF, re-centred copies
    batch = int(budget_bytes // max(per_image, 1))
    return int(np.clip(batch, 8, 256 if cpu else 4096))
