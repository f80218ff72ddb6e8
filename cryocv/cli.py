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

    p = sub.add_parser("refine", help="gold-standard 3D refinement (global pose search; NU or uniform)",
                       description="Refine particles against a low-resolution reference: branch-and-bound "
                                   "global pose search, back-projection into half-set maps, non-uniform (NU, "
                                   "default) or uniform FSC-Wiener regularization, dynamic mask, masked and "
                                   "corrected FSC. Writes half_map_1/2.mrc (unfiltered), map.mrc (FSC-weighted), "
                                   "map_nu_filtered.mrc (NU), mask.mrc, fsc.json, fsc.png, poses.png, particles.star (new poses, half-sets), nu_cutoff_A.mrc (NU), "
                                   "per-iteration checkpoints and job.json in DIR. A killed job continues with "
                                   "--continue DIR.")
    p.add_argument("--particles", help="particles (.star or .cs) with CTF; poses are not needed")
    p.add_argument("--ref", help="starting reference map (MRC), same box and pixel size as the particles")
    p.add_argument("--out", help="output directory")
    p.add_argument("--continue", dest="continue_dir", metavar="DIR",
                   help="continue the refinement in DIR from its last checkpoint (other options are ignored)")
    p.add_argument("--regularizer", choices=["nu", "uniform"], default="nu",
                   help="nu: non-uniform cross-validated filter (default); uniform: FSC-Wiener filter")
    p.add_argument("--sym", default="C1", help="point group: C<n>, D<n>, T, O, I (default C1)")
    p.add_argument("--initial-lowpass-A", type=float, default=30.0, help="low-pass of the reference (default 30 Å)")
    p.add_argument("--max-iterations", type=int, default=10,
                   help="iterations before the final pass to Nyquist, if not converged earlier (default 10)")
    p.add_argument("--max-shift-A", type=float, help="shift search range ± (default 10%% of the box)")
    p.add_argument("--base-step-deg", type=float, default=15.0, help="base angular grid of the search (default 15)")
    p.add_argument("--fine-step-deg", type=float, default=0.5, help="finest angular step (default 0.5)")
    p.add_argument("--candidates", type=int, default=4,
                   help="poses kept per image at the fine search levels (default 4)")
    p.add_argument("--base-candidates", type=int, default=32,
                   help="poses kept per image after the coarse base grid, halved per level down to --candidates "
                        "(default 32)")
    p.add_argument("--nu-cutoffs", type=int, default=50, help="NU: candidate cutoffs (default 50)")
    p.add_argument("--nu-order", type=int, default=8, help="NU: Butterworth filter order (default 8)")
    p.add_argument("--nu-awf", type=float, default=3.0, help="NU: adaptive window factor (default 3)")
    p.add_argument("--nu-plain-cv", action="store_true",
                   help="NU: the paper's plain quarter-map CV loss, without the correction for the quarter-maps' "
                        "extra noise")
    p.add_argument("--batch-size", type=int, help="images per batch (default: from the memory budget)")
    p.add_argument("--seed", type=int, default=0, help="seed for the half-set and quarter-set splits (default 0)")
    p.add_argument("--datadir", help="extra folder to look for image stacks in")
    p.add_argument("--gpu", metavar="IDS", help="GPU number(s) to use, e.g. 0 (implies --device gpu)")
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

    p = sub.add_parser("demo", help="simulate a small dataset and refine it (NU, C4)",
                       description="Simulate TRPV1 particles (bundled map, C4) and run a NU refinement from a 30 Å "
                                   "low-pass; prints where the map and the plots are and how close to the truth "
                                   "the result is.")
    p.add_argument("--out", default="cryocv_demo", help="output directory (default ./cryocv_demo)")
    p.add_argument("--n", type=int, default=2000, help="number of particles (default 2000)")
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
    elif args.command == "refine":
        report = _refine(args)
        print(f"gold-standard resolution {report['resolution_A']:.2f} Å (FSC 0.143, masked, corrected); "
              f"map: {args.out}/map.mrc, plots: {args.out}/fsc.png, {args.out}/poses.png")
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
        print(f"demo finished: {report['n_particles']} particles refined (NU, C4) to {report['resolution_A']:.2f} Å "
              f"gold-standard; vs the true map {report['resolution_vs_truth_0.5_A']:.2f} Å (FSC 0.5); median pose "
              f"error {report['pose_error_median_deg']:.2f}°")
        print(f"map: {args.out}/refine/map.mrc")
        print(f"FSC plot: {args.out}/refine/fsc.png, poses: {args.out}/refine/poses.png")
    return 0


def _refine(args) -> dict:
    from . import jobs
    from .refine import RefineParams
    if args.continue_dir:
        args.out = args.continue_dir
        return jobs.run_refine(None, None, args.continue_dir, resume=True, progress=not args.quiet)
    missing = [flag for flag, value in (("--particles", args.particles), ("--ref", args.ref), ("--out", args.out))
               if not value]
    if missing:
        raise CryocvError(f"refine needs {', '.join(missing)} (or --continue DIR)")
    params = RefineParams(regularizer=args.regularizer, symmetry=args.sym, initial_lowpass_A=args.initial_lowpass_A,
                          max_iterations=args.max_iterations, base_step_deg=args.base_step_deg,
                          fine_step_deg=args.fine_step_deg, max_shift_A=args.max_shift_A,
                          n_candidates=args.candidates, n_base_candidates=args.base_candidates,
                          nu_cutoffs=args.nu_cutoffs, nu_order=args.nu_order, nu_awf=args.nu_awf,
                          nu_half_map_noise=not args.nu_plain_cv, batch_size=args.batch_size, seed=args.seed)
    return jobs.run_refine(args.particles, args.ref, args.out, params, device=args.device, gpu_ids=args.gpu,
                           datadir=args.datadir, progress=not args.quiet)


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
