"""cryocv (uniform and NU) side by side with RELION 3.1 3D auto-refine on the same particles
and the same start, judged against the true map.

The dataset: the bundled TRPV1 map (C4) Fourier-cropped to box 40 at 3.92 Å/px (the
same 157 Å field of view), simulated with CTF (defocus 0.8–2.5 µm, 300 kV), random
shifts and white noise (SNR 0.05). Every job starts from the truth low-passed to 30 Å
and imposes C4; RELION runs ``relion_refine_mpi --auto_refine`` as its GUI job writes it
(see bench/relion_autorefine.py) with ``--ini_high 30``.

With ``--dataset membrane`` the particles come from bench/membrane_dataset.py instead (TRPV1
core, four wobbling ankyrin domains, a per-particle micelle; ``--box-size``,
``--pixel-size-A``), judged against the protein at rest, also inside the rigid core's mask.
``--cryocv-device gpu`` runs cryocv on the GPU; ``--relion-mpi`` / ``--threads`` size RELION
(on a machine without RELION, source the relocated copy bench/relion_bundle.sh makes);
``--resume-relion`` continues an interrupted RELION run from its last iteration.

Each stage writes its own JSON under ``--out`` and is skipped when that JSON exists, so
the slow RELION run can go in the background (``--stages relion``) and the summary be
made later (``--stages summary``):

    python bench/bench_vs_relion.py --out bench/out/vs_relion --results bench/results/vs_relion

    . .relion/env.sh   # bench/relion_bundle.sh .relion, where RELION is not installed
    python bench/bench_vs_relion.py --dataset membrane --box-size 96 --pixel-size-A 1.8 --snr 0.02 \
        --cryocv-device gpu --relion-mpi 5 --threads 4 --out /tmp/m96 \
        --results bench/results/vs_relion_membrane96

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
from cryocv.fourier import lowpass_map  # noqa: E402
from cryocv.jobs import simulate  # noqa: E402
from cryocv.jobs.demo import DEMO_MAP  # noqa: E402
from cryocv.jobs.refine import RefineParams, run as run_refine  # noqa: E402
from cryocv.io.particle_files import load_particles  # noqa: E402
from cryocv.symmetry import pose_distance_deg as pose_change_deg  # noqa: E402

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


def make_membrane_dataset(out_dir: str, n_particles: int, snr: float, seed: int, box_size: int,
                          pixel_size_A: float, model_path: str) -> dict:
    """The membrane-protein simulation of bench/membrane_dataset.py (TRPV1 core, wobbling ankyrin
    domains, per-particle micelle) in ``out_dir/sim``; truth.mrc is the protein at rest,
    start.mrc its 30 Å low-pass (the dataset's initial reference), core_mask.mrc the rigid core."""
    import shutil
    from cryocv.backend import resolve_xp
    from membrane_dataset import build_dataset
    sim = os.path.join(out_dir, "sim")
    info = build_dataset(sim, n_particles, box_size=box_size, pixel_size_A=pixel_size_A, snr=snr, seed=seed,
                         xp=resolve_xp("auto"), progress=False, model_path=model_path)
    extent = info["truth"]["extent"]
    for source, target in (("truth_protein.mrc", "truth.mrc"), ("initial_reference.mrc", "start.mrc"),
                           ("core_mask.mrc", "core_mask.mrc")):
        shutil.copyfile(os.path.join(sim, source), os.path.join(out_dir, target))
    return {"dataset": "membrane", "box_size": box_size, "pixel_size_A": pixel_size_A, "n_particles": n_particles,
            "snr": snr, "seed": seed, "wobble_sigma_deg": info["wobble_sigma_deg"],
            # RELION's mask diameter: the protein or micelle, whichever reaches further, plus 10 Å
            "particle_diameter_A": round(min(box_size * pixel_size_A - 2 * pixel_size_A, 2 * max(
                extent["protein_max_radius_A"], extent["micelle_max_radius_A"]) + 10)),
            "description": info["description"]}


def make_dataset(out_dir: str, n_particles: int, snr: float, seed: int) -> dict:
    """truth.mrc, start.mrc (30 Å low-pass of the truth) and sim/particles.star in ``out_dir``."""
    volume, px = read_map(DEMO_MAP)
    truth = fourier_crop(volume, BOX)
    truth_px = px * volume.shape[0] / BOX
    os.makedirs(out_dir, exist_ok=True)
    write_map(os.path.join(out_dir, "truth.mrc"), truth, truth_px)
    write_map(os.path.join(out_dir, "start.mrc"), lowpass_map(truth, truth_px, 30.0), truth_px)
    simulate.run(os.path.join(out_dir, "truth.mrc"), os.path.join(out_dir, "sim"),
                 simulate.SimulateParams(n=n_particles, snr=snr, seed=seed), device="cpu", progress=False)
    return {"dataset": "rigid", "box_size": BOX, "pixel_size_A": truth_px, "n_particles": n_particles, "snr": snr,
            "seed": seed, "particle_diameter_A": PARTICLE_DIAMETER_A}


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def judge(volume, data_star: str, truth_dir: str) -> dict:
    """Resolution of ``volume`` (a map or its MRC path) against the truth (FSC 0.5 and 0.143, and
    inside the rigid core's mask where ``truth_dir`` has one) and the poses of ``data_star``
    against the true poses (modulo C4)."""
    truth, px = read_map(os.path.join(truth_dir, "truth.mrc"))
    if isinstance(volume, str):
        volume = read_map(volume)[0]
    curve = fsc_curve(volume, truth)
    true_poses = load_particles(os.path.join(truth_dir, "sim", "particles.star"))
    refined = load_particles(data_star)
    # one simulated stack (RELION reads a normalised copy of it): match rows on the index in the stack
    by_index = {int(k): i for i, k in enumerate(true_poses.stack_indices)}
    order = np.array([by_index[int(k)] for k in refined.stack_indices])
    err = pose_change_deg(refined.rotations, true_poses.rotations[order], SYMMETRY)
    shift = np.linalg.norm(refined.origin_A - true_poses.origin_A[order], axis=1)
    core = {}
    core_path = os.path.join(truth_dir, "core_mask.mrc")
    if os.path.isfile(core_path):  # membrane dataset: also the FSC inside the rigid core
        core_curve = fsc_curve(volume, truth, read_map(core_path)[0])
        core = {"core_vs_truth_0.5_A": resolution_at(core_curve, 0.5, truth.shape[0], px)}
    return {**core, "vs_truth_0.5_A": resolution_at(curve, 0.5, truth.shape[0], px),
            "vs_truth_0.143_A": resolution_at(curve, 0.143, truth.shape[0], px),
            "fsc_vs_truth": [round(float(v), 4) for v in curve],
            "pose_error_median_deg": float(np.median(err)), "pose_error_p90_deg": float(np.percentile(err, 90)),
            "fraction_over_10deg": float(np.mean(err > 10)), "shift_error_median_A": float(np.median(shift))}


def run_cryocv(out_dir: str, regularizer: str, seed: int, device: str = "cpu") -> dict:
    job = os.path.join(out_dir, f"cryocv_{regularizer}")
    params = RefineParams(regularizer=regularizer, symmetry=SYMMETRY, initial_lowpass_A=30.0, seed=seed)
    cpu0, t0 = _cpu_seconds(), time.perf_counter()
    report = run_refine(os.path.join(out_dir, "sim", "particles.star"), os.path.join(out_dir, "start.mrc"), job,
                        params, device=device, progress=False)
    wall, cpu = time.perf_counter() - t0, _cpu_seconds() - cpu0
    result = {"wall_time_s": round(wall, 1), "cpu_time_s": round(cpu, 1), "iterations": len(report["iterations"]),
              "device": device,
              "gold_standard_0.143_A": report["resolution_A"],
              **judge(os.path.join(job, "map.mrc"), os.path.join(job, "particles.star"), out_dir)}
    if regularizer == "nu":
        truth, px = read_map(os.path.join(out_dir, "truth.mrc"))
        nu_map, _ = read_map(os.path.join(job, "map_nu_filtered.mrc"))
        result["nu_filtered_vs_truth_0.5_A"] = resolution_at(fsc_curve(nu_map, truth), 0.5, truth.shape[0], px)

    return result


def run_relion(out_dir: str, threads: int, resume: bool = False, mpi_procs: int = 3) -> dict:
    """RELION auto-refine in ``out_dir/relion``; with ``resume`` an interrupted one is continued."""
    from relion_autorefine import OUTPUT_ROOT, continue_relion_autorefine, run_relion_autorefine
    job = os.path.join(out_dir, "relion")
    with open(os.path.join(out_dir, "dataset.json")) as handle:
        diameter_A = json.load(handle).get("particle_diameter_A", PARTICLE_DIAMETER_A)
    if resume:
        raw = continue_relion_autorefine(job, threads=threads, mpi_procs=mpi_procs,
                                         truth_map=os.path.join(out_dir, "truth.mrc"), truth_symmetry=SYMMETRY)
    else:
        raw = run_relion_autorefine(os.path.join(out_dir, "sim", "particles.star"), os.path.join(out_dir, "start.mrc"),
                                    job, symmetry=SYMMETRY, initial_lowpass_A=30.0,
                                    particle_diameter_A=diameter_A, threads=threads, mpi_procs=mpi_procs,
                                    truth_map=os.path.join(out_dir, "truth.mrc"))
    judged = judge(raw["final_map"], os.path.join(job, f"{OUTPUT_ROOT}_data.star"), out_dir)
    # the same unfiltered-halves average cryocv's map.mrc is: RELION's run_class001.mrc
    return {"wall_time_s": raw["wall_time_s"], "cpu_time_s": raw["cpu_time_s"], "iterations": raw["iterations"],
            "gold_standard_0.143_A": raw["relion_fsc_0.143_A"], "relion_reported_resolution_A":
            raw["relion_reported_resolution_A"], "shift_vs_truth_px": raw["shift_vs_truth_px"],
            "relion_version": raw["relion_version"], "command": raw["command"],
            "continued_from_iteration": raw.get("continued_from_iteration"), **judged}


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
    nu_map = os.path.join(out_dir, "cryocv_nu", "map_nu_filtered.mrc")
    if "cryocv_nu" in jobs and os.path.isfile(nu_map):  # NU's locally filtered map (same run and poses)
        jobs["cryocv_nu (map_nu_filtered.mrc)"] = {
            **jobs["cryocv_nu"], **judge(nu_map, os.path.join(out_dir, "cryocv_nu", "particles.star"), out_dir)}
    os.makedirs(os.path.dirname(os.path.abspath(results_prefix)), exist_ok=True)
    with open(results_prefix + ".json", "w") as handle:
        json.dump({"dataset": dataset, "jobs": jobs, "cpu_count": os.cpu_count()}, handle, indent=1)
    membrane = dataset.get("dataset") == "membrane"
    cryocv_devices = ", ".join(sorted({r.get("device", "cpu") for name, r in jobs.items()
                                       if name.startswith("cryocv")})) or "–"
    kind = ("membrane-protein simulation (micelle, wobbling domains)" if membrane else "rigid simulation")
    lines = [f"# cryocv vs RELION 3.1 auto-refine: TRPV1 (C4) {kind}, box {dataset['box_size']}, "
             f"{dataset['pixel_size_A']:.2f} Å/px, {dataset['n_particles']} particles, SNR {dataset['snr']}",
             "", "Same particles, same 30 Å start, C4 imposed; maps judged against the true "
             + ("protein map (whole map, and inside the rigid core's mask)." if membrane else "map."),
             f"Machine: {os.cpu_count()} CPU cores; cryocv ran on {cryocv_devices}, "
             "RELION on the CPU (MPI ranks × threads in its command line in the JSON).", "",
             "| job | vs truth FSC 0.5 (Å) | " + ("rigid core vs truth 0.5 (Å) | " if membrane else "")
             + "vs truth FSC 0.143 (Å) | gold-standard 0.143 (Å) | "
             "median pose error (°) | median shift error (Å) | iterations | wall (s) | CPU (s) |",
             "|---|---|---|---|---|---|---|---|---|" + ("---|" if membrane else "")]
    def cell(value, digits=2):
        return "–" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"

    for name, r in jobs.items():
        core = f"{cell(r.get('core_vs_truth_0.5_A'))} | " if membrane else ""
        lines.append(f"| {name} | {cell(r['vs_truth_0.5_A'])} | {core}{cell(r['vs_truth_0.143_A'])} | "
                     f"{cell(r['gold_standard_0.143_A'])} | {cell(r['pose_error_median_deg'])} | "
                     f"{cell(r['shift_error_median_A'])} | {r['iterations']} | {cell(r['wall_time_s'], 0)} | "
                     f"{cell(r['cpu_time_s'], 0)} |")
    resumed = jobs.get("relion", {}).get("continued_from_iteration")
    if resumed is not None:
        lines += ["", f"RELION was interrupted after iteration {resumed} and continued from it: its wall time "
                      "adds the time up to that iteration to the continued run's, its CPU time is the "
                      "continued run's only."]
    if any(r.get("unfinished") for r in jobs.values()):
        lines += ["", "RELION had not finished: its row is the average of the two half-maps of its last "
                      "iteration, with the wall time up to then."]
    lines += ["", "cryocv's map.mrc and RELION's run_class001.mrc are unfiltered averages of the two half-maps; "
                  "an isotropic filter does not change their FSC against the truth. NU's map_nu_filtered.mrc is "
                  "locally filtered (same run, same poses as cryocv_nu), which can."]
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
    ax.set_title(f"TRPV1 C4 {'membrane ' if membrane else ''}simulation: cryocv vs RELION 3.1 auto-refine",
                 fontsize=10)
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
    parser.add_argument("--dataset", choices=["rigid", "membrane"], default="rigid",
                        help="rigid: the bundled TRPV1 map at box 40; membrane: bench/membrane_dataset.py")
    parser.add_argument("--box-size", type=int, default=64, help="membrane dataset box (default 64)")
    parser.add_argument("--pixel-size-A", type=float, default=2.7, help="membrane dataset pixel (default 2.7 Å)")
    parser.add_argument("--model", default=os.path.join(HERE, "..", "..", "shared", "data", "models",
                                                        "3j5p_trpv1_c4.pdb"), help="TRPV1 model (membrane dataset)")
    parser.add_argument("--cryocv-device", choices=["cpu", "gpu", "auto"], default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="RELION --j per follower rank")
    parser.add_argument("--relion-mpi", type=int, default=3, help="RELION MPI ranks (leader + followers, ≥ 3)")
    parser.add_argument("--resume-relion", action="store_true",
                        help="continue an interrupted RELION run in OUT/relion from its last iteration")
    parser.add_argument("--stages", nargs="+", default=["dataset", "uniform", "nu", "relion", "summary"],
                        choices=["dataset", "uniform", "nu", "relion", "summary"])
    args = parser.parse_args(argv)
    stages = {
        "dataset": (lambda: make_dataset(args.out, args.n, args.snr, args.seed)) if args.dataset == "rigid" else
                   (lambda: make_membrane_dataset(args.out, args.n, args.snr, args.seed, args.box_size,
                                                  args.pixel_size_A, args.model)),
        "uniform": lambda: run_cryocv(args.out, "uniform", args.seed, args.cryocv_device),
        "nu": lambda: run_cryocv(args.out, "nu", args.seed, args.cryocv_device),
        "relion": lambda: run_relion(args.out, args.threads, args.resume_relion, args.relion_mpi),
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
