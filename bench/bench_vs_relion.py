"""cryocv (uniform and NU) side by side with RELION 3.1 3D auto-refine on the same particles
and the same start, judged against the true map.

The dataset: the bundled TRPV1 map (C4) Fourier-cropped to box 40 at 3.92 Å/px (the
same 157 Å field of view), simulated with CTF (defocus 0.8–2.5 µm, 300 kV), random
shifts and white noise (SNR 0.05). Every job starts from the truth low-passed to 30 Å
and imposes C4; RELION runs ``relion_refine_mpi --auto_refine`` as its GUI job writes it
(see bench/relion_autorefine.py) with ``--ini_high 30``.

Each stage writes its own JSON under ``--out`` and is skipped when that JSON exists, so
the slow RELION run can go in the background (``--stages relion``) and the summary be
made later (``--stages summary``):

    python bench/bench_vs_relion.py --out bench/out/vs_relion --results bench/results/vs_relion

writes RESULTS.json, RESULTS.md and RESULTS.png (FSC of each map against the truth).
Times: wall clock and CPU seconds (user + system) of each job on this machine.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from cryocv.fsc import fsc_curve, resolution_at  # noqa: E402
from cryocv.io.mrc import read_map, write_map  # noqa: E402
from cryocv.jobs import DEMO_MAP, run_refine, run_simulate  # noqa: E402
from cryocv.particles import load_particles  # noqa: E402
from cryocv.refine import RefineParams, lowpass_map, pose_change_deg  # noqa: E402

SYMMETRY = "C4"
BOX = 40
PARTICLE_DIAMETER_A = 140.0


def fourier_crop(volume, box_size: int):
    """Resample a cubic map to ``box_size`` (smaller) by cropping its centered Fourier transform.

    The field of view is kept, so the pixel size grows by N / box_size.
    """
    n = volume.shape[0]
    start = n // 2 - box_size // 2
    window = slice(start, start + box_size)
    cropped = np.fft.ifftshift(np.fft.fftshift(np.fft.fftn(volume))[window, window, window])
    return (np.real(np.fft.ifftn(cropped)) * (box_size / n) ** 3).astype(np.float32)


def make_dataset(out_dir: str, n_particles: int, snr: float, seed: int) -> dict:
    """truth.mrc, start.mrc (30 Å low-pass of the truth) and sim/particles.star in ``out_dir``."""
    volume, px = read_map(DEMO_MAP)
    truth = fourier_crop(volume, BOX)
    truth_px = px * volume.shape[0] / BOX
    os.makedirs(out_dir, exist_ok=True)
    write_map(os.path.join(out_dir, "truth.mrc"), truth, truth_px)
    write_map(os.path.join(out_dir, "start.mrc"), lowpass_map(truth, truth_px, 30.0), truth_px)
    run_simulate(os.path.join(out_dir, "truth.mrc"), n_particles, os.path.join(out_dir, "sim"), snr=snr, seed=seed,
                 device="cpu", progress=False)
    return {"box_size": BOX, "pixel_size_A": truth_px, "n_particles": n_particles, "snr": snr, "seed": seed}


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def judge(map_path: str, data_star: str, truth_dir: str) -> dict:
    """Resolution of ``map_path`` against the truth (FSC 0.5 and 0.143) and pose errors (modulo C4)."""
    truth, px = read_map(os.path.join(truth_dir, "truth.mrc"))
    volume, _ = read_map(map_path)
    curve = fsc_curve(volume, truth)
    true_poses = load_particles(os.path.join(truth_dir, "sim", "particles.star"))
    refined = load_particles(data_star)
    # one simulated stack (RELION reads a normalised copy of it): match rows on the index in the stack
    by_index = {int(k): i for i, k in enumerate(true_poses.stack_indices)}
    order = np.array([by_index[int(k)] for k in refined.stack_indices])
    err = pose_change_deg(refined.rotations, true_poses.rotations[order], SYMMETRY)
    shift = np.linalg.norm(refined.origin_A - true_poses.origin_A[order], axis=1)
    return {"vs_truth_0.5_A": resolution_at(curve, 0.5, truth.shape[0], px),
            "vs_truth_0.143_A": resolution_at(curve, 0.143, truth.shape[0], px),
            "fsc_vs_truth": [round(float(v), 4) for v in curve],
            "pose_error_median_deg": float(np.median(err)), "pose_error_p90_deg": float(np.percentile(err, 90)),
            "shift_error_median_A": float(np.median(shift))}


def run_cryocv(out_dir: str, regularizer: str, seed: int) -> dict:
    job = os.path.join(out_dir, f"cryocv_{regularizer}")
    params = RefineParams(regularizer=regularizer, symmetry=SYMMETRY, initial_lowpass_A=30.0, seed=seed)
    cpu0, t0 = _cpu_seconds(), time.perf_counter()
    report = run_refine(os.path.join(out_dir, "sim", "particles.star"), os.path.join(out_dir, "start.mrc"), job,
                        params, device="cpu", progress=False)
    wall, cpu = time.perf_counter() - t0, _cpu_seconds() - cpu0
    result = {"wall_time_s": round(wall, 1), "cpu_time_s": round(cpu, 1), "iterations": len(report["iterations"]),
              "gold_standard_0.143_A": report["resolution_A"],
              **judge(os.path.join(job, "map.mrc"), os.path.join(job, "particles.star"), out_dir)}
    if regularizer == "nu":
        truth, px = read_map(os.path.join(out_dir, "truth.mrc"))
        nu_map, _ = read_map(os.path.join(job, "map_nu_filtered.mrc"))
        result["nu_filtered_vs_truth_0.5_A"] = resolution_at(fsc_curve(nu_map, truth), 0.5, BOX, px)
    return result


def run_relion(out_dir: str, threads: int) -> dict:
    from relion_autorefine import OUTPUT_ROOT, run_relion_autorefine
    job = os.path.join(out_dir, "relion")
    raw = run_relion_autorefine(os.path.join(out_dir, "sim", "particles.star"), os.path.join(out_dir, "start.mrc"),
                                job, symmetry=SYMMETRY, initial_lowpass_A=30.0, particle_diameter_A=PARTICLE_DIAMETER_A,
                                threads=threads, truth_map=os.path.join(out_dir, "truth.mrc"))
    judged = judge(raw["final_map"], os.path.join(job, f"{OUTPUT_ROOT}_data.star"), out_dir)
    # the same unfiltered-halves average cryocv's map.mrc is: RELION's run_class001.mrc
    return {"wall_time_s": raw["wall_time_s"], "cpu_time_s": raw["cpu_time_s"], "iterations": raw["iterations"],
            "gold_standard_0.143_A": raw["relion_fsc_0.143_A"], "relion_reported_resolution_A":
            raw["relion_reported_resolution_A"], "shift_vs_truth_px": raw["shift_vs_truth_px"],
            "relion_version": raw["relion_version"], "command": raw["command"], **judged}


def relion_in_progress(out_dir: str) -> dict | None:
    """A RELION run that has not finished: its last iteration's two half-maps averaged, judged
    against the truth, with the elapsed wall time (None before the first iteration)."""
    from relion_autorefine import OUTPUT_ROOT, _iteration_files
    job = os.path.join(out_dir, "relion")
    files = _iteration_files(job)
    if not files:
        return None
    last = max(files)
    prefix = os.path.join(job, f"{OUTPUT_ROOT}_it{last:03d}")
    halves = [read_map(f"{prefix}_half{h}_class001.mrc")[0] for h in (1, 2)]
    average = os.path.join(job, "in_progress_average.mrc")
    write_map(average, (halves[0] + halves[1]) / 2, read_map(os.path.join(out_dir, "truth.mrc"))[1])
    started = os.path.getmtime(os.path.join(job, "particles.star"))
    result = {"wall_time_s": round(os.path.getmtime(files[last]) - started, 1), "cpu_time_s": float("nan"),
              "iterations": last, "gold_standard_0.143_A": float("nan"), "unfinished": True,
              **judge(average, f"{prefix}_data.star", out_dir)}
    return result


def summarise(out_dir: str, results_prefix: str):
    with open(os.path.join(out_dir, "dataset.json")) as handle:
        dataset = json.load(handle)
    jobs = {}
    for name in ("cryocv_uniform", "cryocv_nu", "relion"):
        path = os.path.join(out_dir, f"{name}.json")
        if os.path.isfile(path):
            with open(path) as handle:
                jobs[name] = json.load(handle)
        elif name == "relion":
            partial = relion_in_progress(out_dir)
            if partial is not None:
                jobs["relion (unfinished)"] = partial
    os.makedirs(os.path.dirname(os.path.abspath(results_prefix)), exist_ok=True)
    with open(results_prefix + ".json", "w") as handle:
        json.dump({"dataset": dataset, "jobs": jobs, "cpu_count": os.cpu_count()}, handle, indent=1)
    lines = [f"# cryocv vs RELION 3.1 auto-refine: TRPV1 (C4), box {dataset['box_size']}, "
             f"{dataset['pixel_size_A']:.2f} Å/px, {dataset['n_particles']} particles, SNR {dataset['snr']}",
             "", "Same particles, same 30 Å start, C4 imposed; maps judged against the true map.", "",
             "| job | vs truth FSC 0.5 (Å) | vs truth FSC 0.143 (Å) | gold-standard 0.143 (Å) | "
             "median pose error (°) | median shift error (Å) | iterations | wall (s) | CPU (s) |",
             "|---|---|---|---|---|---|---|---|---|"]
    def cell(value, digits=2):
        return "–" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"

    for name, r in jobs.items():
        lines.append(f"| {name} | {cell(r['vs_truth_0.5_A'])} | {cell(r['vs_truth_0.143_A'])} | "
                     f"{cell(r['gold_standard_0.143_A'])} | {cell(r['pose_error_median_deg'])} | "
                     f"{cell(r['shift_error_median_A'])} | {r['iterations']} | {cell(r['wall_time_s'], 0)} | "
                     f"{cell(r['cpu_time_s'], 0)} |")
    if any(r.get("unfinished") for r in jobs.values()):
        lines += ["", "RELION had not finished: its row is the average of the two half-maps of its last "
                      "iteration, with the wall time up to then."]
    if "cryocv_nu" in jobs:
        lines += ["", f"NU's locally filtered map (map_nu_filtered.mrc) vs truth: "
                      f"{jobs['cryocv_nu']['nu_filtered_vs_truth_0.5_A']:.2f} Å at FSC 0.5."]
    with open(results_prefix + ".md", "w") as handle:
        handle.write("\n".join(lines) + "\n")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    n, px = dataset["box_size"], dataset["pixel_size_A"]
    for name, r in jobs.items():
        curve = np.array(r["fsc_vs_truth"])
        freq = np.arange(len(curve)) / (n * px)
        ax.plot(freq, curve, label=f"{name}: {r['vs_truth_0.5_A']:.2f} Å")
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("spatial frequency (1/Å)")
    ax.set_ylabel("FSC vs true map")
    ax.set_ylim(-0.05, 1.02)
    ax.legend()
    ax.set_title("TRPV1 C4 simulation: cryocv vs RELION 3.1 auto-refine")
    fig.tight_layout()
    fig.savefig(results_prefix + ".png", dpi=120)
    print("\n".join(lines))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench/out/vs_relion")
    parser.add_argument("--results", default="bench/results/vs_relion", help="prefix of RESULTS.{json,md,png}")
    parser.add_argument("--n", type=int, default=1000, help="particles")
    parser.add_argument("--snr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="RELION --j per follower rank (2 followers)")
    parser.add_argument("--stages", nargs="+", default=["dataset", "uniform", "nu", "relion", "summary"],
                        choices=["dataset", "uniform", "nu", "relion", "summary"])
    args = parser.parse_args(argv)
    stages = {
        "dataset": lambda: make_dataset(args.out, args.n, args.snr, args.seed),
        "uniform": lambda: run_cryocv(args.out, "uniform", args.seed),
        "nu": lambda: run_cryocv(args.out, "nu", args.seed),
        "relion": lambda: run_relion(args.out, args.threads),
    }
    names = {"dataset": "dataset", "uniform": "cryocv_uniform", "nu": "cryocv_nu", "relion": "relion"}
    for stage in args.stages:
        if stage == "summary":
            summarise(args.out, args.results)
            continue
        path = os.path.join(args.out, f"{names[stage]}.json")
        if os.path.isfile(path):
            print(f"{stage}: {path} exists, skipped")
            continue
        result = stages[stage]()
        with open(path, "w") as handle:
            json.dump(result, handle, indent=1)
        print(f"{stage}: done → {path}")


if __name__ == "__main__":
    main()
