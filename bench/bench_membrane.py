"""NU vs uniform refinement on a simulated membrane protein (TRPV1 + a disordered micelle
belt + wobbling ankyrin domains, see bench/membrane_dataset.py), with a data-efficiency
curve as in Punjani, Zhang & Fleet 2020, Fig. 6.

For each particle count, both regularizers refine the same particles from the same
30 Å start (C4); each result is judged against the truth: FSC of the final map
against the protein-only truth (whole map, and inside a mask of the rigid core),
and the pose error (modulo C4) against the true poses.

    python bench/bench_membrane.py --n 4000 8000 16000 32000 --out bench/out/membrane \
        --results bench/results/membrane
writes RESULTS.json, RESULTS.md and RESULTS.png.
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

from cryocv.backend import resolve_xp  # noqa: E402
from cryocv.fsc import fsc_curve, resolution_at  # noqa: E402
from cryocv.io.mrc import read_map  # noqa: E402
from cryocv.jobs.refine import RefineParams, run as run_refine  # noqa: E402
from cryocv.io.particle_files import load_particles, save_particles  # noqa: E402
from cryocv.symmetry import pose_distance_deg as pose_change_deg  # noqa: E402


def evaluate(job_dir: str, truth_dir: str, truth_particles, symmetry: str) -> dict:
    """Resolution against the truth and pose errors of one refinement."""
    truth, px = read_map(os.path.join(truth_dir, "truth_protein.mrc"))
    core_mask, _ = read_map(os.path.join(truth_dir, "core_mask.mrc"))
    n = truth.shape[0]
    full, _ = read_map(os.path.join(job_dir, "map.mrc"))
    with open(os.path.join(job_dir, "fsc.json")) as handle:
        report = json.load(handle)
    refined = load_particles(os.path.join(job_dir, "particles.star"))
    truth_sub = truth_particles.subset(np.arange(len(refined)))
    err = pose_change_deg(refined.rotations, truth_sub.rotations, symmetry)
    whole = fsc_curve(full, truth)
    core = fsc_curve(full, truth, core_mask)
    extra = {}
    nu_path = os.path.join(job_dir, "map_nu_filtered.mrc")
    if os.path.isfile(nu_path):
        nu_map, _ = read_map(nu_path)
        extra = {"nu_filtered_vs_truth_0.5_A": resolution_at(fsc_curve(nu_map, truth), 0.5, n, px),
                 "nu_filtered_core_vs_truth_0.5_A": resolution_at(fsc_curve(nu_map, truth, core_mask), 0.5, n, px)}
    return {**extra, "resolution_gold_standard_A": report["resolution_A"],
            "vs_truth_0.5_A": resolution_at(whole, 0.5, n, px), "vs_truth_0.143_A": resolution_at(whole, 0.143, n, px),
            "core_vs_truth_0.5_A": resolution_at(core, 0.5, n, px),
            "pose_error_median_deg": float(np.median(err)), "pose_error_p90_deg": float(np.percentile(err, 90)),
            "shift_error_median_A": float(np.median(np.linalg.norm(refined.origin_A - truth_sub.origin_A, axis=1))),
            "iterations": len(report["iterations"]),
            "fsc_vs_truth": whole.tolist(), "fsc_core_vs_truth": core.tolist()}


def plot(results: dict, path: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2), dpi=110)
    colors = {"nu": "tab:red", "uniform": "tab:blue"}
    counts = sorted({int(k) for k in results["runs"]})
    shown = [r for r in ("uniform", "nu") if all(r in rows for rows in results["runs"].values())]
    for reg in shown:
        rows = [results["runs"][str(c)][reg] for c in counts]
        axes[0].plot(counts, [1 / r["core_vs_truth_0.5_A"] for r in rows], "o-", color=colors[reg],
                     label=f"{reg.upper()}: rigid core vs truth (0.5)")
        axes[0].plot(counts, [1 / r["vs_truth_0.5_A"] for r in rows], "s--", color=colors[reg],
                     label=f"{reg.upper()}: whole map vs truth (0.5)")
        axes[0].plot(counts, [1 / r["resolution_gold_standard_A"] for r in rows], ":", color=colors[reg],
                     label=f"{reg.upper()}: gold-standard (0.143)")
        axes[1].plot(counts, [r["pose_error_median_deg"] for r in rows], "o-", color=colors[reg], label=reg.upper())
    axes[0].set_xscale("log")
    axes[0].set_xlabel("particles")
    axes[0].set_ylabel("1 / resolution (1/Å)")
    axes[0].set_title("data efficiency")
    axes[0].legend(fontsize=7)
    axes[1].set_xscale("log")
    axes[1].set_xlabel("particles")
    axes[1].set_ylabel("median pose error (°)")
    axes[1].axhline(2.0, color="k", ls=":", lw=0.8)
    axes[1].set_title("pose error vs truth (modulo C4)")
    axes[1].legend(fontsize=8)
    largest = str(counts[-1])
    px = results["pixel_size_A"]
    n = results["box_size"]
    freq = np.arange(n // 2 + 1) / (n * px)
    for reg in shown:
        axes[2].plot(freq, results["runs"][largest][reg]["fsc_vs_truth"], color=colors[reg],
                     label=f"{reg.upper()} whole map")
        axes[2].plot(freq, results["runs"][largest][reg]["fsc_core_vs_truth"], "--", color=colors[reg],
                     label=f"{reg.upper()} rigid core")
    axes[2].axhline(0.5, color="k", ls=":", lw=0.8)
    axes[2].set_xlabel("spatial frequency (1/Å)")
    axes[2].set_ylabel("FSC vs truth")
    axes[2].set_title(f"{largest} particles")
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, nargs="+", default=[4000, 8000, 16000, 32000])
    parser.add_argument("--snr", type=float, default=0.05)
    parser.add_argument("--box-size", type=int, default=96)
    parser.add_argument("--pixel-size-A", type=float, default=1.8)
    parser.add_argument("--wobble-sigma-deg", type=float, default=6.0)
    parser.add_argument("--model", help="TRPV1 model (default: ../shared/data/models/3j5p_trpv1_c4.pdb)")
    parser.add_argument("--max-iterations", type=int, default=8)
    parser.add_argument("--dataset-size", type=int, default=None,
                        help="particles to simulate (default the largest --n); the counts take the first ones")
    parser.add_argument("--regularizers", nargs="+", default=["uniform", "nu"],
                        help="variants: a regularizer, optionally with RefineParams fields, e.g. "
                             "nu:nu_max_window_fraction=0.125 (the plot shows uniform and nu)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--results", required=True, help="path prefix for .json, .md and .png")
    args = parser.parse_args(argv)
    from membrane_dataset import build_dataset
    from bench_small_membrane import variant, variant_folder
    model = args.model or os.path.join(HERE, "..", "..", "shared", "data", "models", "3j5p_trpv1_c4.pdb")
    xp = resolve_xp("auto")
    data_dir = os.path.join(args.out, "dataset")
    started = time.time()
    info = build_dataset(data_dir, args.dataset_size or max(args.n), box_size=args.box_size, pixel_size_A=args.pixel_size_A, snr=args.snr,
                         seed=0, wobble_sigma_deg=args.wobble_sigma_deg, xp=xp, progress=False, model_path=model)
    all_particles = load_particles(os.path.join(data_dir, "particles.star"))
    kept = ("box_size", "pixel_size_A", "snr", "n", "wobble_sigma_deg")
    results = {"dataset": {k: v for k, v in info.items() if k in kept},
               "box_size": all_particles.box_size, "pixel_size_A": all_particles.pixel_size_A,
               "simulate_s": round(time.time() - started, 1), "runs": {}}
    for count in sorted(args.n):
        subset_dir = os.path.join(args.out, f"n{count}")
        os.makedirs(subset_dir, exist_ok=True)
        star = os.path.join(subset_dir, "particles.star")
        save_particles(all_particles.subset(np.arange(count)), star)
        results["runs"][str(count)] = {}
        for reg in args.regularizers:
            regularizer, options = variant(reg)
            job = os.path.join(subset_dir, variant_folder(reg))
            t0 = time.time()
            run_refine(star, os.path.join(data_dir, "initial_reference.mrc"), job,
                       RefineParams(regularizer=regularizer, symmetry="C4", max_iterations=args.max_iterations,
                                    **options), device="auto", progress=False)
            row = evaluate(job, data_dir, all_particles, "C4")
            row["wall_s"] = round(time.time() - t0, 1)
            results["runs"][str(count)][reg] = row
            print(f"{count} {reg}: core {row['core_vs_truth_0.5_A']:.2f} Å, whole {row['vs_truth_0.5_A']:.2f} Å, "
                  f"gold {row['resolution_gold_standard_A']:.2f} Å, pose {row['pose_error_median_deg']:.2f}°, "
                  f"{row['wall_s']} s", flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.results)), exist_ok=True)
    with open(args.results + ".json", "w") as handle:
        json.dump(results, handle, indent=1)
    plot(results, args.results + ".png")
    lines = ["| particles | regularizer | rigid core vs truth (FSC 0.5) | whole map vs truth (0.5) | gold-standard (0.143) "
             "| median pose error | iterations | wall |", "|---|---|---|---|---|---|---|---|"]
    for count in sorted(args.n):
        for reg in args.regularizers:
            r = results["runs"][str(count)][reg]
            lines.append(f"| {count} | {reg} | {r['core_vs_truth_0.5_A']:.2f} Å | {r['vs_truth_0.5_A']:.2f} Å | "
                         f"{r['resolution_gold_standard_A']:.2f} Å | {r['pose_error_median_deg']:.2f}° | "
                         f"{r['iterations']} | {r['wall_s']} s |")
    with open(args.results + ".md", "w") as handle:
        handle.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
