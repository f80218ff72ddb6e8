"""Batches of particle data on the compute device: the one read → FT → CTF path of every job.

A :class:`ParticleSource` hands out :class:`Batch` es of one half-set: raw
(not re-centred) half-plane image FTs, CTFs and the metadata poses, on the
device of ``xp``. Image FTs are cached on the device when they fit the given
budget, else read from the stacks for every batch (streamed); :meth:`ParticleSource.prefetch`
reads the next batch's images in a background thread while the device works on this one, and
the host holds no more than those two batches of images. On the GPU they are read into two
page-locked buffers in turn, so their copy to the device needs no staging copy on the host and
does not hold up the thread that queues the device's work. ``shard``
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

from .backend import empty_pinned, free_device_memory, to_device, upload_async
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
        self._pending = None     # (index, future, pinned slot or None) of the read under way
        self._pinned = _PinnedSlots(xp, (n, n)) if xp is not np else None
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
        slot, out = self._pinned.claim(unread.size) if self._pinned is not None else (None, None)
        self._pending = (unread.copy(), self._reader.submit(self.particles.read_images, unread, out=out), slot)

    def _take_pending(self, index):
        """(images, pinned slot) prefetched if they are those of ``index``; otherwise wait for the
        read under way (it may raise) and return None. Reads never run two at a time."""
        if self._pending is None:
            return None
        pending_index, future, slot = self._pending
        self._pending = None
        images = future.result()
        return (images, slot) if index is not None and np.array_equal(pending_index, index) else None

    def _device_images(self, index: np.ndarray):
        """Images (B, N, N) float32 of ``index`` on the device, the prefetched ones if they are these."""
        pending = self._take_pending(index)
        if pending is None:
            return to_device(self.particles.read_images(index), self.xp)
        images, slot = pending
        if slot is None:
            return to_device(images, self.xp)
        return self._pinned.upload(slot, images)

    def images_ft(self, index: np.ndarray):
        """Raw half-plane FTs (B, N, N//2+1) complex64 of particles ``index``, from the cache
        when there is one (filled on first use)."""
        xp = self.xp
        if self.cache is None:
            return ft2_centered(self._device_images(index)).astype(xp.complex64, copy=False)
        missing = self._unread(index)
        if missing.size:
            self.cache[to_device(missing, xp)] = ft2_centered(self._device_images(missing)).astype(xp.complex64,
                                                                                                   copy=False)
            self.filled[missing] = True
            if self._pinned is not None and self.filled.all():     # every image on the device: no more reads
                self._pinned.release()
        return self.cache[to_device(index, xp)]

    def load(self, index: np.ndarray, half: int = 0, images: bool = True) -> Batch:
        """The :class:`Batch` of particles ``index`` (all of half-set ``half``); ``images=False``
        gives metadata only (CTF, poses, origins)."""
        xp, p = self.xp, self.particles
        columns = [p.origin_px[index]]                       # one copy to the device: origins, poses, CTF
        if p.has_alignment:
            columns.append(euler_to_matrix(p.euler_deg[index]).reshape(-1, 9))
        if self._ctf_matrix is not None:
            columns.append(self._ctf_matrix[index])
        metadata = to_device(np.concatenate(columns, axis=1).astype(np.float64, copy=False), xp)
        rotations = metadata[:, 2:11].astype(xp.float32).reshape(-1, 3, 3) if p.has_alignment else None
        ctf = (None if self._ctf_matrix is None
               else ctf_half_plane(xp.ascontiguousarray(metadata[:, -9:]), p.box_size, p.pixel_size_A))
        return Batch(index=index, half=half, images_ft=self.images_ft(index) if images else None, ctf=ctf,
                     rotations=rotations, origin_px=metadata[:, :2].astype(xp.float32))


class _PinnedSlots:
    """Two page-locked host buffers of images that the reader fills in turn (GPU only). Each
    upload from a buffer records an event; the buffer is handed out again only once that copy
    has completed. Buffers grow to the largest batch asked for."""

    def __init__(self, xp, image_shape: tuple):
        self.xp, self.image_shape = xp, image_shape
        self.buffers = [None, None]
        self.copied = [None, None]      # event after the last upload from each buffer
        self.turn = 0

    def claim(self, count: int):
        """(slot, view (count, N, N) float32) of the next buffer, free to be written."""
        slot, self.turn = self.turn, 1 - self.turn
        self._wait(slot)
        if self.buffers[slot] is None or self.buffers[slot].shape[0] < count:
            self.buffers[slot] = None
            self.buffers[slot] = empty_pinned((count,) + self.image_shape, np.float32, self.xp)
        return slot, self.buffers[slot][:count]

    def upload(self, slot: int, images: np.ndarray):
        """``images`` (a view of buffer ``slot``) copied to the device (queued; returns at once)."""
        device, self.copied[slot] = upload_async(images, self.xp)
        return device

    def _wait(self, slot: int):
        if self.copied[slot] is not None:
            self.copied[slot].synchronize()
            self.copied[slot] = None

    def release(self):
        """Drop both buffers once their copies have completed."""
        for slot in (0, 1):
            self._wait(slot)
        self.buffers = [None, None]


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
