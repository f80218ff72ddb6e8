"""One expectation-maximization pass over the particles: the loop every job shares.

For each half-set, batches from a :class:`~cryocv.source.ParticleSource` go through
``find_poses`` (the E-step: a global or local branch-and-bound search, or the given
poses for a plain reconstruction) and are inserted at the poses found into
:class:`~cryocv.accumulate.Accumulators` (the M-step sums). A batch that runs out of
device memory is retried at half the size. While the device works on a batch, the next
one's images are read from disk (when they are not cached). Optionally the residual power at the
chosen poses gives the next iteration's noise model.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .accumulate import Accumulators, large_grids
from .backend import StageTimer, free_device_memory, get_array_module, to_numpy
from .noise import residual_power, shell_mean
from .projector import DEFAULT_PADDING, frequency_points
from .search import SearchResult
from .source import Batch, ParticleSource, for_each_batch


class HalfReferences:
    """{half: prepared padded reference FT} made on first use, one half-set's on the device at a
    time (a pass runs half-set 1, then 2): at box 512 a padded reference FT is 4.3 GB.

    ``maps`` {half: real-space map (N, N, N) on the device}; ``prepare`` map → prepared FT."""

    def __init__(self, maps: dict, prepare: Callable):
        self.maps, self.prepare = maps, prepare
        self.half, self.volume = None, None

    def __getitem__(self, half: int):
        if half != self.half:
            self.volume = None
            xp = get_array_module(self.maps[half])
            release_search_texture(xp)                              # it holds the other half-set's reference
            if large_grids(self.maps[half].shape[0], xp):          # the other half-set's prepared grid goes first
                free_device_memory(xp)
            self.volume, self.half = self.prepare(self.maps[half]), half
        return self.volume


def release_search_texture(xp):
    """Free the texture the GPU search samples the last reference through
    (:func:`cryocv.kernels.volume_texture`), with that reference."""
    if xp is not np:
        from .kernels import release_texture
        release_texture()


@dataclass
class PassResult:
    """Per particle (rows of particles outside the source's shard stay 0): ``rotations``
    (n, 3, 3), ``origin_px`` (n, 2), ``scores`` (n,); ``noise_var_shell`` (N//2+1,) from the
    residuals (None without references); ``seconds`` of the pass; ``batch_size`` at its end;
    ``stage_seconds`` per stage (the device synchronized between stages)."""

    rotations: np.ndarray
    origin_px: np.ndarray
    scores: np.ndarray
    noise_var_shell: np.ndarray | None
    seconds: float
    batch_size: int
    stage_seconds: dict                 # {stage: seconds}: read + FT, pose search, back-projection, residual noise


def given_poses(batch: Batch) -> SearchResult:
    """E-step of a reconstruction: the poses and origins the metadata holds."""
    xp = get_array_module(batch.origin_px)
    return SearchResult(batch.rotations, batch.origin_px, xp.zeros(len(batch), dtype=xp.float32))


def em_pass(source: ParticleSource, find_poses: Callable[[Batch], SearchResult], accumulators: Accumulators,
            batch_size: int, references: dict | None = None, padding: int = DEFAULT_PADDING,
            progress: bool = True, log=print, desc: str = "  aligning") -> PassResult:
    """E+M over every batch of the source (half-set 1, then 2).

    ``find_poses(batch)`` → :class:`~cryocv.search.SearchResult` for the batch's images;
    ``references`` {half: prepared volume FT}: measure the residual noise against them."""
    started = time.time()
    xp, particles = source.xp, source.particles
    timer = StageTimer(xp)
    n = particles.box_size
    points = frequency_points(n, xp=xp)
    noise_sums = xp.zeros(n // 2 + 1)
    noise_counts = xp.zeros(n // 2 + 1)
    rotations_out = np.zeros((len(particles), 3, 3), dtype=np.float32)
    origins_out = np.zeros((len(particles), 2), dtype=np.float32)
    scores_out = np.zeros(len(particles), dtype=np.float32)

    def work(batch):
        with timer("pose search"):
            found = find_poses(batch)
        with timer("back-projection"):
            x = points.gather(batch.recentred_ft(found.shifts_px))
            c = xp.ones(x.shape, dtype=xp.float32) if batch.ctf is None else points.gather(batch.ctf)
        noise = None
        if references is not None:
            with timer("residual noise"):
                noise = residual_power(references[batch.half], found.rotations, points, x, c, padding)
        return found, x * c, c * c, noise

    def insert(batch, found, values, weights):
        if found.spread is None:
            accumulators.insert(batch.half, batch.index, found.rotations, points, values, weights)
            return
        spread = found.spread           # marginalization: each image at K poses, by weight
        c = None if batch.ctf is None else points.gather(batch.ctf)
        for k in range(spread.weights.shape[1]):
            w = spread.weights[:, k, None].astype(xp.float32)
            x = points.gather(batch.recentred_ft(spread.shifts_px[:, k]))
            accumulators.insert(batch.half, batch.index, spread.rotations[:, k], points,
                                (x if c is None else x * c) * w, weights * w)

    def done(batch, result):
        found, values, weights, noise = result
        if noise is not None:
            noise_sums[...] += noise[0]
            noise_counts[...] += noise[1]
        with timer("back-projection"):
            insert(batch, found, values, weights)
        rotations_out[batch.index] = to_numpy(found.rotations)
        origins_out[batch.index] = to_numpy(found.shifts_px)
        scores_out[batch.index] = to_numpy(found.scores)

    batch_size = for_each_batch(source, batch_size, work, done, progress, desc, log,
                                read_stage=lambda: timer("read + FT"))
    release_search_texture(xp)
    noise = None
    if references is not None:
        noise = to_numpy(shell_mean(noise_sums, noise_counts))
        noise[0] = noise[1] if noise.size > 1 else 1.0
    return PassResult(rotations_out, origins_out, scores_out, noise, time.time() - started, batch_size,
                      timer.rounded())
