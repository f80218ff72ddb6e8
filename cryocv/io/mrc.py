"""MRC maps and image stacks through ``mrcfile`` (I/O returns numpy)."""
from __future__ import annotations

import os
import sys
import tempfile
import threading
import warnings
from contextlib import ExitStack, contextmanager

import mrcfile
import mrcfile.utils
import numpy as np

from ..errors import CryocvError


_UMASK_LOCK = threading.Lock()


def _current_umask() -> int:
    """The process's umask (reading it means setting it: one thread at a time, or a concurrent
    reader could see, and restore, 0)."""
    with _UMASK_LOCK:
        umask = os.umask(0)
        os.umask(umask)
    return umask


@contextmanager
def atomic_path(path: str):
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    base, ext = os.path.splitext(os.path.basename(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=f".tmp{ext}", dir=folder)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_current_umask())  # mkstemp creates 0600 files
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _open(path: str):
    if not os.path.exists(path):
        raise CryocvError(f"file not found: {path}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            if path.endswith(".gz") or path.endswith(".bz2"):
                return mrcfile.open(path, mode="r", permissive=True)
            return mrcfile.mmap(path, mode="r", permissive=True)
        except Exception as exc:  # mrcfile raises ValueError and others on bad files
            raise CryocvError(f"cannot read MRC file {path}: {exc}") from None


def read_map(path: str):
    """Read a 3D map → (float32 array [z, y, x], voxel size in Å or None if unset)."""
    with _open(path) as mrc:
        if mrc.data is None:
            raise CryocvError(_why_no_data(mrc, path))
        if mrc.data.ndim != 3:
            raise CryocvError(f"{path} is not a 3D map (shape {mrc.data.shape})")
        data = np.array(mrc.data, dtype=np.float32)
        voxel = float(mrc.voxel_size.x)
    if not np.isfinite(data).all():
        raise CryocvError(f"{path} contains NaN or infinite values")
    return data, (voxel if voxel > 0 else None)


def write_map(path: str, volume, voxel_size_A: float):
    """Write a 3D map atomically (float32, voxel size in the header, origin 0)."""
    data = np.ascontiguousarray(np.asarray(volume, dtype=np.float32))
    with atomic_path(path) as tmp:
        with mrcfile.new(tmp, overwrite=True) as mrc:
            mrc.set_data(data)
            mrc.voxel_size = float(voxel_size_A)


def write_stack(path: str, images, pixel_size_A: float):
    """Write an image stack (n, N, N) float32 atomically as an MRC image stack."""
    data = np.ascontiguousarray(np.asarray(images, dtype=np.float32))
    with atomic_path(path) as tmp:
        with mrcfile.new(tmp, overwrite=True) as mrc:
            mrc.set_data(data)
            mrc.set_image_stack()
            mrc.voxel_size = float(pixel_size_A)


def _why_no_data(mrc, path: str) -> str:
    """Why mrcfile found no data in ``path``: truncated (sizes) or not an image file."""
    try:
        header = mrc.header
        dtype = mrcfile.utils.data_dtype_from_header(header)
        nx, ny, nz = int(header.nx), int(header.ny), int(header.nz)
        expected = header.nbytes + int(header.nsymbt) + nx * ny * nz * dtype.itemsize
    except Exception:  # unknown mode or no header: not an MRC file
        return f"{path} is not an MRC image file (unreadable header)"
    actual = os.path.getsize(path)
    if actual < expected:
        return (f"{path} is truncated: its header promises {nz} images of {ny}×{nx} ({expected} bytes), "
                f"the file has {actual} bytes")
    return f"{path} holds no image data"


class StackCache:
    """MRC stacks opened lazily and kept open (at most ``max_open``).

    :meth:`read` copies images with positioned reads (``os.preadv``) straight into the
    caller's array, so reading a stack of any size holds only the images asked for in
    memory (pages of a memory map would count towards the process's resident memory, and a
    refinement reads every image); it is safe to call from a second thread."""

    def __init__(self, max_open: int = 64):
        self.max_open = max_open
        self._open = {}
        self._fds = {}
        self._busy = {}                 # path -> reads under way (never closed under a reader)
        self._lock = threading.RLock()

    def stack(self, path: str):
        """(n, N, N) memory-mapped view of the stack at ``path`` (for shapes and small reads)."""
        with self._lock:
            if path not in self._open:
                idle = [p for p in self._open if not self._busy.get(p)]
                if len(self._open) >= self.max_open and idle:
                    old = self._open.pop(idle[-1])
                    old.close()
                    if idle[-1] in self._fds:
                        os.close(self._fds.pop(idle[-1]))
                mrc = _open(path)
                data = mrc.data
                if data is None:
                    message = _why_no_data(mrc, path)
                    mrc.close()
                    raise CryocvError(message)
                self._open[path] = mrc
            data = self._open[path].data
        return data[None] if data.ndim == 2 else data

    def read(self, path: str, indices: np.ndarray, out: np.ndarray):
        """Copy images ``indices`` (k,) of the stack at ``path`` into ``out`` (k, N, N) float32, in
        that order. Runs of consecutive indices are read with one call each."""
        with self._lock:
            stack = self.stack(path)
            self._busy[path] = self._busy.get(path, 0) + 1
            if isinstance(stack, np.memmap) and path not in self._fds:
                self._fds[path] = os.open(path, os.O_RDONLY)
            fd = self._fds.get(path)
        try:
            self._read(stack, fd, path, indices, out)
        finally:
            with self._lock:
                self._busy[path] -= 1

    def _read(self, stack, fd, path: str, indices: np.ndarray, out: np.ndarray):
        offset = getattr(stack, "offset", None)
        if offset is None or not isinstance(stack, np.memmap):  # compressed stacks are read whole
            out[:] = stack[indices]
            return
        image_bytes = stack.dtype.itemsize * stack.shape[-2] * stack.shape[-1]
        order = np.argsort(indices, kind="stable")
        sorted_indices = indices[order]
        breaks = np.nonzero(np.diff(sorted_indices) != 1)[0] + 1
        for run_positions, run in zip(np.split(order, breaks), np.split(sorted_indices, breaks)):
            direct = (run_positions.size == out.shape[0] and out.dtype == stack.dtype and out.flags.c_contiguous
                      and np.array_equal(run_positions, np.arange(out.shape[0])))
            buffer = out if direct else np.empty((run.size,) + stack.shape[-2:], dtype=stack.dtype)
            wanted = buffer.nbytes
            view, start, got = memoryview(buffer).cast("B"), offset + int(run[0]) * image_bytes, 0
            while got < wanted:          # one call returns at most ~2 GiB (Linux), or less at the end of the file
                chunk = os.preadv(fd, [view[got:got + (1 << 30)]], start + got)
                if chunk <= 0:
                    break
                got += chunk
            if got != wanted:
                raise CryocvError(f"{path} is truncated: images {run[0] + 1}–{run[-1] + 1} need "
                                  f"{offset + (int(run[-1]) + 1) * image_bytes} bytes, the file has "
                                  f"{os.path.getsize(path)}")
            if not direct:
                out[run_positions] = buffer

    def close(self):
        for mrc in self._open.values():
            mrc.close()
        self._open.clear()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


class StackWriter:
    """An MRC image stack (n, N, N) float32 written in pieces, as a context manager: the file is
    created at full size under a temporary name (:func:`atomic_path`), :meth:`write` copies images
    to their positions with positioned writes (nothing but the images given is held in memory),
    and a successful exit writes the header statistics and renames it onto ``path``; an exception,
    or an image position never written, leaves no file named ``path``."""

    def __init__(self, path: str, n_images: int, box_size: int, pixel_size_A: float):
        self.path, self.shape, self.pixel_size_A = path, (int(n_images), int(box_size), int(box_size)), pixel_size_A
        self.written = np.zeros(int(n_images), dtype=bool)
        self._stats = [np.inf, -np.inf, 0.0, 0.0]     # min, max, sum, sum of squares

    def __enter__(self):
        self._exit = ExitStack()
        try:
            tmp = self._exit.enter_context(atomic_path(self.path))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self._mrc = mrcfile.new_mmap(tmp, shape=self.shape, mrc_mode=2, overwrite=True)
            self._exit.callback(self._mrc.close)
            self._mrc.set_image_stack()
            self._mrc.voxel_size = float(self.pixel_size_A)
            self._offset = int(self._mrc.data.offset)
            self._fd = os.open(tmp, os.O_WRONLY)
            self._exit.callback(os.close, self._fd)
        except BaseException:
            self._exit.__exit__(*sys.exc_info())
            raise
        return self

    def write(self, indices, images):
        """Write ``images`` (k, N, N) at stack positions ``indices`` (k,) (0-based)."""
        indices = np.asarray(indices, dtype=np.int64)
        images = np.ascontiguousarray(images, dtype=np.float32)
        if images.shape != (indices.size,) + self.shape[1:]:
            raise ValueError(f"images of shape {images.shape} for {indices.size} positions of a {self.shape} stack")
        image_bytes = images[0].nbytes if indices.size else 0
        order = np.argsort(indices, kind="stable")
        ordered = indices[order]
        breaks = np.nonzero(np.diff(ordered) != 1)[0] + 1
        for positions, run in zip(np.split(order, breaks), np.split(ordered, breaks)):
            if run.size == 0:
                continue
            block = np.ascontiguousarray(images[positions])
            view, at = memoryview(block).cast("B"), self._offset + int(run[0]) * image_bytes
            while len(view):
                done = os.pwrite(self._fd, view, at)
                view, at = view[done:], at + done
        self.written[indices] = True
        values = images.astype(np.float64)
        self._stats = [min(self._stats[0], float(values.min(initial=np.inf))),
                       max(self._stats[1], float(values.max(initial=-np.inf))),
                       self._stats[2] + float(values.sum()), self._stats[3] + float((values ** 2).sum())]

    def __exit__(self, exc_type, exc, traceback):
        try:
            if exc_type is None:
                if not self.written.all():
                    raise RuntimeError(f"{self.path}: image {int(np.argmin(self.written)) + 1} was never written")
                count = self.written.size * self.shape[1] * self.shape[2]
                mean = self._stats[2] / count
                header = self._mrc.header
                header.dmin, header.dmax, header.dmean = self._stats[0], self._stats[1], mean
                header.rms = np.sqrt(max(self._stats[3] / count - mean * mean, 0.0))
        except BaseException:
            self._exit.__exit__(*sys.exc_info())
            raise
        return self._exit.__exit__(exc_type, exc, traceback)
