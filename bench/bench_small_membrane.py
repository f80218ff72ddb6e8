"""Uniform vs NU refinement of a small membrane protein in a disordered belt (issue 15): the regime
of Punjani, Zhang & Fleet 2020 (PfCRT, STRA6), where the belt misleads uniform refinement.

For each SNR, a dataset from bench/small_membrane_dataset.py (default: CXCR4's receptor chain in a
micelle of 1.25× its mass); for each particle count (the first N particles of it), both
regularizers refine the same particles from the same start (protein + mean belt at 30 Å, C1), and
an oracle reconstructs them from their true poses. Each map is judged in the protein's mask
against the protein-only truth (FSC 0.5 and 0.143, Å; also after turning the map by the one
global rotation that best maps the true poses onto the refined ones: a refinement may settle in a
frame a few degrees off the start's), each refinement's poses against the true ones (median error
raw, after that global rotation and after each half-set's own; fraction > 6°). ``--floor`` adds
the poses of one alignment to the truth itself (protein + mean belt): the error the data allow;
``--truth-start [LOWPASS_A ...]`` refines from that truth (at Nyquist, or low-passed to each resolution
given; 0 = Nyquist) as well: where each refinement settles from a perfect start, or from an ideal
start at X Å. A staged start is the refinement's own option: ``nu:staged_start_res_A=8``.
The belt is atomic-grained by default (``--belt-grain``).

    python bench/bench_small_membrane.py --snr 0.03 0.02 --n 2000 4000 8000 16000 --floor --max-iterations 20 \
        --out /tmp/sm --results bench/results/small_membrane
writes RESULTS.json and RESULTS.md. Extra arguments after ``--`` go to small_membrane_dataset's
build_dataset as ``key=value`` (e.g. ``belt=nanodisc``, or ``flexible_chains=N wobble_sigma_deg=10`` with
``--chains R,N``: a wobbling nanobody; the receptor is judged).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

from small_membrane_dataset import build_dataset  # noqa: E402

from cryocv.backend import resolve_xp  # noqa: E402
from cryocv.fsc import fsc_curve, resolution_at  # noqa: E402
from cryocv.io.mrc import read_map, write_map  # noqa: E402
from cryocv.io.particle_files import load_particles, save_particles  # noqa: E402
from cryocv.jobs import reconstruct  # noqa: E402
from cryocv.jobs.refine import RefineParams, run as run_refine  # noqa: E402
from cryocv.geometry import angular_distance_deg, euler_to_matrix  # noqa: E402
from cryocv.jobs import jobdir  # noqa: E402
from cryocv.register import MapTransform, transform_volume  # noqa: E402
from cryocv.jobs.checkpoints import CheckpointStore  # noqa: E402

BELT_GRAINS = {"atomic": {"blob_sigma_A": 1.0, "blob_volume_A3": 30.0}, "smooth": {}}   # build_belt's keywords
FAR_OFF_DEG = 6.0          # the paper's measure: particles whose poses differ by more than this


def judge_map(path_or_volume, truth, mask, px: float) -> dict:
    """FSC 0.5 / 0.143 (Å) of a map (its path, or the volume) against ``truth`` inside ``mask``."""
    volume = read_map(path_or_volume)[0] if isinstance(path_or_volume, str) else path_or_volume
    curve = fsc_curve(volume, truth, mask)
    n = truth.shape[0]
    return {"fsc05_A": resolution_at(curve, 0.5, n, px), "fsc0143_A": resolution_at(curve, 0.143, n, px)}


def best_rotation(true: np.ndarray, refined: np.ndarray) -> np.ndarray:
    """The rotation G (3, 3) minimising Σ ‖refined − true·G‖² over poses (n, 3, 3) (Procrustes)."""
    u, _, vt = np.linalg.svd(np.einsum("nji,njk->ik", true, refined))
    return u @ np.diag([1.0, 1.0, np.sign(np.linalg.det(u @ vt))]) @ vt


def registered_pose_error_deg(refined: np.ndarray, true: np.ndarray, half_set: np.ndarray) -> tuple:
    """Per particle (n,): the angle (°) between its refined pose and its true pose once each half-set's
    own global rotation G_h is removed (``refined ≈ true·G_h``, G_h the least-squares rotation over
    the half-set): the error that a rigid drift of a half-map does not explain. Also the two
    offsets' angles (°)."""
    errors, offsets = np.zeros(len(refined)), []
    for h in (1, 2):
        sel = half_set == h
        g = best_rotation(true[sel], refined[sel])
        errors[sel] = angular_distance_deg(refined[sel], true[sel] @ g)
        offsets.append(float(angular_distance_deg(g[None], np.eye(3)[None])[0]))
    return errors, offsets


def judge_map_and_poses(volume, refined: np.ndarray, true: np.ndarray, half_set: np.ndarray, truth, mask,
                        px: float) -> dict:
    """A map (N, N, N) and its poses (n, 3, 3) against the truth: masked FSC of the map, and of the map
    turned by the poses' global rotation; pose errors (median raw, after one global rotation, after
    each half-set's; p90; fraction > FAR_OFF_DEG). cryocv's jobs and RELION's iterations alike."""
    error = angular_distance_deg(refined, true)
    registered, offsets = registered_pose_error_deg(refined, true, half_set)
    g = best_rotation(true, refined)
    joint = angular_distance_deg(refined, true @ g)
    result = judge_map(volume, truth, mask, px)
    # the map in the truth's frame: poses A·G belong to V(G·x), so V turned by Gᵀ has the true poses
    result["after_global_rotation"] = judge_map(transform_volume(volume, MapTransform(g.T, np.zeros(3))),
                                                truth, mask, px)
    return {**result, "pose_error_registered_median_deg": float(np.median(registered)),
            "half_set_offsets_deg": offsets, "pose_error_joint_registered_median_deg": float(np.median(joint)),
            "pose_error_median_deg": float(np.median(error)), "pose_error_p90_deg": float(np.percentile(error, 90)),
            "fraction_over_6_deg": float(np.mean(error > FAR_OFF_DEG))}


def judge_job(job_dir: str, truth, mask, px: float, true_particles) -> dict:
    """A refinement against the truth: :func:`judge_map_and_poses` of its map and poses, the masked FSC
    of its NU-filtered map when there is one, and its gold-standard resolution."""
    volume, _ = read_map(os.path.join(job_dir, "map.mrc"))
    refined = load_particles(os.path.join(job_dir, "particles.star"))
    true = true_particles.subset(np.arange(len(refined))).rotations
    result = judge_map_and_poses(volume, refined.rotations, true, refined.half_set, truth, mask, px)
    filtered = os.path.join(job_dir, "map_nu_filtered.mrc")
    if os.path.isfile(filtered):
        result["nu_filtered"] = judge_map(filtered, truth, mask, px)
    with open(os.path.join(job_dir, "fsc.json")) as handle:
        report = json.load(handle)
    return {**result, "gold_standard_A": report["resolution_A"], "iterations": len(report.get("iterations", []))}


def variant(spec: str) -> tuple[str, dict]:
    """'nu' or 'nu:nu_max_window_fraction=0.125,join_halves_A=20' → (regularizer, RefineParams fields);
    integer values stay integers (``n_candidates=16``), others become floats."""
    regularizer, _, rest = spec.partition(":")
    options = {}
    for item in filter(None, rest.split(",")):
        key, value = item.split("=", 1)
        options[key] = int(value) if value.lstrip("-").isdigit() else float(value)
    return regularizer, options


def variant_folder(spec: str) -> str:
    """A variant's job folder name: 'nu:nu_awf=2' → 'nu_nu_awf2'."""
    return spec.replace(":", "_").replace(",", "_").replace("=", "")


def run_count(data_dir: str, count: int, out_dir: str, regularizers, max_iterations: int, device: str,
              floor: bool = False, truth_start=None) -> dict:
    """The regularizers and the oracle on the first ``count`` particles of the dataset; with ``floor``
    also the poses of one alignment to the true protein + mean belt (then a final pass to Nyquist);
    with ``truth_start`` (a list of low-pass resolutions, Å; None or 0 in it = Nyquist) each regularizer
    also refines from that truth low-passed to each (rows '<spec> from the truth [at X Å]'): where the
    refinement settles when its start is perfect, or as good as a start at X Å can be."""
    truth, px = read_map(os.path.join(data_dir, "truth_protein.mrc"))
    mask, _ = read_map(os.path.join(data_dir, "protein_mask.mrc"))
    everyone = load_particles(os.path.join(data_dir, "particles.star"))
    os.makedirs(out_dir, exist_ok=True)
    star = os.path.join(out_dir, "particles.star")
    save_particles(everyone.subset(np.arange(count)), star)
    rows = {}
    t0 = time.time()
    reconstruct.run(star, os.path.join(out_dir, "oracle"), device=device, progress=False, overwrite=True)
    rows["oracle"] = {**judge_map(os.path.join(out_dir, "oracle", "map.mrc"), truth, mask, px),
                      "wall_s": round(time.time() - t0, 1)}
    truth_reference = os.path.join(out_dir, "truth_protein_and_mean_belt.mrc")
    if floor or truth_start:
        belt, _ = read_map(os.path.join(data_dir, "belt_mean.mrc"))
        write_map(truth_reference, truth + belt, px)
    if floor:        # the best the data allow: one alignment to the truth (protein + mean belt) at Nyquist
        job = os.path.join(out_dir, "truth_reference")
        t0 = time.time()
        run_refine(star, truth_reference, job, RefineParams(regularizer="uniform", max_iterations=1,
                                                      initial_lowpass_A=2 * px), device=device, progress=False,
                   overwrite=True)
        rows["aligned to the truth"] = {**judge_job(job, truth, mask, px, everyone), "wall_s": round(time.time() - t0, 1)}
        first = CheckpointStore(job).folder(1)          # the poses of the pass aligned to the truth itself
        poses = np.load(os.path.join(first, jobdir.POSES_NPZ))
        true = everyone.subset(np.arange(count)).rotations
        error = angular_distance_deg(euler_to_matrix(poses["euler_deg"]), true)
        rows["aligned to the truth"]["first_pass_pose_error_median_deg"] = float(np.median(error))
        print(f"  {count}: aligned to the truth, {np.median(error):.2f}° median pose error", flush=True)
    starts = [("", os.path.join(data_dir, "initial_reference.mrc"), {})]
    for lowpass in truth_start or []:
        starts.append((" from the truth" + (f" at {lowpass:g} Å" if lowpass else ""), truth_reference,
                       {"initial_lowpass_A": lowpass or 2 * px}))
    for (suffix, start, start_options), spec in ((s, v) for s in starts for v in regularizers):
        regularizer, options = variant(spec)
        name = spec + suffix
        job = os.path.join(out_dir, variant_folder(spec) + suffix.replace(" ", "_"))
        t0 = time.time()
        run_refine(star, start, job, RefineParams(regularizer=regularizer, max_iterations=max_iterations,
                                                  **{**start_options, **options}),
                   device=device, progress=False, overwrite=True)
        rows[name] = {**judge_job(job, truth, mask, px, everyone), "wall_s": round(time.time() - t0, 1)}
        r = rows[name]
        print(f"  {count} {name}: {r['fsc05_A']:.2f} Å in the mask (oracle {rows['oracle']['fsc05_A']:.2f}), "
              f"pose {r['pose_error_median_deg']:.2f}°, {100 * r['fraction_over_6_deg']:.0f}% > 6°, "
              f"gold {r['gold_standard_A']:.2f} Å, {r['wall_s']} s", flush=True)
    return rows


def table(results: dict) -> str:
    lines = ["| SNR | particles | regularizer | protein FSC 0.5 vs truth (in its mask) | after one global rotation "
             "| FSC 0.143 | NU-filtered map 0.5 "
             "| gold-standard | median pose error | after one global rotation | after each half-set's global rotation (its angle) | > 6° "
             "| oracle 0.5 | iterations | wall |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for snr, by_count in results["runs"].items():
        for count, rows in by_count.items():
            for name, r in rows.items():
                if name == "oracle":
                    continue
                filtered = r.get("nu_filtered", {}).get("fsc05_A")
                turned = r.get("after_global_rotation", {}).get("fsc05_A", float("nan"))
                lines.append(f"| {snr} | {count} | {name} | {r['fsc05_A']:.2f} Å | {turned:.2f} Å | {r['fsc0143_A']:.2f} Å | "
                             f"{'–' if filtered is None else f'{filtered:.2f} Å'} | {r['gold_standard_A']:.2f} Å | "
                             f"{r['pose_error_median_deg']:.2f}° | {r.get('pose_error_joint_registered_median_deg', float('nan')):.2f}° | "
                             f"{r['pose_error_registered_median_deg']:.2f}° "
                             f"({'/'.join(f'{a:.1f}°' for a in r['half_set_offsets_deg'])}) | "
                             f"{100 * r['fraction_over_6_deg']:.0f}% | "
                             f"{rows['oracle']['fsc05_A']:.2f} Å | {r['iterations']} | {r['wall_s']} s |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, nargs="+", default=[4000, 16000], help="particle counts")
    parser.add_argument("--snr", type=float, nargs="+", default=[0.05, 0.01])
    parser.add_argument("--box-size", type=int, default=96)
    parser.add_argument("--pixel-size-A", type=float, default=1.2)
    parser.add_argument("--chains", default="R", help="chains of the model (comma-separated; default CXCR4's receptor)")
    parser.add_argument("--model", default=None, help="atomic model (default: small_membrane_dataset's CXCR4)")
    parser.add_argument("--regularizers", nargs="+", default=["uniform", "nu"],
                        help="variants: a regularizer, optionally with RefineParams fields, e.g. "
                             "nu:nu_max_window_fraction=0.125,join_halves_A=20")
    parser.add_argument("--max-iterations", type=int, default=8)
    parser.add_argument("--floor", action="store_true",
                        help="also align once to the truth (protein + mean belt): the pose error the data allow")
    parser.add_argument("--truth-start", nargs="*", type=float, default=None, metavar="LOWPASS_A",
                        help="also refine from the truth (protein + mean belt) at Nyquist, or low-passed to each "
                             "LOWPASS_A given (0: Nyquist)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", required=True)
    parser.add_argument("--results", required=True, help="path prefix for .json and .md")
    parser.add_argument("--belt-grain", choices=list(BELT_GRAINS), default="atomic",
                        help="atomic: the detergent as ~1 Å blobs of 30 Å³ (each particle's belt has its own "
                             "high-resolution density, as real detergent does); smooth: 5 Å blobs of 800 Å³ "
                             "(small_membrane_dataset's defaults). key=value options override it")
    parser.add_argument("dataset_options", nargs="*", help="key=value options of build_dataset (after --)")
    args = parser.parse_args(argv)
    options = dict(BELT_GRAINS[args.belt_grain])
    for item in args.dataset_options:
        key, value = item.split("=", 1)
        options[key] = float(value) if value.replace(".", "", 1).isdigit() else value
    if args.model:
        options["model_path"] = args.model
    xp = resolve_xp(args.device)
    results = {"settings": {k: v for k, v in vars(args).items() if k not in ("out", "results")}, "datasets": {},
               "runs": {}}
    for snr in args.snr:
        data_dir = os.path.join(args.out, f"snr{snr:g}")
        t0 = time.time()
        if not os.path.isfile(os.path.join(data_dir, "dataset.json")):
            build_dataset(data_dir, max(args.n), chains=args.chains.split(","), box_size=args.box_size,
                          pixel_size_A=args.pixel_size_A, snr=snr, xp=xp, **options)
        with open(os.path.join(data_dir, "dataset.json")) as handle:
            info = json.load(handle)
        results["datasets"][f"{snr:g}"] = {"mass_kDa": info["mass_kDa"], "build_s": round(time.time() - t0, 1)}
        print(f"SNR {snr:g}: protein {info['mass_kDa']['protein']:.1f} kDa, belt {info['mass_kDa']['belt']:.1f} kDa",
              flush=True)
        results["runs"][f"{snr:g}"] = {str(count): run_count(data_dir, count, os.path.join(data_dir, f"n{count}"),
                                                             args.regularizers, args.max_iterations, args.device,
                                                             args.floor, None if args.truth_start is None
                                                             else args.truth_start or [None])
                                       for count in sorted(args.n)}
        os.makedirs(os.path.dirname(os.path.abspath(args.results)) or ".", exist_ok=True)
        with open(args.results + ".json", "w") as handle:       # after every SNR: a cut run keeps what it did
            json.dump(results, handle, indent=1)
        with open(args.results + ".md", "w") as handle:
            handle.write(table(results))
    print(table(results))


if __name__ == "__main__":
    main()
