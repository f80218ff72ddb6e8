"""The internal particle model shared by RELION STAR and cryoSPARC .cs files.

Poses follow RELION: ``euler_deg`` (n, 3) = rlnAngleRot/Tilt/Psi and
``origin_A`` (n, 2) = rlnOriginXAngst/YAngst, i.e. the particle's centre sits at
box centre − origin, and an image is re-centred by shifting it by +origin.
Half-sets are 1/2 (``rlnRandomSubset``), 0 when unknown.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field, replace

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .ctf import CTFParams
from .errors import CryocvError
from .geometry import euler_to_matrix
from .io.mrc import StackCache


# images with larger values overflow float32 sums of their squares (cryo-EM images are O(1)–O(1e3))
MAX_PIXEL_MAGNITUDE = 1e10
READ_PART_BYTES = 32 << 20         # read_images reads larger requests in parts of this size, in parallel
_READERS = []                      # the thread pool of read_images, made on first use
_READERS_LOCK = threading.Lock()


def _reader_pool() -> ThreadPoolExecutor:
    with _READERS_LOCK:
        if not _READERS:
            _READERS.append(ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1)), thread_name_prefix="cryocv-images"))
        return _READERS[0]


@dataclass
class Particles:
    """Metadata of n particle images; images are read lazily with :meth:`read_images`."""

    stack_paths: np.ndarray          # (n,) str, resolved path of each image's stack ('' if unknown)
    stack_indices: np.ndarray        # (n,) int, 0-based index inside the stack
    box_size: int
    pixel_size_A: float
    euler_deg: np.ndarray            # (n, 3) float64
    origin_A: np.ndarray             # (n, 2) float64
    ctf: CTFParams | None
    half_set: np.ndarray             # (n,) int8 in {0, 1, 2}
    optics_group: np.ndarray         # (n,) int
    has_alignment: bool = True
    source: str = ""
    micrograph_names: np.ndarray | None = None   # (n,) str: rlnMicrographName / location/micrograph_path
    coordinates_px: np.ndarray | None = None     # (n, 2) particle centre (x, y) in micrograph pixels
    micrograph_shape: np.ndarray | None = None   # (n, 2) (ny, nx) micrograph size in pixels (from .cs only)
    extra: dict = field(default_factory=dict)  # format-specific passthrough (e.g. STAR tables)
    _cache: StackCache = field(default_factory=StackCache, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.stack_indices)

    @property
    def rotations(self) -> np.ndarray:
        """RELION rotation matrices (n, 3, 3)."""
        return euler_to_matrix(self.euler_deg)

    @property
    def origin_px(self) -> np.ndarray:
        return self.origin_A / self.pixel_size_A

    def subset(self, index) -> "Particles":
        """A view on some particles (boolean mask or integer index)."""
        index = np.asarray(index)
        ctf = self.ctf.take(index) if self.ctf is not None else None
        extra = dict(self.extra)
        if "particles_table" in extra:
            pos = np.arange(len(self))[index]
            extra["particles_table"] = extra["particles_table"].iloc[pos].reset_index(drop=True)
        if extra.get("cs_uid") is not None:
            extra["cs_uid"] = np.asarray(extra["cs_uid"])[index]
        optional = {name: None if getattr(self, name) is None else getattr(self, name)[index]
                    for name in ("micrograph_names", "coordinates_px", "micrograph_shape")}
        return replace(self, stack_paths=self.stack_paths[index], stack_indices=self.stack_indices[index],
                       euler_deg=self.euler_deg[index], origin_A=self.origin_A[index], ctf=ctf,
                       half_set=self.half_set[index], optics_group=self.optics_group[index],
                       extra=extra, _cache=self._cache, **optional)

    def check_images(self):
        """Raise CryocvError unless every stack exists and holds the indices asked for."""
        for path in np.unique(self.stack_paths):
            if not path or not os.path.exists(path):
                raise CryocvError(f"image stack not found: {path or '(no path)'} (referenced by {self.source})")
            stack = self._cache.stack(path)
            if stack.shape[-1] != self.box_size or stack.shape[-2] != self.box_size:
                raise CryocvError(f"{path} holds {stack.shape[-2]}×{stack.shape[-1]} images, "
                                  f"expected {self.box_size}×{self.box_size} from {self.source}")
            wanted = self.stack_indices[self.stack_paths == path]
            if wanted.size and (wanted.max() >= stack.shape[0] or wanted.min() < 0):
                bad = wanted.min() if wanted.min() < 0 else wanted.max()
                raise CryocvError(f"{self.source} asks for image {bad + 1} of {path}, "
                                  f"which holds images 1–{stack.shape[0]}")

    def read_images(self, index=None, check_finite: bool = True, out: np.ndarray | None = None) -> np.ndarray:
        """Images (k, N, N) float32 for ``index`` (default all), in that order, into ``out`` when
        given (k, N, N) float32 C-contiguous. Large requests are read in parts by a few threads at
        once (positioned reads and numpy release the GIL)."""
        positions = np.arange(len(self)) if index is None else np.arange(len(self))[index]
        shape = (len(positions), self.box_size, self.box_size)
        if out is None:
            out = np.empty(shape, dtype=np.float32)
        elif out.shape != shape or out.dtype != np.float32 or not out.flags.c_contiguous:
            raise ValueError(f"read_images: out must be C-contiguous float32 {shape}, not {out.dtype} {out.shape}")
        part = max(1, READ_PART_BYTES // max(out[:1].nbytes, 1))
        starts = range(0, len(positions), part)
        if len(starts) > 1:
            list(_reader_pool().map(lambda a: self._read_into(out[a:a + part], positions[a:a + part], check_finite),
                                    starts))
        else:
            self._read_into(out, positions, check_finite)
        return out

    def _read_into(self, out: np.ndarray, positions: np.ndarray, check_finite: bool):
        paths = np.unique(self.stack_paths[positions])
        for path in paths:
            if paths.size == 1:
                self._cache.read(path, self.stack_indices[positions], out)
                break
            sel = np.nonzero(self.stack_paths[positions] == path)[0]
            images = np.empty((sel.size, self.box_size, self.box_size), dtype=np.float32)
            self._cache.read(path, self.stack_indices[positions[sel]], images)
            out[sel] = images
        if not check_finite:
            return
        bad = ~np.isfinite(out).reshape(len(out), -1).all(axis=1)
        if bad.any():
            first = positions[np.nonzero(bad)[0][0]]
            raise CryocvError(f"particle {first + 1} ({self.stack_indices[first] + 1}@{self.stack_paths[first]}) "
                              f"contains NaN or infinite pixels")

    def check_metadata(self):
        """Raise CryocvError if poses, origins or CTF values are not finite, or the CTF is
        physically impossible (voltage <= 0, Cs < 0, amplitude contrast outside [0, 1), scale <= 0)."""
        arrays = {"Euler angles": self.euler_deg, "origins": self.origin_A}
        if self.ctf is not None:
            arrays.update({name: getattr(self.ctf, name) for name in self.ctf.FIELDS})
        for name, values in arrays.items():
            bad = ~np.isfinite(np.asarray(values, dtype=float))
            if bad.any():
                row = int(np.nonzero(bad.reshape(len(self), -1).any(axis=1))[0][0])
                raise CryocvError(f"{self.source}: particle {row + 1} has a non-finite value in {name}")
        if self.ctf is None:
            return
        ctf = self.ctf
        for name, bad, what in (("voltage_kV (rlnVoltage)", ctf.voltage_kV <= 0, "must be positive"),
                                ("cs_mm (rlnSphericalAberration)", ctf.cs_mm < 0, "must be >= 0"),
                                ("amplitude_contrast (rlnAmplitudeContrast)",
                                 (ctf.amplitude_contrast < 0) | (ctf.amplitude_contrast >= 1), "must be in [0, 1)"),
                                ("scale (rlnCtfScalefactor)", ctf.scale <= 0, "must be positive")):
            if np.any(bad):
                row = int(np.nonzero(bad)[0][0])
                value = getattr(ctf, name.split()[0])[row]
                raise CryocvError(f"{self.source}: particle {row + 1} has {name} = {value:g}, which {what}")

    def image_problems(self, batch_bytes: int = 1 << 24) -> tuple[np.ndarray, list]:
        """Scan every image: (positions (k,) of unusable particles, their reasons). Unusable:
        NaN or infinite pixels, blank (constant) images, or values beyond ±MAX_PIXEL_MAGNITUDE
        (whose sums would overflow float32 in the reconstruction). Batches of ``batch_bytes`` are
        read and checked by a few threads at once (reads and numpy reductions release the GIL)."""
        batch_size = max(1, batch_bytes // (4 * self.box_size ** 2))

        def check(start):
            index = np.arange(start, min(start + batch_size, len(self)))
            images = self.read_images(index, check_finite=False).reshape(index.size, -1)
            with np.errstate(invalid="ignore", over="ignore"):
                high, low = images.max(axis=1), images.min(axis=1)    # NaN propagates into both
            return index, high, low

        bad, reasons = [], []
        with ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as pool:
            for index, high, low in pool.map(check, range(0, len(self), batch_size)):
                finite = np.isfinite(high) & np.isfinite(low)
                blank = finite & (high == low)
                huge = finite & (np.maximum(high, -low) > MAX_PIXEL_MAGNITUDE)
                for mask, reason in ((~finite, "NaN or infinite pixels"), (blank, "a blank (constant) image"),
                                     (huge, f"pixel values beyond ±{MAX_PIXEL_MAGNITUDE:g}")):
                    bad += index[mask].tolist()
                    reasons += [reason] * int(mask.sum())
        return np.asarray(bad, dtype=np.int64), reasons

    def require_alignment(self, what: str):
        if not self.has_alignment:
            raise CryocvError(f"{self.source} has no poses (rlnAngleRot/Tilt/Psi): {what} needs them")


def resolve_image_path(path: str, metadata_file: str, datadir: str | None = None) -> str:
    """Resolve an image path as RELION does: absolute, else relative to the working
    (project) directory; then, as fallbacks, relative to the metadata file's folder, to each
    folder above it (a project directory the metadata file lies in, when run from elsewhere),
    else ``datadir``."""
    if os.path.isabs(path):
        return path
    folder = os.path.dirname(os.path.abspath(metadata_file))
    beside = os.path.join(folder, path)
    if os.path.exists(path) and os.path.exists(beside) and not os.path.samefile(path, beside):
        raise CryocvError(f"ambiguous image path {path!r} in {metadata_file}: it exists both in the working "
                          f"directory and beside the metadata file; run from the project directory the paths "
                          f"are relative to, or move one of them")
    candidates = [path, beside]
    parent = os.path.dirname(folder)
    while parent != folder:
        candidates.append(os.path.join(parent, path))
        folder, parent = parent, os.path.dirname(parent)
    if datadir:
        candidates += [os.path.join(datadir, path), os.path.join(datadir, os.path.basename(path))]
    for cand in candidates:
        if os.path.exists(cand):
            return os.path.abspath(cand)
    return os.path.abspath(candidates[1])  # reported as missing when images are read


def project_image_path(stack_path: str, metadata_file: str) -> str:
    """How a written metadata file names a stack (RELION's rule, also cryoSPARC's for blob/path):
    relative to the working directory, the project directory, when the stack lies under it;
    else relative to the metadata file's folder when under that (that folder then serves as the
    project directory: Scipion's RELION import looks up from the file and refuses absolute
    names); else absolute."""
    absolute = os.path.abspath(stack_path)
    for root in (os.getcwd(), os.path.dirname(os.path.abspath(metadata_file))):
        relative = os.path.relpath(absolute, root)
        if relative != os.pardir and not relative.startswith(os.pardir + os.sep):
            return relative
    return absolute


def random_half_sets(n: int, seed: int = 0) -> np.ndarray:
    """Balanced random split into half-sets 1/2."""
    rng = np.random.default_rng(seed)
    halves = np.where(np.arange(n) % 2 == 0, 1, 2).astype(np.int8)
    rng.shuffle(halves)
    return halves
