"""Project a map at random poses with CTF, shifts and white noise; write DIR/particles.star
(true poses, half-sets) and DIR/particles.mrcs."""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass

from ..errors import CryocvError
from ..simulate import DEFAULT_DEFOCUS_RANGE_A, DEFAULT_SHIFT_SIGMA_A, DEFAULT_SNR, simulate
from . import jobdir
from .common import (DEFAULT_DEVICE, DEFAULT_SEED, check_pixel_size, device_args, option, params_from_args, read_cubic_map,
                     select_device)

HELP = "simulate particles (RELION STAR + stack) from a map"


@dataclass
class SimulateParams:
    n: int = 1000                        # the CLI requires --n
    snr: float = DEFAULT_SNR
    seed: int = DEFAULT_SEED
    pixel_size_A: float | None = None   # default: the map header's
    shift_sigma_A: float = DEFAULT_SHIFT_SIGMA_A
    defocus_min_A: float = DEFAULT_DEFOCUS_RANGE_A[0]
    defocus_max_A: float = DEFAULT_DEFOCUS_RANGE_A[1]
    ctf: bool = True


def add_args(p):
    p.add_argument("--map", required=True, help="input map (MRC)")
    p.add_argument("--n", dest="n", type=int, required=True, help="number of particles")
    p.add_argument("--out", required=True, help="output directory")
    option(p, "--snr", SimulateParams, "snr", help="signal-to-noise ratio (variance ratio)")
    option(p, "--seed", SimulateParams, "seed", help="random seed")
    p.add_argument("--pixel-size-A", dest="pixel_size_A", type=float, help="pixel size in Å (default: from the map header)")
    option(p, "--shift-sigma-A", SimulateParams, "shift_sigma_A", help="std of the random origins in Å")
    option(p, "--defocus-min-A", SimulateParams, "defocus_min_A", help="smallest mean defocus (Å)")
    option(p, "--defocus-max-A", SimulateParams, "defocus_max_A", help="largest mean defocus (Å)")
    option(p, "--no-ctf", SimulateParams, "ctf", action="store_false", help="simulate without CTF")
    device_args(p)


def main(args) -> int:
    particles = run(args.map, args.out, params_from_args(SimulateParams, args), device=args.device,
                    progress=not args.quiet)
    print(f"wrote {len(particles)} particles to {particles.source}")
    return 0


def run(map_path: str, out_dir: str, params: SimulateParams, device: str = DEFAULT_DEVICE, progress: bool = True):
    """Simulate particles from a map → ``out_dir/particles.star`` + ``particles.mrcs``; returns them."""
    started = time.time()
    check_pixel_size(params.pixel_size_A)
    volume, header_px = read_cubic_map(map_path)
    pixel = params.pixel_size_A or header_px
    if not pixel or pixel <= 0:
        raise CryocvError(f"{map_path} has no pixel size in its header: pass --pixel-size-A")
    if params.n <= 0:
        raise CryocvError("--n must be positive")
    if not params.snr > 0:
        raise CryocvError("--snr must be positive")
    if not 0 < params.defocus_min_A <= params.defocus_max_A:
        raise CryocvError("defocus range must satisfy 0 < min <= max")
    xp, _ = select_device(device)
    particles = simulate(volume, pixel, params.n, out_dir, snr=params.snr, seed=params.seed, xp=xp,
                         with_ctf=params.ctf, shift_sigma_A=params.shift_sigma_A,
                         defocus_range_A=(params.defocus_min_A, params.defocus_max_A), progress=progress,
                         name=os.path.splitext(jobdir.PARTICLES_STAR)[0])
    jobdir.write_json(jobdir.path(out_dir, jobdir.JOB_JSON), jobdir.job_record(
        "simulate", {"map": os.path.abspath(map_path), **asdict(params), "pixel_size_A": pixel}, xp, started))
    return particles
