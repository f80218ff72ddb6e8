"""The ``cryocv`` command line. Errors the user can fix print one line and exit 2."""
from __future__ import annotations

import argparse
import json
import sys

from . import __version__
from .errors import CryocvError

_EPILOG = "Conventions follow RELION 3.1 (ZYZ Euler angles, rlnOriginXAngst, optics groups). See README.md."


def _device(p):
    p.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto",
                   help="where to compute (default: GPU when CuPy sees one, else CPU)")


def _quiet(p):
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cryocv", description="GPU-accelerated cryo-EM refinement.",
                                     epilog=_EPILOG)
    parser.add_argument("--version", action="version", version=f"cryocv {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("simulate", help="simulate particles (RELION STAR + stack) from a map",
                       description="Project a map at random poses with CTF, shifts and white noise; write "
                                   "DIR/particles.star (true poses, half-sets) and DIR/particles.mrcs.")
    p.add_argument("--map", required=True, help="input map (MRC)")
    p.add_argument("--n", type=int, required=True, help="number of particles")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--snr", type=float, default=0.1, help="signal-to-noise ratio (variance ratio, default 0.1)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--pixel-size-A", type=float, help="pixel size in Å (default: from the map header)")
    p.add_argument("--shift-sigma-A", type=float, default=3.0, help="std of the random origins in Å (default 3)")
    p.add_argument("--defocus-min-A", type=float, default=8000.0, help="smallest mean defocus (Å)")
    p.add_argument("--defocus-max-A", type=float, default=25000.0, help="largest mean defocus (Å)")
    p.add_argument("--no-ctf", action="store_true", help="simulate without CTF")
    _device(p)
    _quiet(p)

    p = sub.add_parser("reconstruct", help="gold-standard reconstruction from given poses",
                       description="Back-project particles into half-set reconstructions; write half_map_1.mrc, "
                                   "half_map_2.mrc, map.mrc (FSC-weighted), mask.mrc, fsc.json, fsc.png, "
                                   "particles.star and job.json in DIR.")
    p.add_argument("--particles", required=True, help="particles (.star or .cs) with poses")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--sym", default="C1", help="point group: C<n>, D<n>, T, O, I (default C1)")
    p.add_argument("--mask", help="mask (MRC) for the masked FSC (default: automatic threshold mask)")
    p.add_argument("--datadir", help="extra folder to look for image stacks in")
    p.add_argument("--batch-size", type=int, default=256, help="images per batch (default 256)")
    p.add_argument("--seed", type=int, default=0, help="seed for the half-set split when none is given")
    _device(p)
    _quiet(p)

    p = sub.add_parser("fsc", help="FSC between two maps",
                       description="Print the resolution where the FSC of two maps crosses 0.143 and 0.5.")
    p.add_argument("map1")
    p.add_argument("map2")
    p.add_argument("--mask", help="mask (MRC) applied to both maps")
    p.add_argument("--pixel-size-A", type=float, help="pixel size in Å (default: from the headers)")
    p.add_argument("--json", action="store_true", help="print the whole curve as JSON")

    p = sub.add_parser("convert", help="convert particles between RELION STAR and cryoSPARC .cs",
                       description="Convert IN to OUT (by extension: .star or .cs) keeping poses, shifts, CTF "
                                   "and half-sets. Image paths are written relative to OUT's folder.")
    p.add_argument("input", metavar="IN")
    p.add_argument("output", metavar="OUT")
    p.add_argument("--datadir", help="extra folder to look for image stacks in")

    p = sub.add_parser("demo", help="simulate a small dataset and reconstruct it",
                       description="Simulate haemoglobin particles (bundled map) and reconstruct them; prints "
                                   "where the map and the FSC plot are.")
    p.add_argument("--out", default="cryocv_demo", help="output directory (default ./cryocv_demo)")
    p.add_argument("--n", type=int, default=3000, help="number of particles (default 3000)")
    p.add_argument("--snr", type=float, default=0.05, help="SNR (default 0.05)")
    _device(p)
    _quiet(p)
    return parser


def _run(args) -> int:
    from . import jobs
    if args.command == "simulate":
        particles = jobs.run_simulate(args.map, args.n, args.out, snr=args.snr, seed=args.seed,
                                      pixel_size_A=args.pixel_size_A, shift_sigma_A=args.shift_sigma_A,
                                      defocus_min_A=args.defocus_min_A, defocus_max_A=args.defocus_max_A,
                                      no_ctf=args.no_ctf, device=args.device, progress=not args.quiet)
        print(f"wrote {len(particles)} particles to {particles.source}")
    elif args.command == "reconstruct":
        if args.batch_size <= 0:
            raise CryocvError("--batch-size must be positive")
        report = jobs.run_reconstruct(args.particles, args.out, symmetry=args.sym, mask_path=args.mask,
                                      device=args.device, batch_size=args.batch_size, seed=args.seed,
                                      datadir=args.datadir, progress=not args.quiet)
        print(f"gold-standard resolution {report['resolution_A']:.2f} Å (FSC 0.143); "
              f"map: {args.out}/map.mrc, plot: {args.out}/fsc.png")
    elif args.command == "fsc":
        result = jobs.run_fsc(args.map1, args.map2, args.mask, args.pixel_size_A)
        if args.json:
            print(json.dumps(result))
        else:
            print(f"FSC=0.143: {result['resolution_0.143_A']:.2f} Å")
            print(f"FSC=0.5:   {result['resolution_0.5_A']:.2f} Å")
    elif args.command == "convert":
        n = jobs.run_convert(args.input, args.output, args.datadir)
        print(f"converted {n} particles: {args.input} -> {args.output}")
    elif args.command == "demo":
        report = jobs.run_demo(args.out, n=args.n, snr=args.snr, device=args.device, progress=not args.quiet)
        print(f"demo finished: {report['n_particles']} particles, gold-standard resolution "
              f"{report['resolution_A']:.2f} Å, vs truth (FSC 0.5) {report['resolution_vs_truth_0.5_A']:.2f} Å")
        print(f"map: {args.out}/reconstruct/map.mrc")
        print(f"FSC plot: {args.out}/reconstruct/fsc.png")
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except CryocvError as exc:
        print(f"cryocv {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # e.g. --out names an existing file, disk full, permission denied
        print(f"cryocv {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except MemoryError:
        print(f"cryocv {args.command}: error: out of memory; lower --batch-size", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cryocv {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
