"""M-step accumulators: Σ CTF·X and Σ CTF² per half-set (and, for the NU regularizer, per
quarter-set inside each half-set) on the padded half-space Fourier grid.

Each image is inserted once per symmetry operator g at pose ``A·gᵀ`` (the slice of a
symmetric map at Aᵀk equals the one at g·Aᵀk).
"""
from __future__ import annotations

import threading
import weakref

import numpy as np

from .backend import empty_pinned, free_device_memory, get_array_module, gpu_memory_bytes, is_cupy, to_device
from .projector import (DEFAULT_PADDING, FrequencyPoints, accumulators_to_map, divided_to_map, empty_accumulators,
                        insert_slices, weight_floor)


def insert_with_symmetry(accumulator, rotations, points: FrequencyPoints, values, weights, operators,
                         padding: int = DEFAULT_PADDING):
    """Insert a batch once per symmetry operator g at pose ``A·gᵀ`` into ``accumulator``
    (data, weight); ``rotations`` (B, 3, 3) on the accumulator's device, ``operators``
    (G, 3, 3) numpy; ``values``/``weights`` (B, M) at ``points``."""
    xp = get_array_module(rotations)
    for g in operators:
        rot_g = xp.matmul(rotations, xp.asarray(g.T.astype(np.float32)))
        insert_slices(*accumulator, rot_g, points, values, weights, padding)


class Accumulators:
    """(data, weight) grids keyed by (half, part): part 0 only, or parts 0/1 (quarter-sets)
    when ``quarters`` (n,) 0/1 labels per particle are given.

    ``operators`` (G, 3, 3) symmetry operators (numpy); ``xp`` the device's array module.
    With ``one_half_on_device`` only one half-set's grids live on the device at a time (the
    other's wait in host memory, page-locked on a GPU): a pass runs half-set 1, then 2, and the maps
    are formed one half-set at a time, so a large box (NU at box 512: four 6.4 GB grids) needs
    half the device memory for two host round trips per iteration. Half-set 1's grids are made
    at once (a search sizes its batches from the memory left), half-set 2's on first use."""

    def __init__(self, box_size: int, operators, xp, quarters: np.ndarray | None = None,
                 padding: int = DEFAULT_PADDING, one_half_on_device: bool = False):
        self.box_size = box_size
        self.operators = operators
        self.padding = padding
        self.quarters = quarters
        self.xp = xp
        self.one_half_on_device = one_half_on_device
        self.parts = (0, 1) if quarters is not None else (0,)
        self.grids = {}                  # (half, part) -> (data, weight) on the device
        self._host = {}                  # (half, part) -> (data, weight) moved to host memory
        # the host buffers go back to the free list when the accumulators go (next iteration's reuse them)
        weakref.finalize(self, _release_host_buffers, self._host, xp is not np)
        for h in ((1,) if one_half_on_device else (1, 2)):
            for q in self.parts:
                self.grids[(h, q)] = empty_accumulators(box_size, padding, xp)

    def _on_device(self, h: int, q: int):
        """(data, weight) of (half ``h``, part ``q``) on the device; with ``one_half_on_device``
        the other half-set's grids move to host memory first."""
        if (h, q) in self.grids:
            return self.grids[(h, q)]
        # one part at a time: the other half-set's part goes out, then this one's comes in and
        # hands its host buffers to the next part going out (a swap page-locks one part's worth
        # of new host memory, not a half-set's: ~0.8 s/GiB the first time)
        leaving = [k for k in self.grids if k[0] != h] if self.one_half_on_device else []
        for i, part in enumerate(self.parts):
            if i < len(leaving):
                self._host[leaving[i]] = tuple(_to_host(a) for a in self.grids.pop(leaving[i]))
                free_device_memory(self.xp)
            if (h, part) in self._host:
                host = self._host.pop((h, part))
                self.grids[(h, part)] = tuple(to_device(a, self.xp) for a in host)
                if self.xp is not np:       # (on the CPU the "device" grids are these very arrays)
                    self.xp.cuda.Device().synchronize()      # the copies have left the buffers
                    _release_host_buffers({(h, part): host}, True)
            else:
                self.grids[(h, part)] = empty_accumulators(self.box_size, self.padding, self.xp)
        return self.grids[(h, q)]

    def resident_first(self) -> tuple:
        """Half-sets in the order that needs the fewest host round trips (the one on the device first)."""
        return (2, 1) if (2, 0) in self.grids and (1, 0) not in self.grids else (1, 2)

    def insert(self, half: int, index: np.ndarray, rotations, points: FrequencyPoints, values, weights):
        """Insert images of half-set ``half`` (particle positions ``index`` (B,)) at ``rotations``
        (B, 3, 3) with ``values``/``weights`` (B, M) at ``points``."""
        if self.quarters is None:
            insert_with_symmetry(self._on_device(half, 0), rotations, points, values, weights, self.operators,
                                 self.padding)
            return
        xp = get_array_module(rotations)
        for q in (0, 1):
            in_q = self.quarters[index] == q
            if in_q.any():
                idx = to_device(np.nonzero(in_q)[0], xp)
                insert_with_symmetry(self._on_device(half, q), rotations[idx], points, values[idx], weights[idx],
                                     self.operators, self.padding)

    def half(self, h: int):
        """(data, weight) of half-set ``h``, summed over its parts."""
        if self.quarters is None:
            return self._on_device(h, 0)
        (da, wa), (db, wb) = self._on_device(h, 0), self._on_device(h, 1)
        return da + db, wa + wb

    def half_map(self, h: int, regularization=None):
        """Map (N, N, N) of half-set ``h`` (see :func:`cryocv.projector.accumulators_to_map`); with
        quarters the half-set's sums are formed once and divided in place, so a large box needs
        one data grid and one weight grid beyond the accumulators, and the weight is freed before
        the inverse FFT."""
        if self.quarters is None:
            return accumulators_to_map(*self._on_device(h, 0), self.box_size, regularization, self.padding)
        weight = self.half_weight(h)
        weight += weight_floor(weight) if regularization is None else regularization
        data = self._on_device(h, 0)[0] + self._on_device(h, 1)[0]
        data /= weight
        weight = None
        return divided_to_map(data, self.box_size, self.padding)

    def half_weight(self, h: int):
        """Σ CTF² of half-set ``h`` (the weight grid of :meth:`half`)."""
        if self.quarters is None:
            return self._on_device(h, 0)[1]
        return self._on_device(h, 0)[1] + self._on_device(h, 1)[1]

    def quarter(self, h: int, q: int):
        """(data, weight) of quarter-set ``q`` of half-set ``h`` (only with quarters)."""
        return self._on_device(h, q)

    def half_maps(self):
        """Unregularized half-maps [1, 2] (N, N, N) float32."""
        maps = {h: self.half_map(h) for h in self.resident_first()}
        return [maps[1], maps[2]]


_FREE_HOST_BUFFERS: dict = {}           # (shape, dtype, pinned) -> [host arrays no longer in use]
_HOST_BUFFERS_LOCK = threading.Lock()


def _to_host(array):
    """A device array copied to host memory: into a buffer of exactly its size, page-locked on a
    GPU (the copies run at full bus speed), taken from the arrays earlier accumulators released
    (page-locking costs ~0.8 s/GiB the first time; CuPy's pinned pool would round each grid up to
    a power of two: 8 GiB for a 4.3 GB box-512 grid)."""
    pinned = is_cupy(array)
    with _HOST_BUFFERS_LOCK:
        free = _FREE_HOST_BUFFERS.get(_buffer_key(array, pinned))
        host = free.pop() if free else None
    if host is None:
        host = empty_pinned(array.shape, array.dtype, get_array_module(array))
    if pinned:
        array.get(out=host)
    else:
        host[...] = array
    return host


def _release_host_buffers(host: dict, pinned: bool):
    """Return the host arrays of ``host`` {key: (data, weight)} (page-locked ones if ``pinned``)
    to the free list; ``host`` is emptied."""
    with _HOST_BUFFERS_LOCK:
        for arrays in host.values():
            for array in arrays:
                _FREE_HOST_BUFFERS.setdefault(_buffer_key(array, pinned), []).append(array)
        host.clear()


def _buffer_key(array, pinned: bool) -> tuple:
    """Which free host buffers can hold ``array``: same shape and dtype, page-locked or not."""
    return tuple(array.shape), np.dtype(array.dtype).str, pinned


def map_stage_device_bytes(box_size: int, nu: bool, padding: int = DEFAULT_PADDING,
                           one_half_on_device: bool = False) -> int:
    """Device bytes a refinement iteration holds besides images and search work: the
    accumulators (2 or, for NU, 4 grids of complex data + weight; half of them with
    ``one_half_on_device``), one prepared reference and the working grids of forming a map (a
    half-set sum, an inverse FFT and its workspace)."""
    np_ = padding * box_size
    grid = np_ * np_ * (np_ // 2 + 1) * 4            # one float32 half-space grid
    grids = (4 if nu else 2) // (2 if one_half_on_device else 1)
    return (grids * 3 + 2 + 6) * grid


def keep_one_half_on_device(box_size: int, nu: bool, free_bytes: int, padding: int = DEFAULT_PADDING) -> bool:
    """Should a job keep only one half-set's accumulators on the device? Yes on a GPU when all
    of them with the map stage would take more than 60% of the ``free_bytes`` (so the images and
    the search keep room); never on the CPU (``free_bytes`` 0)."""
    return free_bytes > 0 and map_stage_device_bytes(box_size, nu, padding) > 0.6 * free_bytes


def large_grids(box_size: int, xp, padding: int = DEFAULT_PADDING) -> bool:
    """Are a job's padded grids large for its GPU (an NU map stage, :func:`map_stage_device_bytes`,
    over a quarter of the memory cryocv may use: box 512 on cards up to ~160 GiB, box 256 on cards
    under ~20 GiB)? Then cached device memory and FFT plans go back between stages; below, keeping
    them saves re-allocation and plan creation every iteration (box 256 on an H200: ~0.3 s per
    iteration). False for a job on the CPU (``xp`` numpy), which never touches the GPU here."""
    return xp is not np and map_stage_device_bytes(box_size, True, padding) > 0.25 * gpu_memory_bytes() > 0


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
