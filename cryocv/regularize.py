"""Regularization of the M-step and the assessment of its maps.

Uniform (RELION's gold-standard scheme, Scheres & Chen, Nat. Methods 9, 853 (2012)):
from the FSC of the two unregularized half-maps, SNR(k) = FSC/(1 − FSC) per shell,
and each half-map is ``Σ C·X / (Σ C² + W̄(k)·(1 − FSC)/FSC)`` with W̄ the mean weight
of that shell (σ²/τ² in the units of the accumulators). Both halves share the
per-shell term; they share no data. The non-uniform regularizer
(:mod:`cryocv.nonuniform`) filters these Wiener half-maps locally.

After regularization: a dynamic mask from the regularized half-maps' average, the
masked and phase-randomization-corrected FSC of the *unfiltered* half-maps, and
the FSC-weighted full map.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .accumulate import Accumulators, large_grids
from .backend import StageTimer, free_device_memory, get_array_module, to_device, to_numpy
from .fourier import per_shell_grid, radial_average, rfft_radius_cycles
from .fsc import combine_half_maps, gold_standard_fsc
from .masks import auto_threshold_mask
from .nonuniform import NUParams, cutoff_map_A, nu_filter
from .projector import accumulators_to_map


def wiener_regularization(weight, fsc, box_size: int, padding: int):
    """Per-voxel term σ²/τ² = W̄(k)·(1 − FSC)/FSC on the padded half-space grid.

    ``weight`` (Np, Np, Np//2+1) accumulated Σ C²; ``fsc`` (N//2+1,) per image
    shell. Shells with FSC ≤ 0.001 get an effectively infinite term (zeroed).
    """
    xp = get_array_module(weight)
    np_ = padding * box_size
    mean_weight = to_numpy(radial_average(weight, None, np_ // 2 + 1))
    fsc = np.clip(np.asarray(fsc, dtype=np.float64), 1e-3, 0.999)
    ratio = (1 - fsc) / fsc
    image_shell = np.arange(np_ // 2 + 1) / padding
    ratio_padded = np.interp(image_shell, np.arange(fsc.size), ratio, right=1e12)
    table = np.append(ratio_padded * mean_weight, 1e30)     # the last entry: every shell beyond Nyquist
    return per_shell_grid(xp.asarray(table), np_, np.float32)


def join_low_resolution(maps, pixel_size_A: float, join_A: float):
    """Both half-maps with their Fourier components at resolutions of ``join_A`` and coarser replaced
    by the average of the two (RELION's ``--low_resol_join_halves``, 40 Å by default there): a common
    low-resolution frame for the two half-sets, which otherwise drift apart in a soft mode of the start
    (a small protein in a belt turns freely about the membrane normal at low resolution). Nothing finer
    than ``join_A`` is shared, so the FSC at the resolutions that matter stays gold-standard."""
    xp = get_array_module(maps[0])
    n = maps[0].shape[0]
    low = rfft_radius_cycles(n, xp) <= pixel_size_A / join_A
    fa, fb = xp.fft.rfftn(maps[0]), xp.fft.rfftn(maps[1])
    mean = (fa + fb) / 2
    return [xp.fft.irfftn(xp.where(low, mean, f), s=maps[0].shape, axes=(0, 1, 2)).astype(xp.float32) for f in (fa, fb)]


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


def regularize_and_assess(acc: Accumulators, pixel_size_A: float, previous_mask, nu: NUParams | None,
                          mask_threshold: float, seed: int = 0, timer: StageTimer | None = None,
                          make_mask=None, join_halves_A: float | None = None) -> MapResult:
    """Regularized half-maps (Wiener; then the NU filter when ``nu`` is given, which needs
    quarter-set accumulators), a dynamic mask at ``mask_threshold`` of the maximum, and the
    FSC report of the unfiltered half-maps (masked with ``previous_mask`` for the Wiener term).
    ``timer`` collects seconds per step; ``make_mask(average map)`` → mask replaces the dynamic
    mask (e.g. a user's static mask); ``join_halves_A``: the regularized half-maps (the next references)
    share their components at that resolution and coarser (:func:`join_low_resolution`)."""
    box_size, padding = acc.box_size, acc.padding
    xp = acc.xp
    timer = timer or StageTimer(xp)
    # half-set sums are formed one at a time where they are needed (NU: quarters added), to keep
    # the device memory of large boxes down; the half-set whose accumulators are on the device first
    with timer("maps: half-maps"):
        raw = acc.half_maps()
    with timer("maps: FSC"):
        mask = None if previous_mask is None else to_device(previous_mask, xp)
        raw_report = gold_standard_fsc(raw[0], raw[1], pixel_size_A, mask=mask, seed=seed)
    fsc = np.asarray(raw_report.get("fsc_corrected", raw_report["fsc_unmasked"]))
    regularized, cutoffs = [None, None], []
    for h in acc.resident_first():
        with timer("maps: half-maps"):
            # σ²/τ² per shell: a property of the data and the signal, shared by a half-set and its quarters
            term = wiener_regularization(acc.half_weight(h), fsc, box_size, padding)
            regularized[h - 1] = acc.half_map(h, term)
        if nu is not None:
            with timer("maps: half-maps"):
                qa, qb = (accumulators_to_map(*acc.quarter(h, q), box_size, padding=padding, regularization=term)
                          for q in (0, 1))
            with timer("maps: NU filter"):
                regularized[h - 1], cutoff = nu_filter(regularized[h - 1], qa, qb, nu.n_cutoffs, nu.order, nu.awf,
                                                       nu.smoothing_px, nu.half_map_noise, nu.max_window_fraction)
            cutoffs.append(cutoff)
            qa = qb = None
        term = None
        if large_grids(box_size, xp, padding):   # hand the temporaries back before the next half-set
            free_device_memory(xp)
    cutoff_A = cutoff_map_A((cutoffs[0] + cutoffs[1]) / 2, pixel_size_A) if nu is not None else None
    if join_halves_A:
        regularized = join_low_resolution(regularized, pixel_size_A, join_halves_A)
    average = (regularized[0] + regularized[1]) / 2
    with timer("maps: mask"):
        try:
            mask = (make_mask(average) if make_mask is not None
                    else auto_threshold_mask(average, pixel_size_A, mask_threshold))
        except ValueError:
            mask = None
    with timer("maps: FSC"):
        report = gold_standard_fsc(raw[0], raw[1], pixel_size_A, mask=mask, seed=seed)
        full = combine_half_maps(raw[0], raw[1], report.get("fsc_corrected", report["fsc_unmasked"]))
    return MapResult(regularized, raw, mask, report, full, average if nu is not None else None, cutoff_A)
