"""RELION 3.1's symmetry relaxation on bench/bench_relax.py's pseudo-symmetric dataset (issue 14),
judged exactly as bench_relax judges cryocv (its :func:`bench_relax.judge`), for a side-by-side.

    python bench/relion_relax.py --dataset /tmp/relax --out runs/relion_relax \
        --results bench/results/relion_relax_trpv1_globin [--group C4] [--sigma-ang 5] [--mpi 5 --threads 3]

What runs (in ``--out``, log in ``relion.log``): the consensus STAR (DATASET/consensus.star: true
poses turned by a random C4 mate each, half-sets in ``rlnRandomSubset``, kept by RELION) with
absolute stack paths, normalised by ``relion_preprocess --norm`` (bench/relion_autorefine.py), then

    relion_refine_mpi --auto_refine --split_random_halves --sym C1 --relax_sym C4 --sigma_ang 5
        --healpix_order 3 --auto_local_healpix_order 4 --offset_range 3 --offset_step 1
        --ref DATASET/consensus_sym.mrc --ini_high 12 --firstiter_cc --ctf --flatten_solvent
        --zero_mask --particle_diameter 0.9·box·px --norm --scale --low_resol_join_halves 40
        --oversampling 1 --pad 2 --dont_combine_weights_via_disc --pool 3 --j T

(``refine_arguments`` of relion_autorefine.py, the GUI's auto-refine flags, plus the relaxation;
the exact line goes into the JSON). What ``--relax_sym`` does in RELION 3.1.3
(src/healpix_sampling.cpp, src/ml_optimiser.cpp): the sampling keeps the whole sphere (``--sym
C1``: no symmetry-equivalent directions removed, maps reconstructed in C1); for every particle the
local search selects the HEALPix directions within 3σ of its current (rot, tilt) as usual, and for
each of them adds, for every other operator of the relaxed group, the HEALPix direction nearest
its symmetry mate (searched within two coarse steps), with the same prior weight (Gaussian weight
/ group order): every mate gets an equal prior. The psi range stays around the current psi, which
is right for Cn about z (a mate differs in rot only) and why D/T/O/I cannot be relaxed this way;
near top views (tilt ≈ 0°/180°) the mates fall on the same pixel, so a few particles there are not
relaxed. Without ``--sigma_ang`` RELION sets σ = 0.0033° (the current pose and its mates only).
Choices:

* ``--sigma_ang 5`` (±15°) from iteration 1 needs ``--auto_local_healpix_order`` above
  ``--healpix_order``: with equal orders RELION overwrites σ at iteration 0 by 2 × the oversampled
  step (bench/relion_local.py's docstring), so 3/4; when the auto-sampling reaches order 4, σ
  becomes 2 × 1.875° and the searches stay local (mates included) to the end.
* the reference is the C4 average low-passed to ``--ini-high`` (12 Å, cryocv's
  ``initial_lowpass_A`` in bench_relax) and is not on the normalised images' grey scale, hence
  ``--firstiter_cc`` (the GUI's "absolute grey scale? No"): iteration 1 assigns each image its best
  CC pose among the prior's directions and mates; the symmetry is broken from there by the images.
* ``--offset_range 3 --offset_step 1`` px around the consensus origins (they are the true ones),
  ``--particle_diameter`` 90 % of the box (bench_relax fits the complex in 80–85 % of it).
* ``relion_refine_mpi --split_random_halves`` needs >= 3 ranks; the leader runs under ``nice``.

Judged against DATASET's truth (sim/particles.star, rows matched on image names): the global
operator g (the mate most particles landed on), fraction within 10° of true pose·gᵀ, median
error; the partner's masked FSC 0.5 of RELION's final map (``run_class001.mrc``; for a run capped
by ``--max-iterations``, the mean of the last half-maps) registered by g, next to the
reconstruction from the true poses (DATASET/true_poses/map.mrc, else made here by cryocv). Also
per iteration (fraction on the final g) and per half-set (each half's own g: RELION refines the
halves independently beyond 40 Å and may break the symmetry on different subunits in each).

On the GPU device (16 cores, no RELION package): ``bash bench/relion_bundle.sh .relion`` here,
then ``. .relion/env.sh`` there (carry ``.relion``) and ``--mpi 5 --threads 3``.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time

import numpy as np
import starfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(1, os.path.dirname(HERE))

from bench_relax import at_operator, judge, masked_fsc05, partner_mask  # noqa: E402
from relion_autorefine import (_iteration_files, _run_logged, iteration_log, mpi_command,  # noqa: E402
                               prepare_particles, refine_arguments)
from relion_local import _final_or_last  # noqa: E402

from cryocv.io.mrc import read_map  # noqa: E402
from cryocv.io.particle_files import load_particles  # noqa: E402
from cryocv.relax import mode_of  # noqa: E402
from cryocv.symmetry import symmetry_operators  # noqa: E402


def _keys(particles) -> list:
    """(absolute stack path, 0-based index) of each particle: how rows are matched across files."""
    return [(os.path.abspath(p), int(i)) for p, i in zip(particles.stack_paths, particles.stack_indices)]


def relion_input_star(consensus_star: str, out_star: str):
    """``consensus_star`` rewritten with absolute stack paths (cryocv resolves them as RELION would
    from the folder they were written in; RELION resolves against its working directory)."""
    particles = load_particles(consensus_star)
    tables = starfile.read(consensus_star, always_dict=True)
    tables["particles"]["rlnImageName"] = [f"{i + 1:06d}@{p}" for p, i in _keys(particles)]
    starfile.write(tables, out_star, float_format="%.6f", overwrite=True)
    return particles


def relion_to_truth_rows(data_star: str, prepared_star: str, consensus, truth) -> tuple[np.ndarray, object]:
    """(truth row of each row of RELION's ``data_star``, RELION's particles): RELION's (normalised)
    images → rows of ``prepared_star`` (same order as ``consensus``) → the consensus's stacks →
    the truth's rows."""
    refined = load_particles(data_star)
    prepared = {k: row for row, k in enumerate(_keys(load_particles(prepared_star)))}
    truth_row = {k: row for row, k in enumerate(_keys(truth))}
    consensus_keys = _keys(consensus)
    rows = np.array([truth_row[consensus_keys[prepared[k]]] for k in _keys(refined)])
    if len(np.unique(rows)) != len(truth):
        raise RuntimeError(f"{data_star}: {len(np.unique(rows))} of {len(truth)} particles matched")
    return rows, refined


def per_iteration(out_dir: str, prepared_star: str, consensus, truth, operators, global_mode: int) -> list:
    """Per RELION iteration: the fraction of particles within 10° of true pose·gᵀ (g the final
    global operator) and the occupancy of each mate (:func:`bench_relax.at_operator`)."""
    rows_out = []
    for it, path in _iteration_files(out_dir).items():
        data = path.replace("_optimiser.star", "_data.star")
        if not os.path.exists(data):
            continue
        rows, refined = relion_to_truth_rows(data, prepared_star, consensus, truth)
        found = at_operator(refined.rotations, truth.rotations[rows], operators, global_mode)
        rows_out.append({"iteration": it, "fraction_within_10deg_of_final_operator": found["fraction"],
                         "mode_occupancy": found["occupancy"]})
    return rows_out


def run(dataset: str, out_dir: str, results_path: str, group: str = "C4", sigma_ang: float = 5.0, mpi_procs: int = 3,
        threads: int = 1, ini_high_A: float = 12.0, healpix_order: int = 3, auto_local_healpix_order: int | None = None,
        offset_range_px: float = 3.0, offset_step_px: float = 1.0, diameter_A: float | None = None,
        max_iterations: int | None = None, time_limit_s: float | None = None, cryocv_results: str | None = None, extra_args=()) -> dict:
    """RELION 3.1 ``--relax_sym group`` from DATASET's consensus, judged as bench_relax judges cryocv;
    writes ``results_path``.json and returns it."""
    group = group.upper()
    if not (group.startswith("C") and group[1:].isdigit()):
        raise ValueError(f"RELION's --relax_sym turns directions only (psi kept): cyclic groups, not {group}")
    t_start = time.perf_counter()
    dataset, out_dir = os.path.abspath(dataset), os.path.abspath(out_dir)
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise FileExistsError(f"{out_dir} is not empty; use a new folder")
    os.makedirs(out_dir, exist_ok=True)
    auto_local = healpix_order + 1 if auto_local_healpix_order is None else auto_local_healpix_order
    if auto_local <= healpix_order:
        print(f"warning: --auto_local_healpix_order {auto_local} <= --healpix_order {healpix_order}: RELION "
              f"replaces --sigma_ang {sigma_ang} by 2 × its step at iteration 0", file=sys.stderr)
    ops = symmetry_operators(group)
    truth = load_particles(os.path.join(dataset, "sim", "particles.star"))
    input_star = os.path.join(out_dir, "consensus_input.star")
    consensus = relion_input_star(os.path.join(dataset, "consensus.star"), input_star)
    if not np.all(consensus.half_set > 0):
        raise ValueError(f"{dataset}/consensus.star has no rlnRandomSubset for every particle")
    px, box = consensus.pixel_size_A, consensus.box_size
    diameter = 0.9 * box * px if diameter_A is None else diameter_A
    bg_radius = min(box // 2 - 1, round(diameter / 2 / px))
    reference = os.path.join(dataset, "consensus_sym.mrc")
    log_path = os.path.join(out_dir, "relion.log")
    with open(log_path, "w") as log:
        t0 = time.perf_counter()
        star = prepare_particles(input_star, out_dir, True, bg_radius, log)
        normalise_s = time.perf_counter() - t0
        extra = ["--relax_sym", group, "--sigma_ang", f"{sigma_ang:g}"]
        if max_iterations is not None:
            extra += ["--auto_iter_max", str(max_iterations)]
        args = refine_arguments(star, reference, "C1", ini_high_A, round(diameter, 2), threads, healpix_order,
                                offset_range_px, offset_step_px, True, extra + [str(a) for a in extra_args], out_dir)
        args[args.index("--auto_local_healpix_order") + 1] = str(auto_local)
        cmd = mpi_command(args, mpi_procs, nice_leader=True)
        wall, cpu = _run_logged(cmd, out_dir, log, log_path, time_limit_s)
    final = _final_or_last(out_dir)

    rows, refined = relion_to_truth_rows(final["data_star"], star, consensus, truth)
    full, _ = read_map(os.path.join(dataset, "truth.mrc"))
    partner, _ = read_map(os.path.join(dataset, "partner.mrc"))
    mask_path = os.path.join(dataset, "partner_mask.mrc")
    mask = read_map(mask_path)[0] if os.path.exists(mask_path) else partner_mask(partner)
    relion_map, map_px = read_map(final["map"])
    if relion_map.shape != full.shape or abs(map_px - px) > 1e-3:
        raise RuntimeError(f"RELION's map {relion_map.shape} at {map_px} Å; the truth {full.shape} at {px} Å")
    true_rot = truth.rotations[rows]
    judged = judge(refined.rotations, true_rot, ops, relion_map, full, mask, px)
    halves = {}
    for h in (1, 2):
        pick = refined.half_set == h
        modes = mode_of(refined.rotations[pick], true_rot[pick], ops)
        halves[f"half{h}"] = int(np.bincount(modes, minlength=len(ops)).argmax())
    oracle_path = os.path.join(dataset, "true_poses", "map.mrc")
    if not os.path.exists(oracle_path):
        from cryocv.jobs.reconstruct import run as run_reconstruct
        run_reconstruct(os.path.join(dataset, "sim", "particles.star"), os.path.join(out_dir, "true_poses"),
                        progress=False, overwrite=True)
        oracle_path = os.path.join(out_dir, "true_poses", "map.mrc")
    oracle_map, _ = read_map(oracle_path)

    results = {
        "program": "RELION 3.1 relax_sym", "group": group, "n": len(truth), "box": box, "pixel_size_A": px,
        "fraction_true_pose_within_10deg": judged["fraction_true_pose_within_10deg"],
        "median_pose_error_deg": judged["median_pose_error_deg"],
        "global_operator": judged["global_operator"],
        "global_operator_per_half_set": halves,
        "partner_fsc05_relion_A": judged["partner_fsc05_A"],
        "partner_fsc05_true_poses_A": masked_fsc05(oracle_map, full, mask, px),
        "true_poses_map": oracle_path,
        "relion_wall_s": round(wall, 1), "relion_cpu_s": round(cpu, 1), "normalise_s": round(normalise_s, 1),
        "total_wall_s": round(time.perf_counter() - t_start, 1),
        "relion_iterations": final.get("iterations"), "relion_finished": final.get("finished"),
        "relion_final_resolution_A": final.get("relion_final_resolution_A"),
        "relion_reported_resolution_A": final.get("relion_reported_resolution_A"),
        "relion_fsc_0.143_A": final.get("relion_fsc_0.143_A"),
        "relion_map": final["map"], "relion_data_star": final["data_star"],
        "command": " ".join(shlex.quote(c) for c in cmd), "cwd": out_dir,
        "settings": {"sigma_ang_deg": sigma_ang, "healpix_order": healpix_order,
                     "auto_local_healpix_order": auto_local, "offset_range_px": offset_range_px,
                     "offset_step_px": offset_step_px, "ini_high_A": ini_high_A, "particle_diameter_A": diameter,
                     "mpi_procs": mpi_procs, "threads": threads, "max_iterations": max_iterations,
                     "time_limit_s": time_limit_s},
        "relion_version": subprocess.run(["relion_refine", "--version"], capture_output=True,
                                         text=True).stdout.split("\n")[0].strip(),
        "cpu_count": os.cpu_count(),
        "per_iteration": per_iteration(out_dir, star, consensus, truth, ops, judged["global_operator"]),
        "iteration_log": iteration_log(out_dir),
    }
    if cryocv_results:
        theirs = json.load(open(cryocv_results))
        results["cryocv"] = {k: theirs.get(k) for k in (
            "fraction_true_pose_within_10deg", "median_pose_error_deg", "global_operator", "partner_fsc05_relaxed_A",
            "partner_fsc05_true_poses_A", "relax_wall_s", "oracle_fraction_true_mate", "relax_mode")}
    with open(results_path + ".json", "w") as handle:
        json.dump(results, handle, indent=2, default=str)
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, help="a bench/bench_relax.py --out folder")
    parser.add_argument("--out", required=True, help="RELION's folder (new or empty)")
    parser.add_argument("--results", required=True, help="path without extension (.json)")
    parser.add_argument("--group", default="C4", help="--relax_sym (cyclic only)")
    parser.add_argument("--sigma-ang", type=float, default=5.0, help="RELION --sigma_ang (°; searches ±3σ)")
    parser.add_argument("--healpix-order", type=int, default=3)
    parser.add_argument("--auto-local-healpix-order", type=int, default=None, help="default --healpix-order + 1")
    parser.add_argument("--offset-range", type=float, default=3.0, help="px")
    parser.add_argument("--offset-step", type=float, default=1.0, help="px")
    parser.add_argument("--ini-high-A", type=float, default=12.0, help="initial low-pass of the reference (Å)")
    parser.add_argument("--diameter-A", type=float, default=None, help="--particle_diameter; default 0.9 × box")
    parser.add_argument("--mpi", type=int, default=3, help="MPI ranks (leader + followers, >= 3)")
    parser.add_argument("--threads", type=int, default=1, help="--j per follower rank")
    parser.add_argument("--max-iterations", type=int, default=None, help="--auto_iter_max (smoke tests only)")
    parser.add_argument("--time-limit-s", type=float, default=None,
                        help="stop RELION after this long and judge its last iteration (mean of its half-maps)")
    parser.add_argument("--cryocv-results", default=None, help="bench_relax's results JSON, copied alongside")
    parser.add_argument("--extra", default="", help="more relion_refine arguments, one quoted string")
    args = parser.parse_args(argv)
    results = run(args.dataset, args.out, args.results, args.group, args.sigma_ang, args.mpi, args.threads,
                  args.ini_high_A, args.healpix_order, args.auto_local_healpix_order, args.offset_range,
                  args.offset_step, args.diameter_A, args.max_iterations, time_limit_s=args.time_limit_s,
                  cryocv_results=args.cryocv_results, extra_args=shlex.split(args.extra))
    print(json.dumps({k: v for k, v in results.items() if k not in ("iteration_log", "per_iteration")}, indent=1,
                     default=str))


if __name__ == "__main__":
    main()
