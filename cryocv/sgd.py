"""Stochastic gradient descent ab-initio of one half-set (Punjani, Rubinstein, Fleet & Brubaker,
Nat. Methods 14, 290 (2017)): minibatches drawn at random, each aligned to the current map
with the shared branch-and-bound search, then one preconditioned gradient step on the map.

Objective per half-set: ½ Σᵢ ‖Cᵢ·S(Aᵢ)·V̂ − Xᵢ‖² over the minibatch at its best poses, whose
gradient on the padded half-space grid is ``W·V̂ − D`` with ``D = Σ C·X`` and ``W = Σ C²`` the
minibatch's back-projected sums (:mod:`cryocv.accumulate`; the diagonal of the normal
operator, as RELION's gradient refinement uses it). Plain SGD stalls at high resolution
because that Hessian falls steeply with frequency; a diagonal preconditioner fixes much of
it (Toader, Brubaker & Lederman, Acta Cryst. D 81 (2025)): here the running mean per Fourier
shell of the minibatches' ``W`` (radially symmetric, as a uniform pose distribution makes
it). The step is applied in real space with momentum, then non-negativity and a spherical
support are imposed.

Resolution marching uses the half-set's own data only (so the two half-sets stay
independent): alternate minibatches are added to two decaying running sums, and the FSC of
their two maps (a quarter-set FSC) says how far the half-set's data support the current poses.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .backend import get_array_module, to_numpy
from .fourier import (ft3_centered_padded, lowpass_map, per_shell_grid, radial_average, shift_volume,
                      trilinear_gridding_profile, zero_beyond_radius)
from .fsc import fsc_curve, resolution_at
from .masks import spherical_mask
from .projector import DEFAULT_PADDING, accumulators_to_map, divided_to_map, empty_accumulators
from .register import center_of_mass_px
from .search import Candidates, log_likelihood

HESSIAN_DECAY = 0.9        # running mean of the minibatch weight per shell: ~10 minibatches


def minibatch_size(iteration: int, n_iterations: int, start: int, end: int) -> int:
    """Images per minibatch: ``start`` growing linearly to ``end`` over the first two thirds."""
    ramp = min(1.0, iteration / max(1.0, 2 * n_iterations / 3))
    return int(round(start + (end - start) * ramp))


def learning_rate(iteration: int, initial: float, hold: int, final: float) -> float:
    """``initial`` for ``hold`` iterations, then decaying as hold/iteration, never below ``final``."""
    if iteration < hold:
        return initial
    return max(final, initial * hold / max(iteration, 1))


def temperature(iteration: int, initial: float, anneal_iterations: int) -> float:
    """Sampling temperature of the stochastic E-step: ``initial`` falling linearly to 0 (argmax)
    over ``anneal_iterations``."""
    if anneal_iterations <= 0:
        return 0.0
    return max(0.0, initial * (1 - iteration / anneal_iterations))


def sample_start(candidates: Candidates, uniform, temperature_: float) -> Candidates:
    """One start cell per image drawn among ``candidates`` (B, K) with probability ∝
    exp(ℓ/T), ℓ = :func:`cryocv.search.log_likelihood` of the score (T = 1: the posterior
    over the kept cells), ``uniform`` (B,) draws in [0, 1) on the device. A stochastic E-step
    (Monte-Carlo EM) that lets the first SGD iterations leave a wrong minimum, as the pose
    marginalization of Punjani et al. does; T = 0 keeps the best."""
    xp = get_array_module(candidates.scores)
    b = candidates.scores.shape[0]
    if temperature_ <= 0:
        pick = xp.zeros(b, dtype=xp.int64)
    else:
        ll = log_likelihood(candidates.scores.astype(xp.float64)) / temperature_
        p = xp.exp(ll - ll.max(axis=1, keepdims=True))
        cdf = xp.cumsum(p, axis=1) / p.sum(axis=1, keepdims=True)
        pick = xp.minimum((cdf < uniform[:, None]).sum(axis=1), candidates.scores.shape[1] - 1)
    rows = xp.arange(b)
    return Candidates(candidates.rotations[rows, pick][:, None], candidates.shifts_px[rows, pick][:, None],
                      candidates.scores[rows, pick][:, None])


def random_initial_volume(box_size: int, pixel_size_A: float, resolution_A: float, rng: np.random.Generator,
                          xp=np, radius_fraction: float = 0.35):
    """A random start: white noise inside a sphere of ``radius_fraction``·N, low-passed to
    ``resolution_A``, made non-negative, maximum 1 (N, N, N) float32 on ``xp``'s device."""
    noise = rng.standard_normal((box_size,) * 3).astype(np.float32)
    volume = xp.asarray(noise) * spherical_mask(box_size, radius_fraction * box_size, 4.0, xp)
    volume = xp.clip(lowpass_map(volume, pixel_size_A, resolution_A), 0, None)
    volume *= spherical_mask(box_size, radius_fraction * box_size, 4.0, xp)
    return (volume / max(float(volume.max()), 1e-12)).astype(xp.float32)


@dataclass
class HalfSetSGD:
    """The state of one half-set's SGD on one device: ``volume`` (N, N, N) float32 real map,
    ``velocity`` (momentum) like it, ``hessian_shell`` (Np//2+1,) running mean per padded shell
    of the minibatch weight per image (None before the first step), ``quarter_sums`` two
    (data, weight) padded grids of alternate minibatches (decaying), ``cutoff_A`` the current
    alignment and gradient resolution, ``steps`` the minibatches taken."""

    volume: object
    velocity: object
    hessian_shell: object
    quarter_sums: list
    cutoff_A: float
    steps: int = 0

    @classmethod
    def start(cls, volume, cutoff_A: float, padding: int = DEFAULT_PADDING) -> "HalfSetSGD":
        xp = get_array_module(volume)
        n = volume.shape[0]
        return cls(volume, xp.zeros_like(volume), None,
                   [empty_accumulators(n, padding, xp) for _ in range(2)], cutoff_A)


def preconditioned_step(volume, data, weight, hessian_shell, n_images: int, cutoff_px: float,
                        padding: int = DEFAULT_PADDING):
    """Real-space step (N, N, N) = −P·∇ of the minibatch objective, restricted to |k| ≤ ``cutoff_px``.

    ``data``/``weight`` the minibatch's padded sums (destroyed); ``hessian_shell`` per padded
    shell (Np//2+1,) the expected weight of one image; P = 1/(n·H + ε). The map as the
    back-projection sees it is FT(pad(V·g)) with g the trilinear gridding profile; the step
    goes back through :func:`cryocv.projector.divided_to_map` (÷ g), so a step of 1 from V
    lands on the minibatch's own reconstruction where it saw data."""
    xp = get_array_module(volume)
    n = volume.shape[0]
    np_ = padding * n
    seen = ft3_centered_padded(volume * trilinear_gridding_profile(n, np_, xp), np_)
    data -= weight * seen
    seen = None
    expected = n_images * hessian_shell
    floor = 1e-3 * float(xp.max(expected)) + 1e-30
    data *= per_shell_grid(1.0 / (expected + floor), np_)
    zero_beyond_radius(data, padding * cutoff_px)
    return divided_to_map(data.astype(xp.complex64, copy=False), n, padding)


def sgd_update(state: HalfSetSGD, data, weight, n_images: int, cutoff_px: float, rate: float, momentum: float,
               support, quarter_decay: float, padding: int = DEFAULT_PADDING):
    """One SGD step of ``state`` from a minibatch's padded sums ``data``/``weight`` (both
    destroyed): the sums go into the quarter running sums (alternate steps), the Hessian's
    running mean takes their shell means, then V ← max(0, V + v)·support with
    v ← momentum·v + rate·step."""
    xp = get_array_module(data)
    np_ = data.shape[0]
    part_data, part_weight = state.quarter_sums[state.steps % 2]
    part_data *= quarter_decay
    part_weight *= quarter_decay
    part_data += data
    part_weight += weight
    shell = radial_average(weight, None, np_ // 2 + 1) / max(n_images, 1)
    state.hessian_shell = (shell if state.hessian_shell is None
                           else HESSIAN_DECAY * state.hessian_shell + (1 - HESSIAN_DECAY) * shell)
    step = preconditioned_step(state.volume, data, weight, state.hessian_shell, n_images, cutoff_px, padding)
    state.velocity *= momentum
    state.velocity += rate * step
    state.volume = xp.clip(state.volume + state.velocity, 0, None) * support
    state.steps += 1


def quarter_resolution_A(state: HalfSetSGD, pixel_size_A: float, threshold: float = 0.143,
                         padding: int = DEFAULT_PADDING) -> tuple[float, np.ndarray]:
    """Resolution (Å) where the FSC of the two running quarter maps (inside a soft sphere)
    falls below ``threshold``, and that FSC curve."""
    n = state.volume.shape[0]
    xp = get_array_module(state.volume)
    sphere = spherical_mask(n, 0.45 * n, 4.0, xp)
    maps = [accumulators_to_map(d.copy(), w, n, padding=padding) * sphere for d, w in state.quarter_sums]
    curve = to_numpy(fsc_curve(maps[0], maps[1]))
    return float(resolution_at(curve, threshold, n, pixel_size_A)), curve


def recentre(state: HalfSetSGD) -> np.ndarray:
    """Move the map's centre of mass to the box centre (the poses follow at the next search);
    returns the shift applied (x, y, z px)."""
    xp = get_array_module(state.volume)
    shift = -center_of_mass_px(state.volume)
    if float(np.linalg.norm(shift)) >= 0.5:
        state.volume = xp.clip(shift_volume(state.volume, shift), 0, None)
        state.velocity = shift_volume(state.velocity, shift)
    return shift
