"""What the job modules share: argparse options taking their defaults from the Params
dataclasses, device choice, and input checks that fail with one clear line."""
from __future__ import annotations

import argparse
import dataclasses

import numpy as np

from ..backend import get_array_module, gpu_available, resolve_xp
from ..errors import CryocvError
from ..io.mrc import read_map
from ..io.particle_files import load_particles
from ..particles import Particles, random_half_sets
from ..symmetry import parse_symmetry

DEFAULT_DEVICE = "auto"
DEFAULT_SEED = 0


def default_of(params_class, name: str):
    """The default of field ``name`` of a Params dataclass (the one place it is written)."""
    found = {f.name: f for f in dataclasses.fields(params_class)}[name]
    return found.default_factory() if found.default is dataclasses.MISSING else found.default


def option(parser, flag: str, params_class, name: str, help: str, **kwargs):
    """``parser.add_argument(flag)`` storing into ``name`` with the Params default; the help
    names the default."""
    if kwargs.get("action") in ("store_false", "store_true"):  # flags: the default is the action's
        parser.add_argument(flag, dest=name, help=help, **kwargs)
        return
    kwargs.setdefault("metavar", flag.lstrip("-").upper().replace("-", "_"))
    default = default_of(params_class, name)
    if default is not None and not isinstance(default, bool):
        kwargs.setdefault("type", type(default))
        help = f"{help} (default {default:g})" if isinstance(default, float) else f"{help} (default {default})"
    parser.add_argument(flag, dest=name, default=default, help=help, **kwargs)


def params_from_args(params_class, args: argparse.Namespace):
    """A Params dataclass from the parsed arguments of the same names."""
    names = [f.name for f in dataclasses.fields(params_class)]
    return params_class(**{n: getattr(args, n) for n in names if hasattr(args, n)})


def device_args(parser, gpu: bool = False):
    parser.add_argument("--device", choices=["auto", "cpu", "gpu"], default=DEFAULT_DEVICE,
                        help="where to compute (default: GPU when CuPy sees one, else CPU)")
    if gpu:
        parser.add_argument("--gpu", metavar="IDS", help="GPU number(s) to use, e.g. 0 (implies --device gpu)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def check_result(report: dict, half_maps):
    """A result with NaN maps or no resolution is an error, never a finished job."""
    if any(not bool(get_array_module(m).isfinite(m).all()) for m in half_maps):
        raise CryocvError("the half-maps hold NaN or infinite values: check the images' and CTF values "
                          "(e.g. pixel values so large that their sums overflow)")
    if not np.isfinite(report["resolution_A"]):
        raise CryocvError("the half-maps share no signal (FSC zero everywhere): are the images blank, or the "
                          "poses or CTF of another dataset?")


def output_args(parser):
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a finished job (or a refinement) already in --out")


def select_device(device: str = DEFAULT_DEVICE, gpu_ids=None):
    """(array module, GPU ids or None): ``gpu_ids`` ("0", "0,1") selects the first as CuPy's device."""
    if gpu_ids is None:
        return resolve_xp(device), None
    try:
        ids = [int(i) for i in str(gpu_ids).replace(" ", "").split(",") if i != ""]
    except ValueError:
        raise CryocvError(f"--gpu takes device numbers like 0 or 0,1; got {gpu_ids!r}") from None
    if not ids:
        raise CryocvError("--gpu needs at least one device number")
    if not gpu_available():
        raise CryocvError("--gpu was given but no CUDA GPU is visible to CuPy")
    import cupy  # present: gpu_available() imported it
    count = cupy.cuda.runtime.getDeviceCount()
    bad = [i for i in ids if not 0 <= i < count]
    if bad:
        raise CryocvError(f"--gpu {gpu_ids}: this machine has GPUs 0..{count - 1}")
    cupy.cuda.Device(ids[0]).use()
    return resolve_xp("gpu"), ids


def symmetry_arg(symmetry: str) -> str:
    try:
        return parse_symmetry(symmetry)
    except ValueError as exc:
        raise CryocvError(str(exc)) from None


def check_pixel_size(pixel_size_A):
    if pixel_size_A is not None and not (np.isfinite(pixel_size_A) and pixel_size_A > 0):
        raise CryocvError(f"--pixel-size-A must be a positive number, got {pixel_size_A}")


def check_cubic(volume, map_path: str):
    if volume.shape[0] != volume.shape[1] or volume.shape[1] != volume.shape[2]:
        raise CryocvError(f"{map_path} is not cubic (shape {volume.shape})")


def read_cubic_map(map_path: str):
    """(map (N, N, N) float32, pixel size from the header or None); one-line error unless cubic."""
    volume, pixel_size_A = read_map(map_path)
    check_cubic(volume, map_path)
    return volume, pixel_size_A


def load_checked_particles(particles_path: str, datadir=None, strict: bool = False, log=None) -> Particles:
    """Particles whose metadata is finite and physical and whose images exist with the right box.
    Unusable images (NaN, blank, overflowing) are left out with a count in the log, or, with
    ``strict``, stop the job; so do fewer than 4 usable particles."""
    particles = load_particles(particles_path, datadir)
    particles.check_metadata()
    particles.check_images()
    bad, reasons = particles.image_problems()
    if bad.size == 0:
        return particles
    first = f"particle {bad[0] + 1} ({particles.stack_indices[bad[0]] + 1}@{particles.stack_paths[bad[0]]}) has {reasons[0]}"
    if strict or len(particles) - bad.size < 4:
        why = "--strict was given" if strict else f"only {len(particles) - bad.size} usable particles remain"
        raise CryocvError(f"{particles_path}: {bad.size} of {len(particles)} images are unusable ({why}); {first}")
    counts = {reason: reasons.count(reason) for reason in dict.fromkeys(reasons)}
    (log or print)(f"left out {bad.size} of {len(particles)} particles with unusable images "
                   f"({', '.join(f'{n} with {reason}' for reason, n in counts.items())}; first: {first}); "
                   f"--strict makes this an error")
    return particles.subset(np.setdiff1d(np.arange(len(particles)), bad))


def require_half_sets(particles: Particles, seed: int, min_per_half: int, log=None):
    """Half-sets from ``rlnRandomSubset`` when every particle has one, else a balanced split
    seeded by ``seed`` (a resumed job gets the same); each half needs ``min_per_half`` particles."""
    if np.all(particles.half_set == 0):
        particles.half_set = random_half_sets(len(particles), seed)
        if log is not None:
            log(f"no rlnRandomSubset in {particles.source}: split the particles at random into two half-sets "
                f"(seed {seed}); particles.star records the split")
    elif np.any(particles.half_set == 0):
        raise CryocvError(f"{particles.source}: some particles have rlnRandomSubset and others not")
    for half in (1, 2):
        count = np.count_nonzero(particles.half_set == half)
        if count == 0:
            raise CryocvError(f"{particles.source}: half-set {half} is empty; gold-standard jobs need particles "
                              f"in both (rlnRandomSubset 1 and 2)")
        if count < min_per_half:
            raise CryocvError(f"half-set {half} has fewer than {min_per_half} particles; refinement needs both "
                              f"half-sets")
