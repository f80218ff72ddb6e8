"""3D map alignment (rotation, shift, hand) and the transform of maps and poses it implies.

A :class:`MapTransform` ``(L, t)`` takes a map V to ``V'(x) = V(L·(x − t))`` (x, t in pixels
from the box centre, (x, y, z) order; L orthogonal: a rotation, or a rotation times the mirror
``M = diag(1, 1, −1)`` when the hand flips). In Fourier space ``F'(k) = e^{−2πi k·t/N} F(L·k)``.
The particles of V keep their images in V' with poses ``A' = A·L`` (det L = 1) or ``M·A·M·Q``
(``L = M·Q``, a flip) and origins ``o' = o + (A'·t)_xy`` (RELION's re-centre-by-+origin
convention): :func:`transform_poses`.

:func:`align_maps` registers a map to a reference as 3D alignment tools do (e.g. cryoSPARC's
align 3D, ASPIRE's ``align_BO``), here as an exhaustive search: both maps are centred on their
centres of mass, every rotation of an SO(3) grid (and, when allowed, its mirror) is scored by
the normalized correlation of the Fourier coefficients inside ``resolution_A``, the best few are
subdivided down to ``fine_step_deg`` (the branch-and-bound children of :mod:`cryocv.search`),
the shift is refined by a Fourier cross-correlation, and the result is polished by Gauss–Newton
least squares on the reference's exact Fourier coefficients (:func:`_polish_rigid`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .backend import get_array_module, to_device, to_numpy
from .fourier import fourier_crop, ft3_centered, ift3_centered, lowpass_map, shift_volume
from .geometry import axis_angle_to_matrix, euler_to_matrix, so3_grid
from .projector import DEFAULT_PADDING, prepare_volume, sample_volume_ft
from .search import rotation_children

MIRROR = np.diag([1.0, 1.0, -1.0])
_CHUNK_POINTS = 1 << 22          # rotations × points scored per chunk
LOCAL_PADDING = 4                # align_maps_locally: finer interpolation (see there)
LOCAL_MAX_BOX = 96               # align_maps_locally: maps cut down to at most this box
LOCAL_MIN_BOX = 48               # ... and at least this one


@dataclass
class MapTransform:
    """``matrix`` L (3, 3) orthogonal, ``shift_px`` t (3,) (x, y, z), ``score`` the normalized
    correlation it reached (nan if not from an alignment); see the module docstring."""

    matrix: np.ndarray
    shift_px: np.ndarray
    score: float = float("nan")

    @property
    def flips_hand(self) -> bool:
        return bool(np.linalg.det(self.matrix) < 0)

    @property
    def rotation_deg(self) -> float:
        """Angle of the rotation part (of M·L after a flip)."""
        rotation = MIRROR @ self.matrix if self.flips_hand else self.matrix
        return float(np.degrees(np.arccos(np.clip((np.trace(rotation) - 1) / 2, -1, 1))))

    def is_identity(self, max_deg: float = 0.25, max_px: float = 0.25) -> bool:
        return (not self.flips_hand and self.rotation_deg <= max_deg
                and float(np.linalg.norm(self.shift_px)) <= max_px)

    def as_dict(self) -> dict:
        return {"matrix": self.matrix.tolist(), "shift_px": self.shift_px.tolist(), "score": self.score,
                "flips_hand": self.flips_hand, "rotation_deg": self.rotation_deg}


def _grid_frequencies(box_size: int, xp):
    """Integer frequencies (kx, ky, kz) of the centred half-space grid (N, N, N//2+1), broadcastable."""
    k = xp.arange(box_size, dtype=xp.float32) - box_size // 2
    kx = xp.arange(box_size // 2 + 1, dtype=xp.float32)
    return kx[None, None, :], k[None, :, None], k[:, None, None]


def transform_volume(volume, transform: MapTransform, padding: int = DEFAULT_PADDING):
    """``V'(x) = V(L·(x − t))`` (N, N, N) float32, by trilinear sampling of the padded,
    gridding-corrected FT (as a projection samples it) and a phase ramp."""
    return _transformed_from_ft(prepare_volume(volume, padding), volume.shape[0], transform.matrix,
                                transform.shift_px, padding)


def _transformed_from_ft(volume_ft, box_size: int, matrix, shift_px, padding: int, centre_px=None):
    """:func:`transform_volume` of the map whose prepared FT is ``volume_ft`` (``centre_px``: that
    FT is of the map moved by −centre, as :func:`_rotation_scorer` centres it on its centre of mass)."""
    xp = get_array_module(volume_ft)
    values = _sample_transformed(volume_ft, *_grid_frequencies(box_size, xp), matrix, shift_px, padding, box_size,
                                 centre_px)
    return ift3_centered(values, box_size).astype(xp.float32)


def _sample_transformed(volume_ft, kx, ky, kz, matrix, shift_px, padding: int, box_size: int, centre_px=None):
    """``e^{−2πi k·t/N} F(L·k)`` (complex64) at frequencies ``k`` (arrays of one broadcast shape) of
    the map whose prepared FT (``padding``) is ``volume_ft``; with ``centre_px`` c that FT is of the
    map moved by −c, whose phase ``e^{−2πi (L·k)·c/N}`` is put back."""
    xp = get_array_module(volume_ft)
    q = [float(matrix[i, 0]) * kx + float(matrix[i, 1]) * ky + float(matrix[i, 2]) * kz for i in range(3)]
    phase = kx * float(shift_px[0]) + ky * float(shift_px[1]) + kz * float(shift_px[2])
    if centre_px is not None:
        phase = phase + q[0] * float(centre_px[0]) + q[1] * float(centre_px[1]) + q[2] * float(centre_px[2])
    values = sample_volume_ft(volume_ft, *(padding * v for v in q))
    return values * xp.exp((-2j * np.pi / box_size) * phase).astype(xp.complex64)


def transform_poses(rotations, origin_px, transform: MapTransform):
    """Poses (n, 3, 3) and origins (n, 2) px of particles of V, for ``V' = transform(V)``."""
    rotations = np.asarray(rotations, dtype=np.float64)
    L = transform.matrix
    if transform.flips_hand:
        new = MIRROR @ rotations @ MIRROR @ (MIRROR @ L)
    else:
        new = rotations @ L
    moved = new @ np.asarray(transform.shift_px, dtype=np.float64)
    return new, np.asarray(origin_px, dtype=np.float64) + moved[:, :2]


def center_of_mass_px(volume, floor_fraction: float = 0.05) -> np.ndarray:
    """Centre of mass (x, y, z) px from the box centre of the density above ``floor_fraction``
    of the maximum (faint noise spread over the box would pull it to the centre)."""
    xp = get_array_module(volume)
    n = volume.shape[0]
    floor = floor_fraction * float(volume.max())
    positive = xp.where(volume > floor, volume, 0).astype(xp.float64)
    total = float(positive.sum())
    if total <= 0:
        return np.zeros(3)
    c = xp.arange(n, dtype=xp.float64) - n // 2
    z = float((positive.sum(axis=(1, 2)) * c).sum()) / total
    y = float((positive.sum(axis=(0, 2)) * c).sum()) / total
    x = float((positive.sum(axis=(0, 1)) * c).sum()) / total
    return np.array([x, y, z])


def _ball_points(box_size: int, radius_px: float, xp):
    """Half-space integer frequencies (P,) kx, ky, kz with 0 < |k| <= radius, and their flat
    indices in the centred (N, N, N//2+1) grid."""
    kx, ky, kz = _grid_frequencies(box_size, xp)
    r2 = kx ** 2 + ky ** 2 + kz ** 2
    inside = ((r2 <= radius_px ** 2) & (r2 > 0)).ravel()
    flat = xp.nonzero(inside)[0]
    full = [xp.broadcast_to(a, (box_size, box_size, box_size // 2 + 1)).ravel()[flat] for a in (kx, ky, kz)]
    return full, flat


def _scores(reference_values, moving_ft, matrices, points, padding: int):
    """Normalized correlation (R,) of the reference's values (P,) with the moving map's FT
    sampled at ``L·k`` for each of ``matrices`` (R, 3, 3)."""
    xp = get_array_module(moving_ft)
    kx, ky, kz = points
    out = []
    ref_norm = float(xp.sqrt((xp.abs(reference_values) ** 2).sum()))
    step = max(1, _CHUNK_POINTS // max(1, kx.size))
    for start in range(0, matrices.shape[0], step):
        L = to_device(matrices[start:start + step].astype(np.float32), xp)
        q = [padding * (L[:, i, 0, None] * kx[None] + L[:, i, 1, None] * ky[None] + L[:, i, 2, None] * kz[None])
             for i in range(3)]
        values = sample_volume_ft(moving_ft, *q)
        cross = (reference_values[None].conj() * values).real.sum(axis=1)
        norm = xp.sqrt((xp.abs(values) ** 2).sum(axis=1)) * ref_norm
        out.append(to_numpy(cross / xp.maximum(norm, 1e-30)))
    return np.concatenate(out)


def _with_hand(rotations: np.ndarray, flips: np.ndarray) -> np.ndarray:
    """L = M^flip · Q per candidate."""
    return np.where(flips[:, None, None], MIRROR @ rotations, rotations)


def align_maps(reference, moving, pixel_size_A: float, resolution_A: float, allow_flip: bool = True,
               base_step_deg: float = 15.0, fine_step_deg: float = 0.5, n_kept: int = 8,
               keep_identity_within: float | None = None, padding: int = DEFAULT_PADDING) -> MapTransform:
    """The transform that brings ``moving`` onto ``reference`` (both (N, N, N), one array
    module): ``transform_volume(moving, T) ≈ reference``. Scored on Fourier coefficients
    finer than the box and coarser than ``resolution_A``; ``allow_flip`` also tries the mirror
    image (the hand is undetermined in ab-initio). ``keep_identity_within``: a rotation near
    the identity (searched locally) wins when its score is within this of the best, so maps
    already in register stay put (a symmetric map matches equally well at every symmetry mate).
    The grid's best is polished as in :func:`align_maps_locally` (:func:`_polish_rigid`): its
    normalized score favours interpolated samples, so on ab-initio's SGD maps (box 64, 9 Å) the grid
    returned the same (−0.75, 0.25, −0.75)° whatever known turn was applied, while the polish
    followed every turn and agreed with :func:`align_maps_locally` within 0.04°; on noisy copies in
    a support the grid erred by up to 0.58° per axis, polished 0.002–0.07° at noise 0.5× the map's
    SD (bench/results/abinitio_polish/). A polish that does not settle (e.g. noise filling the
    whole box) leaves the grid's result."""
    score, finish, polish = _rotation_scorer(reference, moving, pixel_size_A, resolution_A, padding)
    rotations = euler_to_matrix(so3_grid(base_step_deg))
    flips = np.zeros(rotations.shape[0], dtype=bool)
    if allow_flip:
        rotations, flips = np.concatenate([rotations, rotations]), np.repeat([False, True], rotations.shape[0])
    best = _subdivide(score, rotations, flips, score(rotations, flips), math.radians(base_step_deg), fine_step_deg,
                      n_kept)
    if keep_identity_within is not None:
        near = np.eye(3)[None]
        start_step = math.radians(4 * fine_step_deg)
        identity = _subdivide(score, near, np.zeros(1, dtype=bool), score(near, np.zeros(1, dtype=bool)), start_step,
                              fine_step_deg, n_kept)
        if identity[2] >= best[2] - keep_identity_within:
            best = identity
    return polish(finish(*best))


def align_maps_locally(reference, moving, pixel_size_A: float, resolution_A: float, max_deg: float = 8.0,
                       fine_step_deg: float = 0.125, n_kept: int = 8, padding: int = LOCAL_PADDING,
                       max_box: int = LOCAL_MAX_BOX) -> MapTransform:
    """:func:`align_maps` for maps already nearly in register (no flip): the rotation is searched
    only within about ``max_deg`` of the identity (per axis-angle component), by subdividing the
    identity's cell down to ``fine_step_deg``; then the shift, as there. Keeps the two half-sets
    of a refinement in one frame (their references drift apart by a few degrees when the
    particle's low-resolution shape leaves a rotation weakly determined).

    A fraction of a degree matters here, so the interpolation is made finer than the global
    search's: both maps are first cut down in Fourier space to the smallest box that holds
    ``resolution_A`` (at least :data:`LOCAL_MIN_BOX`, at most ``max_box``: coarser then; never
    more than the box) and padded ``padding``-fold. (With the default 2-fold padding, a map
    aligned to itself came out up to 1.3° off: the gridding-corrected samples at the identity's
    grid points score lower than interpolated ones nearby.) The grid's best is then polished by
    Gauss–Newton steps on the reference's exact coefficients (:func:`_polish_rigid`): even at
    4-fold padding the grid's normalized score favours interpolated samples, whose noise is
    smoothed (a late iteration's half-maps came out 0.45° apart, polished 0.05°; noisy copies of
    one map scatter 3–4× less polished: bench/results/small_membrane_dec04e/)."""
    n = reference.shape[0]
    size = max(LOCAL_MIN_BOX, 2 * math.ceil(n * pixel_size_A / resolution_A) + 16)
    size = min(size + size % 2, max_box)
    if size >= n:
        size = n                                  # no crop (an odd box stays odd)
    coarse_px = pixel_size_A * n / size
    resolution_A = max(resolution_A, coarse_px * size / (size / 2 - 3))
    score, finish, polish = _rotation_scorer(fourier_crop(reference, size), fourier_crop(moving, size), coarse_px,
                                             resolution_A, padding)
    identity, no_flip = np.eye(3)[None], np.zeros(1, dtype=bool)
    best = _subdivide(score, identity, no_flip, score(identity, no_flip), math.radians(2 * max_deg),
                      fine_step_deg, n_kept)
    fine = polish(finish(*best))
    return MapTransform(fine.matrix, fine.shift_px * (n / size), fine.score)


def _rotation_scorer(reference, moving, pixel_size_A: float, resolution_A: float, padding: int):
    """``score(rotations (R, 3, 3), flips (R,))`` → normalized correlations (R,) of the maps
    centred on their centres of mass (Fourier coefficients finer than the box, coarser than
    ``resolution_A``), ``finish(rotation, flip, score)`` → the :class:`MapTransform` with the
    shift that goes with it, refined by a Fourier cross-correlation, and ``polish(transform)`` →
    :func:`_polish_rigid` of it on the same coefficients."""
    xp = get_array_module(reference)
    n = reference.shape[0]
    radius = float(np.clip(n * pixel_size_A / resolution_A, 3.0, n / 2 - 1))
    c_ref, c_mov = center_of_mass_px(reference), center_of_mass_px(moving)
    ref_c = lowpass_map(shift_volume(reference.astype(xp.float32), -c_ref), pixel_size_A, n * pixel_size_A / radius)
    mov_c = shift_volume(moving.astype(xp.float32), -c_mov)
    points, flat = _ball_points(n, radius, xp)
    reference_values = ft3_centered(ref_c).ravel()[flat].astype(xp.complex64)
    moving_ft = prepare_volume(mov_c, padding)

    def score(rotations, flips):
        return _scores(reference_values, moving_ft, _with_hand(rotations, flips), points, padding)

    def finish(rotation, flip: bool, best_score: float) -> MapTransform:
        L = _with_hand(rotation[None], np.array([flip]))[0]
        # ref(x) ≈ mov_c(L·(x − c_ref)) = moving(L·(x − c_ref) + c_mov)  →  t = c_ref − Lᵀ·c_mov
        transform = MapTransform(L, c_ref - L.T @ c_mov, float(best_score))
        aligned = _transformed_from_ft(moving_ft, n, transform.matrix, transform.shift_px, padding, c_mov)
        transform.shift_px = transform.shift_px + _residual_shift(reference, aligned, pixel_size_A,
                                                                  n * pixel_size_A / radius)
        return transform

    def polish(transform: MapTransform) -> MapTransform:
        return _polish_rigid(reference, moving_ft, c_mov, radius, transform, padding)

    return score, finish, polish


POLISH_MAX_STEPS = 6              # Gauss–Newton steps at most (one sampling of the ball's coefficients each)
POLISH_CONVERGED = (1e-4, 1e-2)   # rad, px: a step smaller than this ends the polish (settled)
POLISH_MAX_CHANGE = (1.0, 1.0)    # deg (at least; 0.5/radius rad when larger), px of the box aligned:
                                  # a polish that moves further from the grid's best is not trusted


def _rigid_derivatives(volume, kx, ky, kz, flat):
    """Derivatives (6, P) complex128 of the half-space coefficients at ``flat`` of ``volume``
    (N, N, N), turned by a small angle about x, y, z (``∇F·(e_j × k)``) and shifted by a small
    distance along x, y, z (``−2πi k_j/N · F``), as :class:`MapTransform` moves a map."""
    xp = get_array_module(volume)
    n = volume.shape[0]
    ft = ft3_centered(volume).ravel()[flat]
    c = xp.arange(n, dtype=xp.float32) - n // 2
    gx, gy, gz = ((-2j * np.pi / n) * ft3_centered(volume * coord).ravel()[flat]
                  for coord in (c[None, None, :], c[None, :, None], c[:, None, None]))   # ∂F/∂k
    return xp.stack([gz * ky - gy * kz, gx * kz - gz * kx, gy * kx - gx * ky,
                     (-2j * np.pi / n) * kx * ft, (-2j * np.pi / n) * ky * ft,
                     (-2j * np.pi / n) * kz * ft]).astype(xp.complex128)


def _polish_rigid(reference, moving_ft, moving_centre_px, radius_px: float, transform: MapTransform,
                  padding: int) -> MapTransform:
    """``transform`` refined by Gauss–Newton least squares of ``F_ref(k) ≈ e^{−2πi k·t/N}
    F_mov(L·k)`` over the half-space coefficients ``0 < |k| ≤ radius_px`` (each standing for itself
    and its Friedel mate). The residual uses the reference's exact FFT; only the moving side is
    interpolated (as :func:`transform_volume` does: ``moving_ft`` is the prepared FT of the moving
    map centred on ``moving_centre_px``). The normal matrix pairs the reference's derivatives with
    those of the moving map at ``transform``: their noises are independent, so it is not inflated
    by noise power and the steps do not fall short on noisy maps (errors-in-variables). Returns
    ``transform`` unchanged when the steps have not settled within :data:`POLISH_MAX_STEPS` (a
    start outside the linear range) or end more than :data:`POLISH_MAX_CHANGE` from it.
    ``score``: the normalized correlation over those coefficients (unfiltered, about the box
    centre; the grid's score is over centred, low-passed maps)."""
    xp = get_array_module(reference)
    n = reference.shape[0]
    (kx, ky, kz), flat = _ball_points(n, radius_px, xp)
    weight = xp.where(kx > 0, 2.0, 1.0).astype(xp.float32)
    reference = reference.astype(xp.float32)
    ref = ft3_centered(reference).ravel()[flat]
    weighted = _rigid_derivatives(reference, kx, ky, kz, flat) * weight
    start = _rigid_derivatives(_transformed_from_ft(moving_ft, n, transform.matrix, transform.shift_px, padding,
                                                    moving_centre_px), kx, ky, kz, flat)
    normal = to_numpy((weighted.conj() @ start.T).real)                       # (6, 6)
    start = None

    def sampled(matrix, shift):          # the moving map's coefficients under (matrix, shift)
        return _sample_transformed(moving_ft, kx, ky, kz, matrix, shift, padding, n, moving_centre_px)

    matrix, shift = np.asarray(transform.matrix, dtype=np.float64), np.asarray(transform.shift_px, dtype=np.float64)
    converged = False
    for _ in range(POLISH_MAX_STEPS):
        gradient = to_numpy((weighted.conj() @ (ref - sampled(matrix, shift)).astype(xp.complex128)).real)
        try:
            step = np.linalg.solve(normal, gradient)
        except np.linalg.LinAlgError:
            return transform
        turn = axis_angle_to_matrix(step[:3])
        matrix, shift = matrix @ turn, step[3:] + turn.T @ shift     # V(L·L₂·(x − t₂ − L₂ᵀt))
        converged = np.linalg.norm(step[:3]) < POLISH_CONVERGED[0] and np.linalg.norm(step[3:]) < POLISH_CONVERGED[1]
        if converged:
            break
    change = np.arccos(np.clip((np.trace(transform.matrix.T @ matrix) - 1) / 2, -1, 1))
    max_turn = max(math.radians(POLISH_MAX_CHANGE[0]), 0.5 / radius_px)
    if not (converged and change <= max_turn and np.linalg.norm(shift - transform.shift_px) <= POLISH_MAX_CHANGE[1]):
        return transform             # steps that do not settle (out of the linear range), or went too far
    moved = sampled(matrix, shift)
    cross = float((weight * (ref.conj() * moved).real).sum())
    norm = float(xp.sqrt((weight * xp.abs(ref) ** 2).sum() * (weight * xp.abs(moved) ** 2).sum()))
    return MapTransform(matrix, shift, cross / max(norm, 1e-30))


def _subdivide(score, rotations, flips, scores, step: float, fine_step_deg: float, n_kept: int):
    """Keep the best ``n_kept``, add their 8 children (:func:`cryocv.search.rotation_children`),
    halve the step, until it reaches ``fine_step_deg``: (rotation, flip, score) of the best."""
    while True:
        keep = np.argsort(-scores)[:n_kept]
        rotations, flips, scores = rotations[keep], flips[keep], scores[keep]
        if math.degrees(step) <= fine_step_deg * (1 + 1e-6):
            return rotations[0], bool(flips[0]), float(scores[0])
        children = rotation_children(rotations, step).reshape(-1, 3, 3)
        child_flips = np.repeat(flips, 8)
        rotations = np.concatenate([rotations, children])
        flips = np.concatenate([flips, child_flips])
        scores = np.concatenate([scores, score(children, child_flips)])
        step /= 2


def _residual_shift(reference, aligned, pixel_size_A: float, resolution_A: float) -> np.ndarray:
    """Shift s (x, y, z px) maximizing Σ ref(x)·aligned(x − s) of the low-passed maps, with a
    parabolic sub-pixel step."""
    xp = get_array_module(reference)
    n = reference.shape[0]
    a = lowpass_map(reference, pixel_size_A, resolution_A)
    b = lowpass_map(aligned, pixel_size_A, resolution_A)
    cc = xp.fft.irfftn(xp.fft.rfftn(a) * xp.fft.rfftn(b).conj(), s=a.shape)
    cc = to_numpy(cc)
    peak = np.unravel_index(int(np.argmax(cc)), cc.shape)
    shift = []
    for axis in (2, 1, 0):                      # x, y, z
        i = peak[axis]
        at = [list(peak) for _ in range(3)]
        for j, d in enumerate((-1, 0, 1)):
            at[j][axis] = (i + d) % n
        ym, y0, yp = (cc[tuple(p)] for p in at)
        denominator = ym - 2 * y0 + yp
        frac = 0.5 * (ym - yp) / denominator if denominator < 0 else 0.0
        s = i if i < n // 2 else i - n
        shift.append(s + float(np.clip(frac, -0.5, 0.5)))
    return np.array(shift)
