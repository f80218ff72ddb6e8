"""Array-module helpers: one code path for numpy (CPU) and CuPy (GPU).

Math functions take ``xp`` from their inputs (``get_array_module``); I/O returns
numpy; jobs move data to the device with :func:`to_device`.
"""
from __future__ import annotations

import os
import time
from contextlib import contextmanager

import numpy as np

from .errors import CryocvError

try:  # CuPy is optional (extra ``[gpu]``)
    import cupy as _cupy  # type: ignore
except Exception:  # pragma: no cover - absent on CPU-only machines
    _cupy = None


def get_array_module(*arrays):
    """numpy or cupy, whichever holds ``arrays`` (numpy for plain Python values)."""
    if _cupy is not None:
        return _cupy.get_array_module(*arrays)
    return np


_CONSTANTS: dict = {}
_MAX_CONSTANTS = 256


def device_constant(array, xp):
    """A small read-only host array on ``xp``'s device, cached by value: the per-batch loops use
    the same few constants (child offsets, shift grids) and a copy from host memory would wait
    for everything queued on the device. Callers must not change it in place."""
    array = np.ascontiguousarray(array)
    if xp is np:
        return array
    key = (xp.cuda.Device().id, array.dtype.str, array.shape, array.tobytes())
    found = _CONSTANTS.pop(key, None)
    if found is None:
        found = xp.asarray(array)
        if len(_CONSTANTS) >= _MAX_CONSTANTS:
            _CONSTANTS.pop(next(iter(_CONSTANTS)))
    _CONSTANTS[key] = found                   # most recently used last
    return found


def gpu_available() -> bool:
    """True when CuPy imports and sees at least one CUDA device."""
    if _cupy is None or os.environ.get("CRYOCV_NO_GPU"):
        return False
    try:
        return _cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def resolve_xp(device: str = "auto"):
    """Array module for a device choice: 'cpu', 'gpu' or 'auto' (GPU when present)."""
    if device == "cpu":
        return np
    if device in ("gpu", "cuda"):
        if not gpu_available():
            raise CryocvError("--device gpu was asked for but no CUDA GPU is visible to CuPy")
        return _gpu_module()
    if device != "auto":
        raise CryocvError(f"unknown device {device!r} (use cpu, gpu or auto)")
    return _gpu_module() if gpu_available() else np


def _gpu_module():
    """CuPy, its memory pool capped at ``$CRYOCV_GPU_MEMORY_GIB`` when set."""
    limit = gpu_memory_limit_bytes()
    if limit is not None:
        _cupy.get_default_memory_pool().set_limit(size=limit)
    return _cupy


def to_device(array, xp):
    """Copy a numpy array to ``xp``'s device (no copy for numpy)."""
    if xp is np:
        return to_numpy(array)
    return xp.asarray(array)


def empty_pinned(shape, dtype, xp):
    """An uninitialized numpy array in page-locked host memory of exactly its size when ``xp`` is
    CuPy (outside CuPy's pinned pool, which rounds sizes up and never gives memory back; copies
    from it to the device run asynchronously, without a staging copy). Ordinary memory on the CPU,
    or where the system refuses to lock that much (slower copies, same results)."""
    if xp is np:
        return np.empty(shape, dtype=dtype)
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    try:
        memory = xp.cuda.PinnedMemoryPointer(xp.cuda.PinnedMemory(nbytes, xp.cuda.runtime.hostAllocPortable), 0)
    except xp.cuda.runtime.CUDARuntimeError:
        return np.empty(shape, dtype=dtype)
    return np.ndarray(shape, dtype=dtype, buffer=memory)


def upload_async(host: np.ndarray, xp):
    """``host`` copied to ``xp``'s device, queued on the current stream → (device array, event
    recorded after the copy, or None on the CPU). From page-locked memory (:func:`empty_pinned`)
    the call returns at once: ``host`` must stay unchanged until the event has completed."""
    if xp is np:
        return host, None
    device = xp.empty(host.shape, dtype=host.dtype)
    stream = xp.cuda.get_current_stream()
    device.set(host, stream=stream)
    return device, stream.record()


def to_numpy(array):
    """Return ``array`` as a numpy array (copies from the GPU when needed)."""
    if _cupy is not None and isinstance(array, _cupy.ndarray):
        return _cupy.asnumpy(array)
    return np.asarray(array)


# the pose search's image × slice products on a GPU: "fp32", or "tf32" (tensor cores;
# bench/results/search_roofline.md)
SCORE_PRODUCTS = os.environ.get("CRYOCV_GPU_PRODUCTS", "fp32")


@contextmanager
def score_products(xp):
    """Inside the block, float32 2-D matrix products on ``xp``'s GPU run as :data:`SCORE_PRODUCTS`
    says: "tf32" on the tensor cores (inputs rounded to 10-bit mantissas, float32 accumulation).
    CuPy's batched (> 2-D) products stay float32 either way. No effect on the CPU."""
    if xp is np or SCORE_PRODUCTS != "tf32":
        yield
        return
    from cupy._core import _routines_linalg as linalg  # noqa: PLC0415 - CuPy's compute-type switch
    previous = linalg.get_compute_type(np.float32)
    linalg.set_compute_type(np.float32, getattr(linalg, "COMPUTE_TYPE_TF32", 7))
    try:
        yield
    finally:
        linalg.set_compute_type(np.float32, previous)


def is_cupy(array) -> bool:
    return _cupy is not None and isinstance(array, _cupy.ndarray)


GPU_MEMORY_LIMIT_ENV = "CRYOCV_GPU_MEMORY_GIB"


def gpu_memory_limit_bytes() -> int | None:
    """The cap on cryocv's GPU memory from ``$CRYOCV_GPU_MEMORY_GIB`` (None: all the card has).
    Applied to CuPy's memory pool, so that a job sized for a smaller card, or sharing one, stays
    inside it."""
    value = os.environ.get(GPU_MEMORY_LIMIT_ENV)
    if not value:
        return None
    try:
        limit = float(value)
    except ValueError:
        raise CryocvError(f"${GPU_MEMORY_LIMIT_ENV} must be a number of GiB, got {value!r}") from None
    if limit <= 0:
        raise CryocvError(f"${GPU_MEMORY_LIMIT_ENV} must be positive, got {value!r}")
    return int(limit * 2**30)


def free_gpu_memory_bytes() -> int:
    """Free memory on the current GPU for cryocv (0 on CPU): the device's free memory plus
    CuPy's cached blocks, within ``$CRYOCV_GPU_MEMORY_GIB`` when set."""
    if not gpu_available():
        return 0
    pool = _cupy.get_default_memory_pool()
    free, _total = _cupy.cuda.runtime.memGetInfo()
    free = int(free + pool.free_bytes())
    limit = gpu_memory_limit_bytes()
    if limit is not None:
        pool.set_limit(size=limit)
        free = min(free, max(0, limit - pool.used_bytes()))
    return free


def gpu_memory_bytes() -> int:
    """Memory of the current GPU cryocv may use (0 on CPU): its total, within
    ``$CRYOCV_GPU_MEMORY_GIB`` when set."""
    if not gpu_available():
        return 0
    total = int(_cupy.cuda.runtime.memGetInfo()[1])
    limit = gpu_memory_limit_bytes()
    return total if limit is None else min(total, limit)


def free_device_memory(xp):
    """Return CuPy's cached blocks to the device, and the work areas its cached FFT plans hold
    (grid-sized at large boxes), (no-op on the CPU)."""
    if xp is not np:
        try:
            xp.fft.config.get_plan_cache().clear()
        except AttributeError:  # pragma: no cover - CuPy without a plan cache
            pass
        xp.get_default_memory_pool().free_all_blocks()


SEARCH_BUDGET_GPU_BYTES = 12 << 30


def memory_budget_bytes(xp) -> int:
    """Working-memory budget for a pass's batches: 40% of free GPU memory capped at
    12 GiB (enough for full-size batches at box 256), or 1 GiB on the CPU."""
    return int(min(0.4 * free_gpu_memory_bytes(), SEARCH_BUDGET_GPU_BYTES)) if xp is not np else 1 << 30


def image_cache_budget_bytes(xp, reserved_bytes: int = 0) -> int:
    """Device memory the image FTs of a job may occupy: 30% of the free GPU memory left after
    ``reserved_bytes`` (what the job's maps and accumulators will need), or 4 GiB on the CPU."""
    return int(0.3 * max(0, free_gpu_memory_bytes() - reserved_bytes)) if xp is not np else 4 << 30


class StageTimer:
    """Wall seconds per named stage, summed over uses: ``with timer("search"): ...``. On a GPU
    the device is synchronized at both ends of a stage, so asynchronous work is charged to
    the stage that queued it."""

    def __init__(self, xp=np):
        self.xp = xp
        self.seconds = {}

    def _sync(self):
        if self.xp is not np:
            self.xp.cuda.Device().synchronize()

    def __call__(self, name: str):
        return _Stage(self, name)

    def rounded(self, digits: int = 3) -> dict:
        return {name: round(value, digits) for name, value in self.seconds.items()}

    def summary(self) -> str:
        """'name 0.12 s, other 0.03 s': the stages as run.log lists them."""
        return ", ".join(f"{name} {value:.2f} s" for name, value in self.seconds.items())


class _Stage:
    def __init__(self, timer: StageTimer, name: str):
        self.timer, self.name = timer, name

    def __enter__(self):
        self.timer._sync()
        self.start = time.perf_counter()

    def __exit__(self, *exc):
        self.timer._sync()
        self.timer.seconds[self.name] = self.timer.seconds.get(self.name, 0.0) + time.perf_counter() - self.start
        return False
