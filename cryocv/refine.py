"""Gold-standard 3D refinement: E-step (branch-and-bound pose search), M-step
(back-projection into half-set accumulators), uniform or non-uniform regularization.

Each iteration makes one pass over the particles. Particles of half-set h are
aligned to half-map h only (gold standard); NU keeps two quarter accumulators
per half-set for its cross-validation. After the pass:

1. unregularized half-maps → FSC (masked with the previous dynamic mask);
2. uniform: Wiener term from that FSC; NU: per-voxel cutoffs from quarter-maps;
3. a new dynamic mask from the regularized half-maps' average; masked and
   phase-randomization-corrected FSC of the regularized half-maps → resolution;
4. the next alignment cutoff is that resolution plus a few Fourier shells.

Refinement stops when resolution and pose changes both stop improving (or at
``max_iterations``) and ends with one pass aligned to Nyquist.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from .backend import free_gpu_memory_bytes, get_array_module, to_device, to_numpy
from .ctf import ctf_half_plane
from .errors import CryocvError
from .fourier import ft2_centered, ft3_centered, half_volume_radius, ift3_centered, phase_shift_images
from .fsc import gold_standard_fsc
from .geometry import angular_distance_deg, euler_to_matrix, matrix_to_euler
from .io.mrc import read_map, write_map
from .masks import auto_threshold_mask, spherical_mask
from .particles import Particles
from .projector import (DEFAULT_PADDING, accumulators_to_map, empty_accumulators, extract_slices, frequency_points,
                        prepare_volume)
from .reconstruct import combine_half_maps, insert_with_symmetry
from .regularize import cutoff_map_A, nu_filter, wiener_regularization
from .search import BaseGrid, SearchParams, candidates_per_level, search_poses, search_schedule
from .symmetry import symmetry_operators


@dataclass
class RefineParams:
    """Settings of a refinement (angles in degrees, lengths in Å)."""

    regularizer: str = "nu"             # "nu" or "uniform"
    symmetry: str = "C1"
    initial_lowpass_A: float = 30.0
    max_iterations: int = 10            # iterations before the final pass to Nyquist
    min_iterations: int = 3
    base_step_deg: float = 15.0
    fine_step_deg: float = 0.5
    max_shift_A: float | None = None    # default: 10% of the box
    n_candidates: int = 4               # poses kept per image at the fine search levels
    n_base_candidates: int = 32         # kept after the base level (then halved per level)
    extra_shells: int = 4               # alignment uses the resolution shell + this many
    nu_cutoffs: int = 50
    nu_order: int = 8
    nu_awf: float = 3.0
    nu_half_map_noise: bool = True      # correct the CV loss for the quarter-maps' extra noise
    mask_threshold: float = 0.2
    batch_size: int | None = None       # default: from the memory budget
    seed: int = 0

    def validate(self):
        if self.regularizer not in ("nu", "uniform"):
            raise CryocvError(f"--regularizer must be nu or uniform, got {self.regularizer!r}")
        checks = [(self.initial_lowpass_A > 0, "--initial-lowpass-A must be positive"),
                  (self.max_iterations >= 1, "--max-iterations must be at least 1"),
                  (0 < self.fine_step_deg <= self.base_step_deg <= 60, "need 0 < fine step <= base step <= 60°"),
                  (self.max_shift_A is None or self.max_shift_A >= 0, "--max-shift-A must be >= 0"),
                  (self.n_candidates >= 1, "--candidates must be >= 1"),
                  (self.n_base_candidates >= 1, "--base-candidates must be >= 1"),
                  (self.nu_cutoffs >= 2, "--nu-cutoffs must be >= 2"),
                  (self.nu_order >= 1, "--nu-order must be >= 1"),
                  (self.nu_awf > 0, "--nu-awf must be positive"),
                  (self.batch_size is None or self.batch_size >= 1, "--batch-size must be >= 1")]
        for ok, message in checks:
            if not ok:
                raise CryocvError(message)

    def search_params(self, box_size: int, pixel_size_A: float) -> SearchParams:
        max_shift_A = 0.1 * box_size * pixel_size_A if self.max_shift_A is None else self.max_shift_A
        return SearchParams(base_step_deg=self.base_step_deg, fine_step_deg=self.fine_step_deg,
                            max_shift_px=max_shift_A / pixel_size_A, n_candidates=self.n_candidates,
                            n_base_candidates=self.n_base_candidates)


@dataclass
class RefineState:
    """What a checkpoint holds: the references and poses after ``iteration``."""

    iteration: int
    references: list                     # two (N, N, N) float32 numpy: regularized half-maps (next references)
    mask: np.ndarray | None              # dynamic mask (N, N, N) or None
    resolution_A: float
    euler_deg: np.ndarray | None         # (n, 3) current poses (None before the first pass)
    origin_A: np.ndarray | None          # (n, 2)
    noise_var_shell: np.ndarray | None   # (N//2+1,)
    history: list = field(default_factory=list)
    converged: bool = False
    final_done: bool = False


def lowpass_map(volume, pixel_size_A: float, resolution_A: float, edge_shells: float = 2.0):
    """Low-pass a map to ``resolution_A`` with a raised-cosine edge of ``edge_shells`` shells."""
    xp = get_array_module(volume)
    n = volume.shape[0]
    cutoff = n * pixel_size_A / resolution_A
    radius = half_volume_radius(n, xp)
    t = xp.clip((radius - cutoff) / edge_shells + 0.5, 0, 1)
    profile = 0.5 * (1 + xp.cos(np.pi * t))
    return ift3_centered(ft3_centered(volume.astype(xp.float32)) * profile, n).astype(xp.float32)


# ------------------------------------------------------------------------------------------- images
class ImageSource:
    """Raw half-plane image FTs (B, N, N//2+1) on the device, cached there when they fit."""

    def __init__(self, particles: Particles, xp, cache_budget_bytes: int):
        self.particles = particles
        self.xp = xp
        n = particles.box_size
        need = len(particles) * n * (n // 2 + 1) * 8
        self.cache = xp.empty((len(particles), n, n // 2 + 1), dtype=xp.complex64) if need <= cache_budget_bytes else None
        self.filled = np.zeros(len(particles), dtype=bool)

    @property
    def cached(self) -> bool:
        return self.cache is not None

    def get(self, index: np.ndarray):
        xp = self.xp
        if self.cache is None:
            return ft2_centered(to_device(self.particles.read_images(index), xp)).astype(xp.complex64)
        missing = index[~self.filled[index]]
        if missing.size:
            self.cache[to_device(missing, xp)] = ft2_centered(
                to_device(self.particles.read_images(missing), xp)).astype(xp.complex64)
            self.filled[missing] = True
        return self.cache[to_device(index, xp)]


SEARCH_BUDGET_GPU_BYTES = 12 << 30


def memory_budget_bytes(xp) -> int:
    """Working-memory budget for the search's batches: 40% of free GPU memory capped at
    12 GiB (enough for full-size batches at box 256), or 1 GiB on the CPU."""
    return int(min(0.4 * free_gpu_memory_bytes(), SEARCH_BUDGET_GPU_BYTES)) if xp is not np else 1 << 30


def auto_batch_size(box_size: int, n_base_rotations: int, n_base_shifts: int, candidate_points: int,
                    budget_bytes: int, cpu: bool) -> int:
    """Images per batch so the search's largest temporaries fit ``budget_bytes``.

    ``candidate_points``: the largest, over subdivision levels, of candidates
    entering the level × Fourier points scored at it."""
    per_image = (4 * 3 * n_base_shifts * n_base_rotations            # base scores and temporaries
                 + 8 * 4 * 8 * candidate_points                       # child slices (+ stacked), |P|², products
                 + 8 * 3 * 4 * candidate_points                       # shifted image terms (+ stacked)
                 + 8 * 6 * box_size * (box_size // 2 + 1))           # FT, CTF, re-centred copies
    batch = int(budget_bytes // max(per_image, 1))
    return int(np.clip(batch, 8, 256 if cpu else 4096))


# ------------------------------------------------------------------------------------------- noise
def noise_spectrum_from_images(images_ft):
    """Per-shell mean |X|² (N//2+1,) of raw image FTs (the first iteration's noise model)."""
    xp = get_array_module(images_ft)
    n = images_ft.shape[-2]
    points = frequency_points(n, xp=xp)
    values = xp.abs(points.gather(images_ft)) ** 2
    return _shell_mean(values, points, n)


def _point_shells(points, n):
    xp = get_array_module(points.kx)
    return xp.minimum(xp.rint(xp.sqrt(points.kx ** 2 + points.ky ** 2)).astype(xp.int32), n // 2)


def _shell_sums(values, points, n):
    """Sums over images and points per shell and the point counts: ((N//2+1,), (N//2+1,))."""
    xp = get_array_module(values)
    shells = xp.broadcast_to(_point_shells(points, n), values.shape).ravel()
    sums = xp.bincount(shells, weights=values.ravel().astype(xp.float64), minlength=n // 2 + 1)
    return sums, xp.bincount(shells, minlength=n // 2 + 1).astype(xp.float64)


def _shell_mean(values, points, n):
    xp = get_array_module(values)
    sums, counts = _shell_sums(values, points, n)
    return (sums / xp.maximum(counts, 1)).astype(xp.float32)


# ------------------------------------------------------------------------------------------- one pass
@dataclass
class PassResult:
    rotations: np.ndarray               # (n, 3, 3)
    origin_px: np.ndarray               # (n, 2)
    scores: np.ndarray                  # (n,)
    noise_var_shell: np.ndarray
    accumulators: dict                  # (half, quarter) -> (data, weight) on the device
    seconds: float


def refinement_pass(particles: Particles, source: ImageSource, references: list, noise_var_shell: np.ndarray,
                    alignment_cutoff_px: float, params: RefineParams, quarters: np.ndarray, xp,
                    progress: bool = True, log=print, padding: int = DEFAULT_PADDING) -> PassResult:
    """E-step and M-step over all particles: search each against its half-map, insert at the best pose.

    ``references`` two (N, N, N) maps (already masked for alignment);
    ``quarters`` (n,) 0/1 quarter-set of each particle inside its half-set.
    """
    started = time.time()
    n = particles.box_size
    px = particles.pixel_size_A
    search = params.search_params(n, px)
    levels = search_schedule(n, alignment_cutoff_px, search)
    ops = symmetry_operators(params.symmetry)
    volumes = [prepare_volume(to_device(r, xp), padding) for r in references]
    bases = [BaseGrid(v, n, levels[0], search, padding) for v in volumes]
    noise = to_device(noise_var_shell.astype(np.float32), xp)
    points_full = frequency_points(n, xp=xp)
    accumulators = {(h, q): empty_accumulators(n, padding, xp) for h in (1, 2) for q in (0, 1)}
    noise_sums = xp.zeros(n // 2 + 1)
    noise_counts = xp.zeros(n // 2 + 1)
    rotations_out = np.zeros((len(particles), 3, 3), dtype=np.float32)
    origins_out = np.zeros((len(particles), 2), dtype=np.float32)
    scores_out = np.zeros(len(particles), dtype=np.float32)
    kept = candidates_per_level(len(levels), search)
    candidate_points = max([kept[i - 1] * int(frequency_points(n, levels[i].cutoff_px).kx.size)
                            for i in range(1, len(levels))] or [0])
    batch = params.batch_size or auto_batch_size(n, bases[0].rotations.shape[0], bases[0].shifts.shape[0],
                                                  candidate_points, memory_budget_bytes(xp), cpu=xp is np)
    ctf_all = particles.ctf.as_matrix() if particles.ctf is not None else None
    bar = tqdm(total=len(particles), desc="  aligning", unit="particle", disable=not progress, leave=False)
    for half in (1, 2):
        members = np.nonzero(particles.half_set == half)[0]
        start = 0
        while start < members.size:
            sel = members[start:start + batch]
            try:
                images_ft = source.get(sel)
                ctf = None if ctf_all is None else ctf_half_plane(to_device(ctf_all[sel], xp), n, px)
                found = search_poses(volumes[half - 1], images_ft, ctf, noise, levels, search,
                                     bases[half - 1], padding)
                x = points_full.gather(phase_shift_images(images_ft, found.shifts_px))
                c = (xp.ones(x.shape, dtype=xp.float32) if ctf is None else points_full.gather(ctf))
                values, weights = x * c, c * c
                residual_sums, residual_counts = _residual_power(volumes[half - 1], found.rotations, points_full,
                                                                 x, c, padding)
            except MemoryError as exc:  # cupy's OutOfMemoryError is a MemoryError
                if batch <= 1:
                    raise
                batch = max(1, batch // 2)
                _free_device_memory(xp)
                log(f"  device memory full ({type(exc).__name__}); batch size lowered to {batch}")
                continue
            noise_sums += residual_sums
            noise_counts += residual_counts
            for q in (0, 1):
                in_q = quarters[sel] == q
                if in_q.any():
                    idx = to_device(np.nonzero(in_q)[0], xp)
                    insert_with_symmetry(accumulators[(half, q)], found.rotations[idx], points_full, values[idx],
                                         weights[idx], ops, padding)
            rotations_out[sel] = to_numpy(found.rotations)
            origins_out[sel] = to_numpy(found.shifts_px)
            scores_out[sel] = to_numpy(found.scores)
            bar.update(sel.size)
            start += sel.size
    bar.close()
    new_noise = to_numpy(noise_sums / xp.maximum(noise_counts, 1)).astype(np.float32)
    new_noise[0] = new_noise[1] if new_noise.size > 1 else 1.0
    return PassResult(rotations_out, origins_out, scores_out, new_noise, accumulators, time.time() - started)


def _residual_power(volume_ft, rotations, points, x, ctf, padding):
    """Per-shell sums of |X − α·C·P|² at the chosen poses (α: per-image least-squares scale).

    ``x`` (B, M) re-centred image values and ``ctf`` (B, M) at ``points``."""
    xp = get_array_module(volume_ft)
    model = ctf * extract_slices(volume_ft, rotations, points, padding)                 # C·P (B, M)
    cross = xp.sum(xp.real(x * xp.conj(model)), axis=1)
    power = xp.sum(model.real ** 2 + model.imag ** 2, axis=1)
    alpha = cross / xp.maximum(power, 1e-30)
    return _shell_sums(xp.abs(x - alpha[:, None] * model) ** 2, points, points.box_size)


def _free_device_memory(xp):
    if xp is not np:
        xp.get_default_memory_pool().free_all_blocks()


# ------------------------------------------------------------------------------------------- maps
@dataclass
class MapResult:
    """Maps of one iteration, on the device.

    The gold-standard FSC is measured on the *unfiltered* half-maps (as RELION's
    ``_unfil`` maps): a filter that suppresses noise shells also lets the real-space
    window's spread of shared low-resolution content dominate those shells and
    inflates their FSC.
    """

    references: list            # two regularized half-maps (uniform: Wiener; NU: space-varying filter)
    half_maps: list             # two unfiltered half-maps
    mask: object                # dynamic mask from the references' average (None if empty)
    report: dict                # gold-standard FSC of the unfiltered half-maps, masked and corrected
    full_map: object            # FSC-weighted average of the unfiltered half-maps
    nu_filtered_map: object     # NU: average of the NU-filtered half-maps (locally low-passed), else None
    cutoff_A: np.ndarray | None  # NU: chosen cutoff per voxel (Å), mean of the two halves in frequency


def regularize_and_assess(accumulators: dict, box_size: int, pixel_size_A: float, previous_mask,
                          params: RefineParams, seed: int = 0, padding: int = DEFAULT_PADDING) -> MapResult:
    """Turn the pass's accumulators into regularized half-maps, a dynamic mask and an FSC report."""
    xp = get_array_module(accumulators[(1, 0)][0])
    halves = {}
    for h in (1, 2):
        (da, wa), (db, wb) = accumulators[(h, 0)], accumulators[(h, 1)]
        halves[h] = (da + db, wa + wb)
    raw = [accumulators_to_map(*halves[h], box_size, padding=padding) for h in (1, 2)]
    mask = None if previous_mask is None else to_device(previous_mask, xp)
    raw_report = gold_standard_fsc(raw[0], raw[1], pixel_size_A, mask=mask, seed=seed)
    fsc = np.asarray(raw_report.get("fsc_corrected", raw_report["fsc_unmasked"]))
    # σ²/τ² per shell: a property of the data and the signal, shared by a half-set and its quarters
    terms = {h: wiener_regularization(halves[h][1], fsc, box_size, padding) for h in (1, 2)}
    regularized = [accumulators_to_map(*halves[h], box_size, padding=padding, regularization=terms[h])
                   for h in (1, 2)]
    cutoff_A = None
    if params.regularizer == "nu":
        cutoffs = []
        for h in (1, 2):
            qa, qb = (accumulators_to_map(*accumulators[(h, q)], box_size, padding=padding, regularization=terms[h])
                      for q in (0, 1))
            regularized[h - 1], cutoff = nu_filter(regularized[h - 1], qa, qb, params.nu_cutoffs, params.nu_order,
                                                   params.nu_awf, half_map_noise=params.nu_half_map_noise)
            cutoffs.append(cutoff)
        cutoff_A = cutoff_map_A((cutoffs[0] + cutoffs[1]) / 2, pixel_size_A)
    average = (regularized[0] + regularized[1]) / 2
    try:
        mask = auto_threshold_mask(average, pixel_size_A, params.mask_threshold)
    except ValueError:
        mask = None
    report = gold_standard_fsc(raw[0], raw[1], pixel_size_A, mask=mask, seed=seed)
    full = combine_half_maps(raw[0], raw[1], report.get("fsc_corrected", report["fsc_unmasked"]))
    nu_map = average if params.regularizer == "nu" else None
    return MapResult(regularized, raw, mask, report, full, nu_map, cutoff_A)


# ------------------------------------------------------------------------------------------- driver
def pose_change_deg(rotations_new, rotations_old, symmetry: str) -> np.ndarray:
    """Angle (n,) between poses, the smallest over the symmetry-equivalent old poses A·g."""
    ops = symmetry_operators(symmetry)
    return np.min([angular_distance_deg(rotations_new, rotations_old @ g) for g in ops], axis=0)


def quarter_split(half_set: np.ndarray, seed: int) -> np.ndarray:
    """Balanced random 0/1 quarter label inside each half-set (n,)."""
    rng = np.random.default_rng(seed + 7919)
    quarters = np.zeros(half_set.size, dtype=np.int8)
    for h in (1, 2):
        members = np.nonzero(half_set == h)[0]
        labels = (np.arange(members.size) % 2).astype(np.int8)
        rng.shuffle(labels)
        quarters[members] = labels
    return quarters


def alignment_cutoff_px(box_size: int, pixel_size_A: float, resolution_A: float, extra_shells: int) -> float:
    """Fourier radius (px) used for alignment: the resolution's shell plus ``extra_shells``."""
    return float(min(box_size / 2, box_size * pixel_size_A / resolution_A + extra_shells))


def convergence(history: list, params: RefineParams, final_step_deg: float) -> tuple[bool, str]:
    """Has refinement stopped improving? Returns (converged, reason for the log)."""
    if len(history) < max(params.min_iterations, 2):
        return False, ""
    last, previous = history[-1], history[-2]
    best_before = min(h["resolution_A"] for h in history[:-1])
    resolution_stalled = last["resolution_A"] > best_before * 0.99
    change, change_before = last.get("pose_change_median_deg"), previous.get("pose_change_median_deg")
    poses_stalled = (change is not None and change_before is not None
                     and (change >= 0.9 * change_before or change <= final_step_deg))
    if resolution_stalled and poses_stalled:
        poses = (f"median pose change {change:.2f}° is within the finest search step ({final_step_deg:.2f}°)"
                 if change <= final_step_deg else
                 f"pose changes stopped decreasing (median {change:.2f}° vs {change_before:.2f}°)")
        return True, (f"resolution improved by less than 1% ({last['resolution_A']:.2f} Å vs best "
                      f"{best_before:.2f} Å before) and {poses}")
    return False, ""


class CheckpointStore:
    """Per-iteration checkpoints in ``job_dir/iterations/iter_NNN`` and ``checkpoint.json`` (written last)."""

    def __init__(self, job_dir: str):
        self.job_dir = job_dir
        self.root = os.path.join(job_dir, "iterations")

    def folder(self, iteration: int) -> str:
        return os.path.join(self.root, f"iter_{iteration:03d}")

    def save(self, state: RefineState, maps: MapResult, pixel_size_A: float, half_set: np.ndarray, scores=None):
        """Write iteration ``state.iteration``: references, unfiltered half-maps, map, mask, FSC,
        NU cutoffs, poses; ``checkpoint.json`` last."""
        from .jobs import write_json
        folder = self.folder(state.iteration)
        os.makedirs(folder, exist_ok=True)
        for h in (1, 2):
            write_map(os.path.join(folder, f"reference_{h}.mrc"), state.references[h - 1], pixel_size_A)
            write_map(os.path.join(folder, f"half_map_{h}.mrc"), to_numpy(maps.half_maps[h - 1]), pixel_size_A)
        write_map(os.path.join(folder, "map.mrc"), to_numpy(maps.full_map), pixel_size_A)
        write_json(os.path.join(folder, "fsc.json"), maps.report)
        if state.mask is not None:
            write_map(os.path.join(folder, "mask.mrc"), state.mask, pixel_size_A)
        if maps.cutoff_A is not None:
            write_map(os.path.join(folder, "nu_cutoff_A.mrc"), maps.cutoff_A, pixel_size_A)
            write_map(os.path.join(folder, "map_nu_filtered.mrc"), to_numpy(maps.nu_filtered_map), pixel_size_A)
        poses = os.path.join(folder, "poses.npz")
        with open(poses + ".tmp", "wb") as handle:
            np.savez(handle, euler_deg=state.euler_deg, origin_A=state.origin_A, half_set=half_set,
                     noise_var_shell=state.noise_var_shell,
                     scores=np.zeros(0) if scores is None else scores)
        os.replace(poses + ".tmp", poses)
        write_json(os.path.join(folder, "state.json"), {
            "iteration": state.iteration, "resolution_A": state.resolution_A, "history": state.history,
            "converged": state.converged, "final_done": state.final_done, "has_mask": state.mask is not None})
        write_json(os.path.join(self.job_dir, "checkpoint.json"), {"iteration": state.iteration, "folder":
                                                                     os.path.relpath(folder, self.job_dir)})

    def load_latest(self) -> RefineState | None:
        path = os.path.join(self.job_dir, "checkpoint.json")
        if not os.path.isfile(path):
            return None
        with open(path) as handle:
            folder = os.path.join(self.job_dir, json.load(handle)["folder"])
        with open(os.path.join(folder, "state.json")) as handle:
            meta = json.load(handle)
        references = [read_map(os.path.join(folder, f"reference_{h}.mrc"))[0] for h in (1, 2)]
        mask = read_map(os.path.join(folder, "mask.mrc"))[0] if meta["has_mask"] else None
        poses = np.load(os.path.join(folder, "poses.npz"))
        return RefineState(iteration=meta["iteration"], references=references, mask=mask,
                           resolution_A=meta["resolution_A"], euler_deg=poses["euler_deg"],
                           origin_A=poses["origin_A"], noise_var_shell=poses["noise_var_shell"],
                           history=meta["history"], converged=meta["converged"], final_done=meta["final_done"])


def initial_state(reference: np.ndarray, reference_pixel_A: float | None, particles: Particles,
                  params: RefineParams) -> RefineState:
    """Both half-references = the reference low-passed to ``initial_lowpass_A``."""
    n, px = particles.box_size, particles.pixel_size_A
    if reference.shape != (n, n, n):
        raise CryocvError(f"the reference is {reference.shape[0]} px but the particles are {n} px: "
                          f"resample one of them to match")
    if reference_pixel_A and abs(reference_pixel_A - px) > 0.01 * px:
        raise CryocvError(f"the reference's pixel size ({reference_pixel_A:.4f} Å) differs from the particles' "
                          f"({px:.4f} Å) by more than 1%")
    if not np.isfinite(reference).all() or float(np.abs(reference).max()) == 0:
        raise CryocvError("the reference map is empty or holds non-finite values")
    start = np.clip(lowpass_map(reference, px, max(params.initial_lowpass_A, 2 * px)), 0, None)
    # a coarse soft sphere instead of a dynamic mask before there are half-maps
    return RefineState(iteration=0, references=[start.copy(), start.copy()], mask=None,
                       resolution_A=max(params.initial_lowpass_A, 2 * px), euler_deg=None, origin_A=None,
                       noise_var_shell=None)


def refine(particles: Particles, state: RefineState, params: RefineParams, xp, store: CheckpointStore,
           progress: bool = True, log=print) -> tuple[RefineState, MapResult, PassResult]:
    """Run iterations from ``state`` until converged, then the final pass; checkpoint each."""
    n, px = particles.box_size, particles.pixel_size_A
    quarters = quarter_split(particles.half_set, params.seed)
    n_bytes = len(particles) * n * (n // 2 + 1) * 8
    cache_budget = int(0.3 * free_gpu_memory_bytes()) if xp is not np else 4 << 30
    source = ImageSource(particles, xp, cache_budget)
    log(f"  image FTs ({n_bytes / 2**30:.2f} GiB) {'cached on the device' if source.cached else 'streamed'}")
    if state.noise_var_shell is None:
        sample = np.sort(np.random.default_rng(params.seed).permutation(len(particles))[:1000])
        state.noise_var_shell = to_numpy(noise_spectrum_from_images(source.get(sample)))
    input_rotations = particles.rotations if particles.has_alignment else None
    search = params.search_params(n, px)
    maps = result = None
    while True:
        final = state.converged or state.iteration >= params.max_iterations
        iteration = state.iteration + 1
        cutoff = n / 2 if final else alignment_cutoff_px(n, px, state.resolution_A, params.extra_shells)
        levels = search_schedule(n, cutoff, search)
        align_mask = (to_device(state.mask, xp) if state.mask is not None
                      else spherical_mask(n, n / 2 - 4, 3.0, xp))
        references = [to_device(m, xp) * align_mask for m in state.references]
        log(f"iteration {iteration}{' (final pass, aligned to Nyquist)' if final else ''}: aligning to "
            f"{n * px / cutoff:.2f} Å, {len(levels)} search levels down to "
            f"{math.degrees(levels[-1].rotation_step_rad):.2f}°/{levels[-1].shift_step_px * px:.2f} Å")
        result = refinement_pass(particles, source, references, state.noise_var_shell, cutoff, params, quarters,
                                 xp, progress=progress, log=log)
        maps = regularize_and_assess(result.accumulators, n, px, state.mask, params, seed=params.seed)
        record = {"iteration": iteration, "final": final, "alignment_resolution_A": n * px / cutoff,
                  "resolution_A": maps.report["resolution_A"],
                  "resolution_unmasked_A": maps.report["resolution_unmasked_A"],
                  "pass_seconds": round(result.seconds, 2),
                  "particles_per_second": round(len(particles) / max(result.seconds, 1e-9), 1)}
        if state.euler_deg is not None:
            change = pose_change_deg(result.rotations, euler_to_matrix(state.euler_deg), params.symmetry)
            shift_change = np.linalg.norm(result.origin_px * px - state.origin_A, axis=1)
            record.update(pose_change_median_deg=float(np.median(change)),
                          shift_change_median_A=float(np.median(shift_change)))
        if input_rotations is not None:
            vs_input = pose_change_deg(result.rotations, input_rotations, params.symmetry)
            record["pose_change_vs_input_median_deg"] = float(np.median(vs_input))
        state = RefineState(iteration=iteration, references=[to_numpy(m) for m in maps.references],
                            mask=None if maps.mask is None else to_numpy(maps.mask),
                            resolution_A=maps.report["resolution_A"],
                            euler_deg=matrix_to_euler(result.rotations), origin_A=result.origin_px * px,
                            noise_var_shell=result.noise_var_shell, history=state.history + [record],
                            final_done=final)
        msg = (f"  resolution {record['resolution_A']:.2f} Å (unmasked {record['resolution_unmasked_A']:.2f} Å), "
               f"{record['particles_per_second']:.0f} particles/s")
        if "pose_change_median_deg" in record:
            msg += (f", median pose change {record['pose_change_median_deg']:.2f}°, "
                    f"shift {record['shift_change_median_A']:.2f} Å")
        log(msg)
        if not final:
            state.converged, reason = convergence(state.history, params, math.degrees(levels[-1].rotation_step_rad))
            if state.converged:
                log(f"  converged: {reason}")
            elif iteration >= params.max_iterations:
                log(f"  stopping at --max-iterations {params.max_iterations} without convergence")
        store.save(state, maps, px, particles.half_set, result.scores)
        if final:
            return state, maps, result
