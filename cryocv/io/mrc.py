"""MRC maps and image stacks through ``mrcfile`` (I/O returns numpy)."""
from __future__ import annotations

import os
import tempfile
import warnings
from contextlib import contextmanager

import mrcfile
import numpy as np

from ..errors import CryocvError


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
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600 files
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
        if mrc.data is None or mrc.data.ndim != 3:
            raise CryocvError(f"{path} is not a 3D map (shape {None if mrc.data is None else mrc.data.shape})")
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
            mrc.update_header_stats()


def write_stack(path: str, images, pixel_size_A: float):
    """Write an image stack (n, N, N) float32 atomically as an MRC image stack."""
    data = np.ascontiguousarray(np.asarray(images, dtype=np.float32))
    with atomic_path(path) as tmp:
        with mrcfile.new(tmp, overwrite=True) as mrc:
            mrc.set_data(data)
            mrc.set_image_stack()
            mrc.voxel_size = float(pixel_size_A)
            mrc.update_header_stats()


class StackCache:
    """Memory-mapped MRC stacks, opened lazily and kept open (at most ``max_open``)."""

    def __init__(self, max_open: int = 64):
        self.max_open = max_open
        self._open = {}

    def stack(self, path: str):
        """(n, N, N) memory-mapped view of the stack at ``path``."""
        if path not in self._open:
            if len(self._open) >= self.max_open:
                _, old = self._open.popitem()
                old.close()
            mrc = _open(path)
            data = mrc.data
            if data is None:
                raise CryocvError(f"{path} holds no image data")
            self._open[path] = mrc
        data = self._open[path].data
        return data[None] if data.ndim == 2 else data

    def close(self):
        for mrc in self._open.values():
            mrc.close()
        self._open.clear()
