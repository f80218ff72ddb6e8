"""Run RELION 3.1's gold-standard 3D auto-refine and report resolution and wall time.

A reference point for cryocv's refinement: the same particles and starting map
go through ``relion_refine_mpi --auto_refine --split_random_halves`` with the
flags RELION's GUI "3D auto-refine" job writes, and the outcome is summarised
in a JSON (wall and CPU time, iterations, RELION's own resolution, the 0.143
resolution of its half-maps computed by cryocv and, given the true map, the 0.5
resolution of the final map against it).

    python bench/relion_autorefine.py sim/particles.star ref30.mrc --out runs/relion \
        --diameter 84 --truth truth.mrc

What RELION 3.1.3 (Debian build) needs, found while writing this:

* ``--split_random_halves`` is refused by the serial ``relion_refine`` ("Cannot
  split data into random halves without using MPI!"); ``relion_refine_mpi``
  needs at least 3 ranks (a leader and one follower per half), so this runs
  ``mpirun --oversubscribe --bind-to none`` (plus ``--allow-run-as-root``
  under root) with 3 ranks. The leader only waits, but busy-polls a core
  while doing so, hence it runs under ``nice -n 19``; each follower runs
  ``--j`` threads.
* An existing ``rlnRandomSubset`` column is kept as the half-set split.
* ``rlnImageName`` is resolved against the working directory, not the STAR's
  folder, so a copy of the STAR with absolute stack paths is written to
  ``out_dir`` and RELION runs there.
* RELION expects images normalised to background mean 0 / sd 1 (it warns
  otherwise and its ``--norm`` correction assumes it); by default each stack
  is normalised with ``relion_preprocess --norm`` into ``out_dir`` first, the
  step RELION's particle extraction performs. After that the reference is no
  longer on the images' grey scale, hence ``--firstiter_cc`` by default (the
  GUI's "Ref. map is on absolute greyscale? No").
* Input angles and origins are ignored: auto-refine starts with a global
  search (healpix order 2: 15° coarse, 7.5° after adaptive oversampling, psi
  alike) and switches to local searches only once the sampling is fine enough.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import resource
import shlex
import signal
import shutil
import subprocess
import time

import numpy as np
import starfile

from cryocv.fsc import fsc_curve, gold_standard_fsc, resolution_at
from cryocv.geometry import angular_distance_deg, euler_to_matrix
from cryocv.io.mrc import read_map
from cryocv.symmetry import symmetry_operators

OUTPUT_ROOT = "run"


def mpi_command(program_args, n_procs: int = 3, nice_leader: bool = True) -> list:
    """``mpirun`` line running ``program_args`` (program first) as ``n_procs`` ranks on this machine.

    With ``nice_leader`` rank 0, RELION's leader, runs under ``nice -n 19`` in
    its own app context: it spends the E-step busy-polling in MPI_Recv (Open
    MPI's default), which took ~70 % of a core from the followers on 2 cores.
    """
    mpirun = shutil.which("mpirun")
    if mpirun is None or shutil.which(program_args[0]) is None:
        raise RuntimeError(f"RELION's gold-standard refinement needs {program_args[0]} and mpirun on the PATH")
    if n_procs < 3:
        raise ValueError("relion_refine_mpi --split_random_halves needs at least 3 MPI ranks")
    launcher = [mpirun, "--oversubscribe", "--bind-to", "none"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        launcher.append("--allow-run-as-root")
    program_args = [str(a) for a in program_args]
    if not nice_leader:
        return launcher + ["-np", str(n_procs)] + program_args
    return launcher + ["-np", "1", "nice", "-n", "19"] + program_args + [":", "-np", str(n_procs - 1)] + program_args


def _split_image_name(name: str):
    index, _, path = name.partition("@")
    return index, path


def prepare_particles(particles_star: str, out_dir: str, normalise: bool = True, bg_radius_px: float | None = None,
                      log=None) -> str:
    """Write ``out_dir/particles.star``: the input with absolute (optionally normalised) stack paths.

    Stack paths in ``rlnImageName`` are taken relative to the STAR's folder, as
    cryocv writes them. With ``normalise`` each stack is normalised by
    ``relion_preprocess --norm --bg_radius`` into ``out_dir`` (background radius
    in pixels; RELION's extraction default of 0.375 × box if None).
    """
    tables = starfile.read(particles_star, always_dict=True)
    if "particles" not in tables:
        raise ValueError(f"{particles_star} has no data_particles block (RELION 3.1 format expected)")
    parts = tables["particles"]
    star_dir = os.path.dirname(os.path.abspath(particles_star))
    renamed = {}
    for stack in sorted({_split_image_name(n)[1] for n in parts["rlnImageName"]}):
        source = stack if os.path.isabs(stack) else os.path.join(star_dir, stack)
        if not os.path.exists(source):
            raise FileNotFoundError(f"particle stack {source} (from {particles_star}) not found")
        target = os.path.abspath(source)
        if normalise:
            box = int(tables["optics"]["rlnImageSize"].iloc[0]) if "optics" in tables else None
            radius = bg_radius_px if bg_radius_px is not None else round(0.375 * box)
            target = os.path.join(os.path.abspath(out_dir), f"norm{len(renamed):03d}_{os.path.basename(source)}")
            subprocess.run(["relion_preprocess", "--operate_on", source, "--operate_out", target, "--norm",
                            "--bg_radius", str(radius)], check=True, stdout=log, stderr=subprocess.STDOUT)
        renamed[stack] = target
    parts["rlnImageName"] = [f"{i}@{renamed[p]}" for i, p in map(_split_image_name, parts["rlnImageName"])]
    out_star = os.path.join(out_dir, "particles.star")
    starfile.write(tables, out_star, float_format="%.6f", overwrite=True)
    return out_star


def refine_arguments(particles_star: str, reference_mrc: str, symmetry: str = "C1", initial_lowpass_A: float = 30,
                   particle_diameter_A: float | None = None, threads: int = 2, healpix_order: int = 2,
                   offset_range_px: float = 5, offset_step_px: float = 1, firstiter_cc: bool = True,
                   extra_args=(), out_dir: str = ".") -> list:
    """``relion_refine_mpi --auto_refine …`` as a GUI job writes it, output root ``out_dir/run``.

    ``out_dir`` must exist; RELION 3.1 rejects an output root without a folder
    part ("output directory does not exist!").
    """
    cmd = [
        "relion_refine_mpi", "--o", os.path.join(out_dir, OUTPUT_ROOT), "--i", particles_star, "--ref", reference_mrc,
        "--auto_refine", "--split_random_halves", "--ini_high", str(initial_lowpass_A),
        "--ctf", "--flatten_solvent", "--zero_mask", "--oversampling", "1",
        "--healpix_order", str(healpix_order), "--auto_local_healpix_order", "4",
        "--offset_range", str(offset_range_px), "--offset_step", str(offset_step_px),
        "--sym", symmetry, "--low_resol_join_halves", "40", "--norm", "--scale", "--pad", "2",
        "--j", str(threads), "--dont_combine_weights_via_disc", "--pool", "3"]
    if firstiter_cc:
        cmd.append("--firstiter_cc")
    if particle_diameter_A is not None:
        cmd += ["--particle_diameter", str(particle_diameter_A)]
    return cmd + [str(a) for a in extra_args]


def _iteration_files(out_dir: str):
    """{iteration: path} of the ``run_itNNN_optimiser.star`` files."""
    found = {}
    for path in glob.glob(os.path.join(out_dir, f"{OUTPUT_ROOT}_it[0-9][0-9][0-9]_optimiser.star")):
        found[int(re.search(r"_it(\d{3})_", path).group(1))] = path
    return dict(sorted(found.items()))


def iteration_log(out_dir: str) -> list:
    """Per iteration: finish time since iteration 0 (file mtimes), healpix order, resolution, local search.

    ``local_search`` is True once RELION sets an orientational prior (sigma of
    rot/tilt/psi > 0 in the half-1 model), i.e. after the global stage.
    """
    files = _iteration_files(out_dir)
    if not files:
        return []
    t0 = os.path.getmtime(files[min(files)])
    rows = []
    for it, path in files.items():
        sampling = starfile.read(path.replace("_optimiser.star", "_sampling.star"), always_dict=True)
        model_path = path.replace("_optimiser.star", "_half1_model.star")
        general = starfile.read(model_path, always_dict=True)["model_general"] if os.path.exists(model_path) else {}
        sigma = float(general.get("rlnSigmaPriorRotAngle", 0) or 0) if len(general) else 0.0
        rows.append({"iteration": it, "elapsed_s": round(os.path.getmtime(path) - t0, 1),
                     "healpix_order": int(sampling["sampling_general"]["rlnHealpixOrder"]),
                     "resolution_A": _finite(general["rlnCurrentResolution"]) if len(general) else None,
                     "local_search": sigma > 0})
    return rows


def _finite(value):
    """``float(value)``, or None where it is infinite or NaN (JSON has neither)."""
    value = float(value)
    return value if np.isfinite(value) else None


def integer_shift(moving, fixed) -> list:
    """Integer voxel shift (z, y, x) that best aligns ``moving`` onto ``fixed`` (cross-correlation peak)."""
    cc = np.real(np.fft.ifftn(np.fft.fftn(fixed) * np.conj(np.fft.fftn(moving))))
    peak = np.array(np.unravel_index(np.argmax(cc), cc.shape))
    n = np.array(cc.shape)
    return [int(v) for v in np.where(peak > n // 2, peak - n, peak)]


def relion_fsc_resolution(model_star: str, threshold: float = 0.143) -> float | None:
    """Resolution (Å) where RELION's gold-standard FSC in ``run_model.star`` first drops below ``threshold``."""
    tables = starfile.read(model_star, always_dict=True)
    fsc_table = tables.get("model_class_1")
    if fsc_table is None or "rlnGoldStandardFsc" not in fsc_table:
        return None
    fsc = fsc_table["rlnGoldStandardFsc"].to_numpy(dtype=float)
    res = fsc_table["rlnAngstromResolution"].to_numpy(dtype=float)
    below = np.nonzero(fsc[1:] < threshold)[0]
    if below.size == 0:
        return float(res[-1])
    i = below[0] + 1
    f0, f1 = fsc[i - 1], fsc[i]
    t = (f0 - threshold) / (f0 - f1) if f0 != f1 else 0.0
    return float(1.0 / (1.0 / res[i - 1] + t * (1.0 / res[i] - 1.0 / res[i - 1])))


def pose_errors(reference_star: str, data_star: str, symmetry: str = "C1") -> dict | None:
    """Median angular (°) and origin (Å) differences between RELION's poses and those in ``reference_star``.

    Rows are matched on ``rlnImageName``; None when ``reference_star`` has no
    angles. Meaningful when the reference poses are the truth (simulations):
    the refined map's frame is inherited from the starting reference.
    ``symmetry`` is the true map's point group (RELION axes): the angular
    error is the smallest over its symmetry-equivalent poses R·S, since a
    refinement in C1 of a symmetric particle picks any of them.
    """
    ref = starfile.read(reference_star, always_dict=True)["particles"]
    if "rlnAngleRot" not in ref:
        return None
    data = starfile.read(data_star, always_dict=True)["particles"]
    joined = ref.merge(data, on="rlnImageName", suffixes=("_ref", "_relion"))
    angles = ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]
    rot_ref = euler_to_matrix(joined[[f"{a}_ref" for a in angles]].to_numpy(dtype=float))
    rot_relion = euler_to_matrix(joined[[f"{a}_relion" for a in angles]].to_numpy(dtype=float))
    origins = ["rlnOriginXAngst", "rlnOriginYAngst"]
    shift = np.hypot(*(joined[f"{o}_ref"].to_numpy(dtype=float) - joined[f"{o}_relion"].to_numpy(dtype=float)
                       for o in origins))
    equivalent = np.einsum("nij,sjk->snik", rot_ref, symmetry_operators(symmetry))
    angle = angular_distance_deg(equivalent, rot_relion[None]).min(axis=0)
    return {"n_matched": int(len(joined)), "median_angle_error_deg": float(np.median(angle)),
            "fraction_within_10deg": float(np.mean(angle < 10)), "median_origin_error_A": float(np.median(shift))}


def _logged_final_resolution(log_path: str) -> float | None:
    """The "Final resolution (without masking)" RELION prints at the end of auto-refine, if logged."""
    if not os.path.exists(log_path):
        return None
    with open(log_path, errors="replace") as fh:
        found = re.findall(r"Final resolution \(without masking\) is: ([0-9.]+)", fh.read())
    return float(found[-1]) if found else None


def summarise(out_dir: str, truth_map: str | None = None) -> dict:
    """Resolutions and iteration count of a finished auto-refine in ``out_dir``."""
    final = os.path.join(out_dir, f"{OUTPUT_ROOT}_class001.mrc")
    halves = [os.path.join(out_dir, f"{OUTPUT_ROOT}_half{h}_class001_unfil.mrc") for h in (1, 2)]
    model = os.path.join(out_dir, f"{OUTPUT_ROOT}_model.star")
    for path in [final, model] + halves:
        if not os.path.exists(path):
            raise RuntimeError(f"RELION did not write {path}; see {os.path.join(out_dir, 'relion.log')}")
    general = starfile.read(model, always_dict=True)["model_general"]
    iterations = _iteration_files(out_dir)
    volume, px = read_map(final)
    half1, _ = read_map(halves[0])
    half2, _ = read_map(halves[1])
    n = volume.shape[0]
    out = {
        "iterations": max(iterations) if iterations else None,
        "relion_final_resolution_A": _logged_final_resolution(os.path.join(out_dir, "relion.log")),
        "relion_reported_resolution_A": float(general["rlnCurrentResolution"]),
        "relion_fsc_0.143_A": relion_fsc_resolution(model),
        "half_map_fsc_0.143_A": gold_standard_fsc(half1, half2, px)["resolution_unmasked_A"],
        "box_size": n, "pixel_size_A": px,
        "final_map": final, "half_maps": halves,
    }
    if truth_map is not None:
        truth, truth_px = read_map(truth_map)
        if truth.shape != volume.shape:
            raise ValueError(f"truth map {truth.shape} and RELION's map {volume.shape} differ in shape")
        if truth_px is not None and abs(truth_px - px) > 1e-3:
            raise ValueError(f"truth map pixel {truth_px} Å differs from RELION's {px} Å")
        curve = fsc_curve(volume, truth)
        out["resolution_vs_truth_0.5_A"] = resolution_at(curve, 0.5, n, px)
        out["fsc_vs_truth"] = [round(float(v), 4) for v in curve]
        out["shift_vs_truth_px"] = integer_shift(volume, truth)
    return out


def run_relion_autorefine(particles_star, reference_mrc, out_dir, symmetry="C1", initial_lowpass_A=30,
                          particle_diameter_A=None, threads=2, healpix_order=2, offset_range_px=5,
                          offset_step_px=1, extra_args=(), truth_map=None, normalise=True, firstiter_cc=True,
                          mpi_procs=3, nice_leader=True, truth_symmetry=None) -> dict:
    """Run RELION 3.1 3D auto-refine on ``particles_star`` from ``reference_mrc`` in ``out_dir``.

    ``threads`` is ``--j`` per follower rank (there are ``mpi_procs`` − 1
    followers); offsets are in pixels; ``particle_diameter_A`` None leaves
    RELION's default (the whole box) and normalises with a 0.375 × box
    background radius. ``extra_args`` are appended to relion_refine's
    arguments. Writes ``out_dir/relion_autorefine.json`` and RELION's output
    under ``out_dir/run_*`` (log in ``out_dir/relion.log``) and returns the
    summary: ``wall_time_s`` (RELION only, normalisation excluded),
    ``cpu_time_s``, ``iterations``, ``relion_reported_resolution_A``,
    ``half_map_fsc_0.143_A``, ``resolution_vs_truth_0.5_A`` (with
    ``truth_map``), per-iteration timing and the command line.
    """
    out_dir = os.path.abspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    if glob.glob(os.path.join(out_dir, f"{OUTPUT_ROOT}_it*")):
        raise FileExistsError(f"{out_dir} already holds a RELION run; use an empty folder")
    _, ref_px = read_map(reference_mrc)
    optics = starfile.read(particles_star, always_dict=True).get("optics")
    data_px = float(optics["rlnImagePixelSize"].iloc[0]) if optics is not None else None
    if ref_px is None or (data_px is not None and abs(ref_px - data_px) > 1e-3):
        raise ValueError(f"reference pixel size {ref_px} Å (MRC header) must equal the particles' {data_px} Å")
    box = int(optics["rlnImageSize"].iloc[0])
    bg_radius = None if particle_diameter_A is None else min(box // 2 - 1, round(particle_diameter_A / 2 / data_px))
    log_path = os.path.join(out_dir, "relion.log")
    with open(log_path, "w") as log:
        star = prepare_particles(particles_star, out_dir, normalise, bg_radius, log)
        args = refine_arguments(star, os.path.abspath(reference_mrc), symmetry, initial_lowpass_A,
                                particle_diameter_A, threads, healpix_order, offset_range_px, offset_step_px,
                                firstiter_cc, extra_args, out_dir)
        cmd = mpi_command(args, mpi_procs, nice_leader)
        wall, cpu = _run_logged(cmd, out_dir, log, log_path)
    return _report(out_dir, star, cmd, wall, cpu, truth_map, truth_symmetry or symmetry)


def _run_logged(cmd, cwd: str, log, log_path: str, time_limit_s: float | None = None) -> tuple[float, float]:
    """Run ``cmd`` in ``cwd`` with its output appended to ``log`` (after the command line);
    returns (wall seconds, CPU seconds of the children). Raises if it fails. ``time_limit_s``:
    stop it (its whole process group) after that long and return normally, the caller judging
    the last iteration it wrote (a peer given the same wall time as cryocv, or a device call's)."""
    log.write(" ".join(shlex.quote(c) for c in cmd) + "\n")
    log.flush()
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    # with a time limit, RELION (mpirun and its ranks) gets its own process group, stopped as a whole
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=time_limit_s is not None)

    def stop():
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if time_limit_s is not None:
                os.killpg(proc.pid, sig)
            else:
                proc.send_signal(sig)
            try:
                proc.wait(timeout=10)
                return
            except subprocess.TimeoutExpired:
                continue
    try:
        returncode = proc.wait(timeout=time_limit_s)
    except subprocess.TimeoutExpired:
        stop()
        log.write(f"\n[stopped after the {time_limit_s:g} s time limit]\n")
        returncode = 0
    except BaseException:            # Ctrl-C, a wrapper's signal: never leave RELION running orphaned
        stop()
        raise
    wall = time.perf_counter() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:2])}… exited with {returncode}; see {log_path}")
    return wall, (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)


def continue_relion_autorefine(out_dir, threads=2, mpi_procs=3, nice_leader=True, truth_map=None,
                               truth_symmetry="C1") -> dict:
    """Continue an interrupted auto-refine in ``out_dir`` from its last ``run_itNNN_optimiser.star``.

    RELION's ``--continue`` (the GUI's "Continue" button) reads every refinement
    setting from the optimiser file; only ``--j`` and the I/O options are
    given again. The wall time reported is the time up to the last completed
    iteration before the interruption (file mtimes since the prepared
    ``particles.star``) plus the continued run's; the work lost in the
    interrupted iteration is not counted (for one interruption: after a second one, the
    idle time before the first continue would be counted too). CPU time is the continued
    run's only.
    """
    out_dir = os.path.abspath(out_dir)
    files = _iteration_files(out_dir)
    star = os.path.join(out_dir, "particles.star")
    if not files or not os.path.exists(star):
        raise FileNotFoundError(f"{out_dir} holds no interrupted RELION auto-refine to continue")
    last = max(files)
    before_s = os.path.getmtime(files[last]) - os.path.getmtime(star)
    cmd = mpi_command(["relion_refine_mpi", "--continue", files[last], "--o", os.path.join(out_dir, OUTPUT_ROOT),
                       "--j", str(threads), "--dont_combine_weights_via_disc", "--pool", "3"], mpi_procs, nice_leader)
    log_path = os.path.join(out_dir, "relion.log")
    with open(log_path, "a") as log:
        log.write(f"\n# continued from iteration {last} (after {before_s:.0f} s)\n")
        wall, cpu = _run_logged(cmd, out_dir, log, log_path)
    result = _report(out_dir, star, cmd, before_s + wall, cpu, truth_map, truth_symmetry)
    result.update({"continued_from_iteration": last, "wall_time_before_interruption_s": round(before_s, 1),
                   "cpu_time_s_covers": "continued run only"})
    with open(os.path.join(out_dir, "relion_autorefine.json"), "w") as fh:
        json.dump(result, fh, indent=1)
    return result


def _report(out_dir, star, cmd, wall, cpu, truth_map, symmetry) -> dict:
    """Summary of a finished run in ``out_dir`` (also written to ``relion_autorefine.json``)."""
    result = {
        "wall_time_s": round(wall, 1),
        "cpu_time_s": round(cpu, 1),
        **summarise(out_dir, truth_map),
        "iteration_log": iteration_log(out_dir),
        "pose_errors_vs_input": pose_errors(star, os.path.join(out_dir, f"{OUTPUT_ROOT}_data.star"), symmetry),
        "n_particles": int(len(starfile.read(star, always_dict=True)["particles"])),
        "command": " ".join(shlex.quote(c) for c in cmd), "cwd": out_dir,
        "relion_version": subprocess.run(["relion_refine", "--version"], capture_output=True,
                                         text=True).stdout.split("\n")[0].strip(),
        "cpu_count": os.cpu_count(),
    }
    with open(os.path.join(out_dir, "relion_autorefine.json"), "w") as fh:
        json.dump(result, fh, indent=1)
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("particles", help="RELION 3.1 particle STAR (data_optics + data_particles)")
    parser.add_argument("reference", help="starting map (MRC, same pixel size and box as the particles)")
    parser.add_argument("--out", required=True, help="output folder (empty or new)")
    parser.add_argument("--sym", default="C1")
    parser.add_argument("--ini-high", type=float, default=30, help="initial low-pass of the reference (Å)")
    parser.add_argument("--diameter", type=float, default=None, help="mask diameter (Å); default the whole box")
    parser.add_argument("--threads", type=int, default=2, help="--j per follower rank")
    parser.add_argument("--mpi", type=int, default=3, help="MPI ranks (leader + followers, at least 3)")
    parser.add_argument("--healpix-order", type=int, default=2)
    parser.add_argument("--offset-range", type=float, default=5, help="pixels")
    parser.add_argument("--offset-step", type=float, default=1, help="pixels")
    parser.add_argument("--truth", default=None, help="true map, for the FSC against truth")
    parser.add_argument("--truth-sym", default=None,
                        help="point group of the true map for the pose errors (default --sym)")
    parser.add_argument("--no-normalise", action="store_true", help="use the stacks as they are")
    parser.add_argument("--absolute-greyscale", action="store_true",
                        help="reference is on the images' grey scale (no --firstiter_cc)")
    parser.add_argument("--no-nice-leader", action="store_true", help="run the MPI leader at normal priority")
    parser.add_argument("--extra", default="", help="more relion_refine arguments, one quoted string")
    args = parser.parse_args(argv)
    result = run_relion_autorefine(
        args.particles, args.reference, args.out, symmetry=args.sym, initial_lowpass_A=args.ini_high,
        particle_diameter_A=args.diameter, threads=args.threads, healpix_order=args.healpix_order,
        offset_range_px=args.offset_range, offset_step_px=args.offset_step, extra_args=shlex.split(args.extra),
        truth_map=args.truth, normalise=not args.no_normalise, firstiter_cc=not args.absolute_greyscale,
        mpi_procs=args.mpi, nice_leader=not args.no_nice_leader, truth_symmetry=args.truth_sym)
    shown = {k: v for k, v in result.items() if k not in ("fsc_vs_truth", "iteration_log")}
    print(json.dumps(shown, indent=1))


if __name__ == "__main__":
    main()
