"""Batches of particle data on the compute device: the one read → FT → CTF path of every job.

A :class:`ParticleSource` hands out :class:`Batch` es of one half-set: raw
(not re-centred) half-plane image FTs, CTFs and the metadata poses, on the
device of ``xp``. Image FTs are cached on the device when they fit the given
budget, else read from the stacks for every batch (streamed); :meth:`ParticleSource.prefetch`
reads the next batch's images in a background thread while the device works on this one, and
the host holds no more than those two batches of images. ``shard``
``(rank, n_ranks)`` restricts the source to a balanced share of each half-set,
so that several processes can split the particles between them.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import numpy as np

from tqdm.auto import tqdm

from .backend import free_device_memory, to_device
from .ctf import ctf_half_plane
from .fourier import ft2_centered, phase_shift_images
from .geometry import euler_to_matrix
from .particles import Particles


@dataclass
class Batch:
    """Particles ``index`` (B,) (positions in the source's :class:`Particles`), all of half-set
    ``half``, on one device: ``images_ft`` (B, N, N//2+1) complex64 raw image FTs (None for a
    metadata-only batch), ``ctf`` (B, N, N//2+1) float32 or None, ``rotations`` (B, 3, 3) float32
    metadata poses (None without poses), ``origin_px`` (B, 2) float32 metadata origins. ``half``
    is 0 for a batch of mixed half-sets."""

    index: np.ndarray
    half: int
    images_ft: object
    ctf: object
    rotations: object
    origin_px: object

    def __len__(self) -> int:
        return int(self.index.size)

    def recentred_ft(self, shifts_px):
        """Image FTs re-centred by +``shifts_px`` (B, 2)."""
        return phase_shift_images(self.images_ft, shifts_px)


class ParticleSource:
    """Device batches of ``particles`` (see the module docstring).

    ``cache_budget_bytes``: device memory the image FTs may occupy (0: never cache);
    ``shard`` (rank, n_ranks): this process's share of each half-set."""

    def __init__(self, particles: Particles, xp, cache_budget_bytes: int = 0, shard: tuple = (0, 1)):
        rank, n_ranks = shard
        if not 0 <= rank < n_ranks:
            raise ValueError(f"shard {shard}: need 0 <= rank < n_ranks")
        self.particles = particles
        self.xp = xp
        self.shard = (rank, n_ranks)
        n = particles.box_size
        self.cache = (xp.empty((len(particles), n, n // 2 + 1), dtype=xp.complex64)
                      if 0 < self.ft_bytes <= cache_budget_bytes else None)
        self.filled = np.zeros(len(particles), dtype=bool)
        self._reader = None      # one background thread reading images ahead
        self._pending = None     # (index, future) of the read under way
        self._ctf_matrix = particles.ctf.as_matrix() if particles.ctf is not None else None

    @property
    def ft_bytes(self) -> int:
        """Bytes of all image FTs as complex64."""
        n = self.particles.box_size
        return len(self.particles) * n * (n // 2 + 1) * 8

    @property
    def cached(self) -> bool:
        return self.cache is not None

    def members(self, half: int) -> np.ndarray:
        """Positions (sorted) of this shard's particles of half-set ``half``: the half-set split
        into ``n_ranks`` contiguous parts of equal size (±1), part ``rank``."""
        everyone = np.nonzero(self.particles.half_set == half)[0]
        rank, n_ranks = self.shard
        return np.array_split(everyone, n_ranks)[rank]

    def _unread(self, index: np.ndarray) -> np.ndarray:
        """Those of ``index`` whose images must come from disk."""
        return index if self.cache is None else index[~self.filled[index]]

    def prefetch(self, index: np.ndarray):
        """Start reading the images of particles ``index`` (the next batch) in the background."""
        unread = self._unread(index)
        if unread.size == 0:
            return
        if self._reader is None:
            self._reader = ThreadPoolExecutor(1, thread_name_prefix="cryocv-read")
        self._take_pending(None)
        self._pending = (unread.copy(), self._reader.submit(self.particles.read_images, unread))

    def _take_pending(self, index):
        """The prefetched images if they are those of ``index``; otherwise wait for the read under
        way (it may raise) and return None. Reads never run two at a time."""
        if self._pending is None:
            return None
        pending_index, future = self._pending
        self._pending = None
        images = future.result()
        return images if index is not None and np.array_equal(pending_index, index) else None

    def _read(self, index: np.ndarray):
        images = self._take_pending(index)
        return self.particles.read_images(index) if images is None else images

    def images_ft(self, index: np.ndarray):
        """Raw half-plane FTs (B, N, N//2+1) complex64 of particles ``index``, from the cache
        when there is one (filled on first use)."""
        xp = self.xp
        if self.cache is None:
            return ft2_centered(to_device(self._read(index), xp)).astype(xp.complex64)
        missing = self._unread(index)
        if missing.size:
            self.cache[to_device(missing, xp)] = ft2_centered(to_device(self._read(missing), xp)).astype(xp.complex64)
            self.filled[missing] = True
        return self.cache[to_device(index, xp)]

    def load(self, index: np.ndarray, half: int = 0, images: bool = True) -> Batch:
        """The :class:`Batch` of particles ``index`` (all of half-set ``half``); ``images=False``
        gives metadata only (CTF, poses, origins)."""
        xp, p = self.xp, self.particles
        ctf = (None if self._ctf_matrix is None
               else ctf_half_plane(to_device(self._ctf_matrix[index], xp), p.box_size, p.pixel_size_A))
        rotations = (to_device(euler_to_matrix(p.euler_deg[index]).astype(np.float32), xp) if p.has_alignment
                     else None)
        return Batch(index=index, half=half, images_ft=self.images_ft(index) if images else None, ctf=ctf,
                     rotations=rotations, origin_px=to_device(p.origin_px[index].astype(np.float32), xp))


def for_each_batch(source: ParticleSource, batch_size: int, work: Callable, done: Callable, progress: bool = True,
                   desc: str = "", log=print, read_stage: Callable = nullcontext) -> int:
    """The one batch loop of the jobs: for half-set 1, then 2, ``batch = source.load(...)`` (the next
    batch's images read in the background meanwhile), ``result = work(batch)``, then
    ``done(batch, result)``. A batch whose loading or ``work`` runs out of device memory is
    retried at half the size (``done`` is outside the retry: it must not allocate much).
    ``read_stage()`` is a context around the loading (e.g. a timer stage). → the final batch size."""
    xp = source.xp
    members = {h: source.members(h) for h in (1, 2)}
    bar = tqdm(total=sum(m.size for m in members.values()), desc=desc, unit="particle", disable=not progress,
               leave=False)
    for half in (1, 2):
        start = 0
        while start < members[half].size:
            sel = members[half][start:start + batch_size]
            try:
                with read_stage():
                    batch = source.load(sel, half)
                    following = members[half][start + sel.size:start + sel.size + batch_size]
                    source.prefetch(following if following.size or half == 2 else members[2][:batch_size])
                result = work(batch)
            except MemoryError as exc:  # cupy's OutOfMemoryError is a MemoryError
                if batch_size <= 1:
                    raise
                batch_size = max(1, batch_size // 2)
                free_device_memory(xp)
                log(f"  device memory full ({type(exc).__name__}); batch size lowered to {batch_size}")
                continue
            done(batch, result)
            bar.update(sel.size)
            start += sel.size
    bar.close()
    return batch_size
