"""RELION 3.1's local refinement of a domain with signal subtraction, from a consensus given as
particle poses + map (the counterpart of ``cryocv local-refine --subtract``, bench/bench_local.py).

    python bench/relion_local.py consensus/particles.star consensus/map.mrc mask_domain.mrc \
        --keep-mask mask_domain.mrc --out runs/relion_local --sigma-ang 6.67 --offset-range-A 10 \
        [--dataset data_50]      # a bench/two_body_dataset.py folder: judge against the truth

RELION 3.1's ``relion_particle_subtract`` only takes the ``run_itNNN_optimiser.star`` of a RELION
refinement, and subtracts with the maps of that refinement. A consensus from elsewhere goes in
as three RELION jobs, run in ``out_dir`` (each stage's log in its folder):

a. ``consensus/``: ``relion_refine_mpi --split_random_halves --skip_align --iter 1 --K 1`` from
   the consensus STAR (stacks normalised by ``relion_preprocess --norm`` as
   bench/relion_autorefine.py does) and the consensus map. ``--skip_align`` keeps every pose
   (angles and origins come out unchanged to the STAR's 6 decimals) and the existing
   ``rlnRandomSubset`` split is kept, so ``run_it001_half{1,2}_class001.mrc`` are RELION's
   reconstructions of each half-set from the consensus poses, on the images' grey scale; the
   consensus map only seeds RELION (the iteration-1 half-maps came out bit-identical with the
   reference scaled by 100 or 0.01). ``--ini_high`` is set to Nyquist: without it RELION 3.1.3
   died with an MPI "message truncated" error; no ``--norm``/``--scale``, which would fit
   per-particle norms against a reference that is not on the images' grey scale.
b. ``Subtract/``: ``relion_particle_subtract_mpi --i consensus/run_it001_optimiser.star --mask
   KEEP --recenter_on_mask``. The mask marks what is KEPT (RELION projects ``map × (1 − mask)`` and
   subtracts it; values must lie in [0, 1]). With a split-halves optimiser it needs >= 2 MPI ranks:
   odd ranks subtract half-set 1 with the half-1 map, even ranks (rank 0 included) half-set 2
   with the half-2 map. ``--recenter_on_mask`` (the GUI's recommendation for focused refinement)
   moves the keep mask's centre of mass ``c`` (x, y, z px from the box centre) to the image centre:
   with ``r = o − (A c)_xy`` each image is translated by ``round(r)`` whole pixels and its origin
   becomes ``r − round(r)``. The subtracted particles then live in the frame ``V'(x) = V(x + c)``,
   so RELION's rotations about the box centre are rotations about the mask's centre of mass,
   cryocv's default fulcrum, and ``--offset_range`` means the same as cryocv's shift extent.
c. ``local/``: ``relion_refine_mpi --auto_refine --split_random_halves`` on the subtracted
   particles (same half-sets), ``--ref`` the consensus map × the keep mask and ``--solvent_mask``
   the domain mask (both moved by −c into the new frame), ``--firstiter_cc``, ``--ini_high``,
   ``--solvent_correct_fsc`` (the GUI's "Use solvent-flattened FSCs", meant for small masks) and
   local searches from iteration 1 around the consensus poses:
   ``--healpix_order 3 --auto_local_healpix_order 4 --sigma_ang S``. How RELION 3.1.3 handles
   that (src/ml_optimiser.cpp): ``--sigma_ang`` switches the orientational prior on from the
   start (a Gaussian of σ = S on rot, tilt and psi, centred on each particle's current angles,
   orientations beyond 3σ skipped); when the auto-sampling later reaches ``healpix_order >=
   auto_local_healpix_order`` RELION replaces σ by 2 × its (oversampled) angular step as usual.
   Had the start been ``healpix_order >= auto_local_healpix_order`` (e.g. 4/4) RELION would
   overwrite S with 2 × step at iteration 0 (3.75° for order 4), so ``--sigma_ang`` would have
   no effect. The prior follows the poses (re-centred every iteration), as RELION always does.
   Offsets: ``--offset_range`` = the shift extent in pixels around each particle's current
   origin, ``--offset_step`` 1 px, RELION's auto-refine adapting both later.

Outputs in the consensus frame (for comparisons with cryocv and the truth): ``local/
run_class001_consensus_frame.mrc`` (RELION's final map moved back by +c, Fourier shift) and
``local/run_data_consensus_frame.star`` (RELION's poses with origins mapped back to the original
images: ``o = o_relion + round(r) + (B c)_xy`` for a refined rotation ``B``; rotations are the same
in both frames; ``rlnImageName`` the input STAR's image, the subtracted one in
``rlnImageOriginalName``).

Smoke test (2 cores, RELION 3.1.3, the defaults): bench/two_body_dataset.py with 500 particles, box
64 at 2.85 Å, SNR 0.5, 50 kDa domain, true global poses and the true full map as the "consensus":
12 auto-refine iterations + the final one, 771 s wall (another job was loading the machine),
domain in its mask vs the truth FSC 0.5 at 6.29 Å (Nyquist 5.7 Å; the stage-a consensus map: 7.85
Å), domain pose error median 1.87° (p90 3.33°; doing nothing: 4.31°), origin error median 1.26 Å.
Subtracted particles reconstructed from the true domain poses moved into the re-centred frame and
back reach Nyquist (77 Å without moving back), and consensus → re-centred → consensus frame gives
the input origins back to 1e-5 Å.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time

import numpy as np
import starfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(1, os.path.dirname(HERE))

from relion_autorefine import (OUTPUT_ROOT, _iteration_files, _run_logged, iteration_log,  # noqa: E402
                               mpi_command, prepare_particles, refine_arguments, relion_fsc_resolution,
                               summarise)

from cryocv.geometry import euler_to_matrix  # noqa: E402
from cryocv.io.mrc import read_map, write_map  # noqa: E402
from cryocv.subtraction import center_of_mass  # noqa: E402

ANGLES = ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]
ORIGINS = ["rlnOriginXAngst", "rlnOriginYAngst"]


def sigma_for_extent(extent_deg: float) -> float:
    """RELION's ``--sigma_ang`` whose ±3σ local search spans ``extent_deg`` (cryocv's rotation extent)."""
    return extent_deg / 3.0


def shift_volume(volume, shift_xyz_px) -> np.ndarray:
    """``volume`` [z, y, x] moved by ``shift_xyz_px`` (x, y, z) px: ``V'(x) = V(x − s)`` (Fourier shift,
    periodic)."""
    volume = np.asarray(volume, dtype=np.float64)
    freqs = [np.fft.fftfreq(n) for n in volume.shape]               # z, y, x
    sz, sy, sx = (float(v) for v in np.asarray(shift_xyz_px)[::-1])
    phase = np.exp(-2j * np.pi * (freqs[0][:, None, None] * sz + freqs[1][None, :, None] * sy
                                  + freqs[2][None, None, :] * sx))
    return np.real(np.fft.ifftn(np.fft.fftn(volume) * phase)).astype(np.float32)


def shift_mask(mask, shift_xyz_px) -> np.ndarray:
    """A [0, 1] mask moved like :func:`shift_volume` (linear interpolation, so it stays in [0, 1])."""
    from scipy import ndimage
    moved = ndimage.shift(np.asarray(mask, dtype=np.float64), np.asarray(shift_xyz_px, dtype=float)[::-1],
                          order=1, mode="constant", cval=0.0)
    return np.clip(moved, 0.0, 1.0).astype(np.float32)


def _checked_mask(path: str, name: str, out_path: str, box: int, px: float) -> tuple[np.ndarray, str]:
    """The mask at ``path``; RELION refuses values outside [0, 1]: rounding excursions (< 1e-3)
    are clipped into a copy at ``out_path``, larger ones raise."""
    mask, mask_px = read_map(path)
    if mask.shape != (box,) * 3:
        raise ValueError(f"{name} {path} is {mask.shape}, the particles are {box} px")
    if mask_px is not None and abs(mask_px - px) > 1e-3:
        raise ValueError(f"{name} pixel {mask_px} Å differs from the particles' {px} Å")
    if mask.min() < -1e-3 or mask.max() > 1 + 1e-3:
        raise ValueError(f"{name} {path} has values in [{mask.min():g}, {mask.max():g}]; RELION needs [0, 1]")
    if mask.min() < 0 or mask.max() > 1:
        mask = np.clip(mask, 0, 1).astype(np.float32)
        write_map(out_path, mask, px)
        return mask, out_path
    return mask, os.path.abspath(path)


def consensus_arguments(particles_star: str, reference_mrc: str, out_dir: str, nyquist_A: float, threads: int,
                        particle_diameter_A: float | None = None) -> list:
    """Stage a: one ``--skip_align`` iteration that turns the consensus into a RELION optimiser."""
    cmd = ["relion_refine_mpi", "--o", os.path.join(out_dir, OUTPUT_ROOT), "--i", particles_star,
           "--ref", reference_mrc, "--split_random_halves", "--skip_align", "--iter", "1", "--K", "1",
           "--ini_high", f"{nyquist_A:.4f}", "--ctf", "--flatten_solvent", "--zero_mask", "--oversampling", "1",
           "--sym", "C1", "--pad", "2", "--j", str(threads), "--dont_combine_weights_via_disc", "--pool", "3"]
    if particle_diameter_A is not None:
        cmd += ["--particle_diameter", str(particle_diameter_A)]
    return cmd


def _origins_px(table, px: float) -> np.ndarray:
    return table[ORIGINS].to_numpy(dtype=np.float64) / px


def _absolute(image_name: str, folder: str) -> str:
    """``index@stack`` with the stack path made absolute against ``folder``."""
    index, _, stack = image_name.partition("@")
    return f"{index}@{stack if os.path.isabs(stack) else os.path.normpath(os.path.join(folder, stack))}"


def consensus_frame_poses(refined_star: str, subtracted_star: str, consensus_star: str, input_star: str,
                          centre_xyz_px, px: float, out_star: str, relion_cwd: str = ".") -> str:
    """Write RELION's refined poses (``refined_star``, recentred frame) in the consensus frame.

    ``subtracted_star``: RELION's ``particles_subtracted.star`` (residual origins ``r − round(r)``),
    ``consensus_star``: the poses it subtracted with (stage a's data.star), ``input_star``: the
    consensus STAR given by the caller (same order as ``consensus_star``), whose ``rlnImageName``
    goes in ``rlnImageName`` (RELION's subtracted image in ``rlnImageOriginalName``; stack paths
    made absolute, RELION's against ``relion_cwd``, the folder it ran in)."""
    refined = starfile.read(refined_star, always_dict=True)
    parts = refined["particles"]
    sub = starfile.read(subtracted_star, always_dict=True)["particles"].set_index("rlnImageName")
    cons = starfile.read(consensus_star, always_dict=True)["particles"]
    input_dir = os.path.dirname(os.path.abspath(input_star))
    original_name = dict(zip(cons["rlnImageName"],
                             [_absolute(n, input_dir) for n in
                              starfile.read(input_star, always_dict=True)["particles"]["rlnImageName"]]))
    cons = cons.set_index("rlnImageName")
    sub = sub.loc[parts["rlnImageName"]]
    cons = cons.loc[sub["rlnImageOriginalName"]]
    c = np.asarray(centre_xyz_px, dtype=np.float64)
    r = _origins_px(cons, px) - euler_to_matrix(cons[ANGLES].to_numpy(dtype=np.float64))[:, :2] @ c
    whole = np.rint(r - _origins_px(sub, px))                       # RELION's integer re-centring shift
    rotations = euler_to_matrix(parts[ANGLES].to_numpy(dtype=np.float64))
    origin = _origins_px(parts, px) + whole + rotations[:, :2] @ c
    out = parts.copy()
    out[ORIGINS[0]], out[ORIGINS[1]] = origin[:, 0] * px, origin[:, 1] * px
    out["rlnImageOriginalName"] = [_absolute(n, relion_cwd) for n in out["rlnImageName"]]
    out["rlnImageName"] = [original_name[n] for n in sub["rlnImageOriginalName"]]
    refined["particles"] = out
    starfile.write(refined, out_star, float_format="%.6f", overwrite=True)
    return out_star


def final_resolution(log_path: str) -> float | None:
    """RELION's last "Final resolution (without masking) is: X" line, or with a solvent mask and
    ``--solvent_correct_fsc`` "Final resolution (already with masking) is: X"."""
    if not os.path.exists(log_path):
        return None
    with open(log_path, errors="replace") as fh:
        found = re.findall(r"Final resolution \((?:without|already with) masking\) is: ([0-9.]+)", fh.read())
    return float(found[-1]) if found else None


def _iteration_complete(root: str) -> bool:
    """Are RELION's iteration files ``root``_* all there and readable (half-maps, model, data)?"""
    try:
        for h in (1, 2):
            read_map(f"{root}_half{h}_class001.mrc")
        starfile.read(f"{root}_half1_model.star", always_dict=True)["model_general"]
        return len(starfile.read(f"{root}_data.star", always_dict=True)["particles"]) > 0
    except Exception:
        return False


def _final_or_last(local_dir: str) -> dict:
    """RELION's final outputs, or (a run capped by ``--auto_iter_max``, which stops without the final
    joined iteration) the last iteration's: map = mean of its two half-maps."""
    final = os.path.join(local_dir, f"{OUTPUT_ROOT}_class001.mrc")
    if os.path.exists(final):
        return {"finished": True, "map": final, "data_star": os.path.join(local_dir, f"{OUTPUT_ROOT}_data.star"),
                **summarise(local_dir),
                "relion_final_resolution_A": final_resolution(os.path.join(local_dir, "relion.log"))}
    files = _iteration_files(local_dir)
    # a run stopped by a time limit may have been killed while writing its last iteration (the
    # optimiser file comes first, the data STAR last): take the newest iteration written whole
    complete = [it for it, path in files.items() if _iteration_complete(path.replace("_optimiser.star", ""))]
    if not complete:
        raise RuntimeError(f"RELION wrote no complete iteration in {local_dir}; see {local_dir}/relion.log")
    root = files[max(complete)].replace("_optimiser.star", "")
    halves = [f"{root}_half{h}_class001.mrc" for h in (1, 2)]
    (h1, px), (h2, _) = read_map(halves[0]), read_map(halves[1])
    mean = os.path.join(local_dir, f"{os.path.basename(root)}_halves_mean.mrc")
    write_map(mean, ((h1 + h2) / 2).astype(np.float32), px)
    general = starfile.read(f"{root}_half1_model.star", always_dict=True)["model_general"]
    return {"finished": False, "map": mean, "data_star": f"{root}_data.star", "iterations": max(complete),
            "half_maps": halves, "relion_final_resolution_A": None,
            "relion_reported_resolution_A": float(general["rlnCurrentResolution"]),
            "relion_fsc_0.143_A": relion_fsc_resolution(f"{root}_half1_model.star")}


def postprocess(local_dir: str, mask_path: str, px: float, log) -> dict:
    """``relion_postprocess`` of the final half-maps in ``mask_path`` (RELION's masked resolution)."""
    half1 = os.path.join(local_dir, f"{OUTPUT_ROOT}_half1_class001_unfil.mrc")
    if not os.path.exists(half1):
        return {}
    root = os.path.join(local_dir, "postprocess")
    cmd = ["relion_postprocess", "--i", half1, "--mask", mask_path, "--angpix", str(px), "--o", root,
           "--auto_bfac"]
    log.write(" ".join(shlex.quote(c) for c in cmd) + "\n")
    log.flush()
    proc = subprocess.run(cmd, cwd=local_dir, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0 or not os.path.exists(root + ".star"):
        return {"postprocess_error": f"relion_postprocess exited with {proc.returncode}"}
    general = starfile.read(root + ".star", always_dict=True)["general"]
    return {"relion_postprocess_masked_A": float(general["rlnFinalResolution"]),
            "relion_postprocess_bfactor_A2": float(general.get("rlnBfactorUsedForSharpening", float("nan")))}


def run_relion_local(consensus_star, consensus_map, domain_mask, keep_mask, out_dir, sigma_ang=20.0 / 3,
                     offset_range_A=10.0, threads=1, mpi_procs=3, healpix_order=3, auto_local_healpix_order=None,
                     offset_step_px=1.0, initial_lowpass_A=12.0, recenter=True, solvent_correct_fsc=True,
                     normalise=True, particle_diameter_A=None, max_iterations=None, extra_args=(),
                     nice_leader=True, local_time_limit_s=None) -> dict:
    """Local refinement of the domain in ``domain_mask`` by RELION 3.1 after subtracting everything
    outside ``keep_mask``, from the consensus poses in ``consensus_star`` and ``consensus_map``
    (stages a–c in the module docstring, run in ``out_dir``, which must be new or empty).

    ``sigma_ang`` (°): RELION's local-search σ for the first iterations (searches span ±3σ; the
    default 6.67° spans cryocv's 20° extent); ``offset_range_A``: translations searched around each
    current origin; ``threads``: ``--j`` per follower rank, ``mpi_procs`` ranks (>= 3; the leader
    runs under ``nice -n 19`` as in bench/relion_autorefine.py). ``auto_local_healpix_order``
    defaults to ``healpix_order + 1`` (see the docstring: equal orders would discard ``sigma_ang``).
    ``max_iterations`` caps auto-refine (``--auto_iter_max``, for smoke tests only: RELION then
    stops without its final joined iteration, and the map returned is the mean of the last
    iteration's half-maps; ``local_time_limit_s`` stops stage c after that long, judged the same way
    from its last complete iteration). Writes ``out_dir/relion_local.json`` and returns it: ``wall_s`` (all
    stages, normalisation included) and per stage, ``cpu_s`` (RELION's processes, per stage), ``resolution_A`` (RELION's final unmasked
    gold-standard resolution; ``relion_postprocess_masked_A`` in the domain mask), ``map`` and
    ``data_star`` in the consensus frame (``relion_map``, ``relion_data_star``: RELION's own files,
    in the frame re-centred on the keep mask), ``centre_xyz_px`` (c) and the commands.
    """
    t_start = time.perf_counter()
    out_dir = os.path.abspath(out_dir)
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise FileExistsError(f"{out_dir} is not empty; use a new folder")
    stage_dirs = {k: os.path.join(out_dir, k) for k in ("consensus", "local")}
    for d in stage_dirs.values():
        os.makedirs(d, exist_ok=True)
    auto_local = healpix_order + 1 if auto_local_healpix_order is None else auto_local_healpix_order
    tables = starfile.read(consensus_star, always_dict=True)
    optics = tables["optics"]
    px, box = float(optics["rlnImagePixelSize"].iloc[0]), int(optics["rlnImageSize"].iloc[0])
    if "rlnRandomSubset" not in tables["particles"]:
        raise ValueError(f"{consensus_star} has no rlnRandomSubset: give the consensus's half-sets")
    volume, map_px = read_map(consensus_map)
    if volume.shape != (box,) * 3 or map_px is None or abs(map_px - px) > 1e-3:
        raise ValueError(f"consensus map {volume.shape} at {map_px} Å; the particles are {box} px at {px} Å")
    keep, keep_path = _checked_mask(keep_mask, "keep mask", os.path.join(out_dir, "keep_mask.mrc"), box, px)
    domain, _ = _checked_mask(domain_mask, "domain mask", os.path.join(out_dir, "domain_mask.mrc"), box, px)
    centre = center_of_mass(keep) if recenter else np.zeros(3)
    # stage c's reference and solvent mask in the subtracted particles' frame V'(x) = V(x + c)
    ref_local = os.path.join(out_dir, "reference_local_frame.mrc")
    write_map(ref_local, shift_volume(volume * keep, -centre), px)
    mask_local = os.path.join(out_dir, "domain_mask_local_frame.mrc")
    write_map(mask_local, shift_mask(domain, -centre), px)

    timings, cpu, commands = {}, {}, {}
    log_path = os.path.join(stage_dirs["consensus"], "relion.log")
    with open(log_path, "w") as log:
        t0 = time.perf_counter()
        star = prepare_particles(consensus_star, out_dir, normalise, None, log)
        timings["normalise_s"] = time.perf_counter() - t0
        cmd = mpi_command(consensus_arguments(star, os.path.abspath(consensus_map), stage_dirs["consensus"],
                                              2 * px, threads, particle_diameter_A), mpi_procs, nice_leader)
        timings["consensus_s"], cpu["consensus"] = _run_logged(cmd, out_dir, log, log_path)
        commands["consensus"] = " ".join(shlex.quote(c) for c in cmd)
    optimiser = os.path.join(stage_dirs["consensus"], f"{OUTPUT_ROOT}_it001_optimiser.star")
    consensus_data = os.path.join(stage_dirs["consensus"], f"{OUTPUT_ROOT}_it001_data.star")
    check_poses_kept(star, consensus_data)

    log_path = os.path.join(out_dir, "subtract.log")
    with open(log_path, "w") as log:
        args = ["relion_particle_subtract_mpi", "--i", optimiser, "--mask", keep_path, "--o", "Subtract/"]
        if recenter:
            args.append("--recenter_on_mask")
        cmd = mpi_command(args, mpi_procs, nice_leader=False)       # every rank subtracts
        timings["subtract_s"], cpu["subtract"] = _run_logged(cmd, out_dir, log, log_path)
        commands["subtract"] = " ".join(shlex.quote(c) for c in cmd)
    subtracted = os.path.join(out_dir, "Subtract", "particles_subtracted.star")

    local_dir = stage_dirs["local"]
    log_path = os.path.join(local_dir, "relion.log")
    with open(log_path, "w") as log:
        extra = ["--solvent_mask", mask_local, "--sigma_ang", f"{sigma_ang:.4f}"]
        if solvent_correct_fsc:
            extra.append("--solvent_correct_fsc")
        if max_iterations is not None:
            extra += ["--auto_iter_max", str(max_iterations)]
        args = refine_arguments(subtracted, ref_local, "C1", initial_lowpass_A, particle_diameter_A, threads,
                                healpix_order, offset_range_A / px, offset_step_px, True,
                                extra + [str(a) for a in extra_args], local_dir)
        args[args.index("--auto_local_healpix_order") + 1] = str(auto_local)
        cmd = mpi_command(args, mpi_procs, nice_leader)
        timings["local_s"], cpu["local"] = _run_logged(cmd, out_dir, log, log_path,  # cwd: Subtract/… paths
                                                       time_limit_s=local_time_limit_s)
        commands["local"] = " ".join(shlex.quote(c) for c in cmd)
        final = _final_or_last(local_dir)
        result_pp = postprocess(local_dir, mask_local, px, log) if final["finished"] else {}

    relion_map, px_map = read_map(final["map"])
    map_consensus = os.path.join(local_dir, f"{OUTPUT_ROOT}_class001_consensus_frame.mrc")
    write_map(map_consensus, shift_volume(relion_map, centre), px_map)
    data_consensus = consensus_frame_poses(final["data_star"], subtracted, consensus_data, consensus_star,
                                           centre, px, os.path.join(local_dir, f"{OUTPUT_ROOT}_data_consensus_frame.star"),
                                           out_dir)
    timings["wall_s"] = time.perf_counter() - t_start
    result = {
        "wall_s": round(timings["wall_s"], 1), **{k: round(v, 1) for k, v in timings.items() if k != "wall_s"},
        "cpu_s": {k: round(v, 1) for k, v in cpu.items()},
        "resolution_A": final.get("relion_final_resolution_A"),
        **{k: final.get(k) for k in ("relion_reported_resolution_A", "relion_fsc_0.143_A", "iterations",
                                     "finished")},
        **result_pp,
        "map": map_consensus, "data_star": data_consensus, "relion_map": final["map"],
        "relion_data_star": final["data_star"], "half_maps": final.get("half_maps"),
        "centre_xyz_px": [round(float(v), 4) for v in centre], "recentred": bool(recenter),
        "sigma_ang_deg": sigma_ang, "offset_range_A": offset_range_A, "offset_range_px": offset_range_A / px,
        "healpix_order": healpix_order, "auto_local_healpix_order": auto_local, "threads": threads,
        "mpi_procs": mpi_procs, "n_particles": int(len(tables["particles"])), "pixel_size_A": px, "box": box,
        "iteration_log": iteration_log(local_dir), "first_iteration": first_iteration_check(local_dir, subtracted),
        "commands": commands, "cpu_count": os.cpu_count(),
    }
    with open(os.path.join(out_dir, "relion_local.json"), "w") as fh:
        json.dump(result, fh, indent=1)
    return result


def check_poses_kept(input_star: str, data_star: str, tol_deg: float = 1e-3, tol_A: float = 1e-3):
    """Raise unless stage a's ``data_star`` has the input's angles, origins and half-sets."""
    a = starfile.read(input_star, always_dict=True)["particles"]
    b = starfile.read(data_star, always_dict=True)["particles"]
    joined = a.merge(b, on="rlnImageName", suffixes=("_in", "_out"))
    if len(joined) != len(a):
        raise RuntimeError(f"{data_star}: {len(joined)} of {len(a)} particles matched")
    for col, tol in [(c, tol_deg) for c in ANGLES] + [(c, tol_A) for c in ORIGINS] + [("rlnRandomSubset", 0)]:
        diff = np.abs(joined[f"{col}_in"].to_numpy(dtype=float) - joined[f"{col}_out"].to_numpy(dtype=float))
        if col in ANGLES:
            diff = np.minimum(diff, 360 - diff)
        if diff.max() > tol:
            raise RuntimeError(f"--skip_align changed {col} by up to {diff.max():g}")


def first_iteration_check(local_dir: str, subtracted_star: str) -> dict:
    """How far iteration 1 moved the poses from the consensus (all particles): a local search cannot
    move them by much more than 3σ."""
    files = _iteration_files(local_dir)
    if 1 not in files:
        return {}
    from cryocv.geometry import angular_distance_deg
    a = starfile.read(subtracted_star, always_dict=True)["particles"]
    b = starfile.read(files[1].replace("_optimiser.star", "_data.star"), always_dict=True)["particles"]
    joined = a.merge(b, on="rlnImageName", suffixes=("_in", "_out"))
    angle = angular_distance_deg(euler_to_matrix(joined[[f"{c}_in" for c in ANGLES]].to_numpy(dtype=float)),
                                 euler_to_matrix(joined[[f"{c}_out" for c in ANGLES]].to_numpy(dtype=float)))
    shift = np.hypot(*(joined[f"{c}_in"].to_numpy(dtype=float) - joined[f"{c}_out"].to_numpy(dtype=float)
                       for c in ORIGINS))
    general = starfile.read(files[1].replace("_optimiser.star", "_half1_model.star"),
                            always_dict=True)["model_general"]
    return {"angle_change_median_deg": float(np.median(angle)), "angle_change_max_deg": float(angle.max()),
            "shift_change_median_A": float(np.median(shift)), "shift_change_max_A": float(shift.max()),
            "sigma_prior_rot_deg": float(general["rlnSigmaPriorRotAngle"])}


def judge(result: dict, dataset_dir: str) -> dict:
    """The run against a bench/two_body_dataset.py truth: FSC of the map (consensus frame) with the
    true domain at rest in the domain mask (0.5 and 0.143, Å), and the domain pose error against
    ``A·W`` (°) and origin error against ``o_d`` (Å) of RELION's poses, next to doing nothing."""
    from two_body_dataset import (domain_origin_error_A, domain_pose_error_deg, load_truth,
                                  masked_fsc_resolution)
    truth = load_truth(dataset_dir)
    domain, px = read_map(os.path.join(dataset_dir, "map_domain.mrc"))
    mask, _ = read_map(os.path.join(dataset_dir, "mask_domain.mrc"))
    volume, _ = read_map(result["map"])
    parts = starfile.read(result["data_star"], always_dict=True)["particles"]
    names = starfile.read(os.path.join(dataset_dir, "particles.star"), always_dict=True)["particles"]["rlnImageName"]
    index = {os.path.basename(n.split("@")[1]) + "@" + str(int(n.split("@")[0])): i for i, n in enumerate(names)}
    order = np.array([index[os.path.basename(n.split("@")[1]) + "@" + str(int(n.split("@")[0]))]
                      for n in parts["rlnImageName"]])
    error = domain_pose_error_deg(parts[ANGLES].to_numpy(dtype=float), truth, order)
    origin = domain_origin_error_A(parts[ORIGINS].to_numpy(dtype=float), truth, order)
    return {"domain_fsc05_A": masked_fsc_resolution(volume, domain, mask, px, 0.5),
            "domain_fsc0143_A": masked_fsc_resolution(volume, domain, mask, px, 0.143),
            "domain_pose_error_median_deg": float(np.median(error)),
            "domain_pose_error_p90_deg": float(np.percentile(error, 90)),
            "domain_origin_error_median_A": float(np.median(origin)),
            "no_change_domain_angle_median_deg": float(np.median(np.abs(truth["domain_angles_deg"][order]))),
            "n_judged": int(len(order))}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("consensus_star", help="consensus particles (RELION 3.1 STAR with rlnRandomSubset)")
    p.add_argument("consensus_map", help="consensus map (MRC, same box and pixel as the particles)")
    p.add_argument("domain_mask", help="mask of the domain refined (RELION's --solvent_mask)")
    p.add_argument("--keep-mask", default=None, help="what subtraction keeps (default: the domain mask)")
    p.add_argument("--out", required=True, help="output folder (new or empty)")
    p.add_argument("--sigma-ang", type=float, default=None,
                   help="RELION --sigma_ang (°); default --rotation-extent-deg / 3")
    p.add_argument("--rotation-extent-deg", type=float, default=20.0, help="cryocv's extent, for --sigma-ang")
    p.add_argument("--offset-range-A", type=float, default=10.0)
    p.add_argument("--offset-step-px", type=float, default=1.0)
    p.add_argument("--healpix-order", type=int, default=3)
    p.add_argument("--auto-local-healpix-order", type=int, default=None, help="default --healpix-order + 1")
    p.add_argument("--ini-high", type=float, default=12.0, help="initial low-pass of the reference (Å)")
    p.add_argument("--threads", type=int, default=1, help="--j per follower rank")
    p.add_argument("--mpi", type=int, default=3, help="MPI ranks (leader + followers, at least 3)")
    p.add_argument("--diameter", type=float, default=None, help="RELION --particle_diameter (Å); default the box")
    p.add_argument("--no-recenter", action="store_true", help="subtract without --recenter_on_mask")
    p.add_argument("--no-solvent-correct-fsc", action="store_true")
    p.add_argument("--no-normalise", action="store_true", help="use the stacks as they are")
    p.add_argument("--max-iterations", type=int, default=None, help="--auto_iter_max (smoke tests only)")
    p.add_argument("--local-time-limit-s", type=float, default=None,
                   help="stop the local auto-refine after this long and judge its last complete iteration")
    p.add_argument("--extra", default="", help="more relion_refine arguments for stage c, one quoted string")
    p.add_argument("--dataset", default=None, help="a bench/two_body_dataset.py folder: judge against its truth")
    args = p.parse_args(argv)
    sigma = args.sigma_ang if args.sigma_ang is not None else sigma_for_extent(args.rotation_extent_deg)
    result = run_relion_local(
        args.consensus_star, args.consensus_map, args.domain_mask, args.keep_mask or args.domain_mask, args.out,
        sigma_ang=sigma, offset_range_A=args.offset_range_A, threads=args.threads, mpi_procs=args.mpi,
        healpix_order=args.healpix_order, auto_local_healpix_order=args.auto_local_healpix_order,
        offset_step_px=args.offset_step_px, initial_lowpass_A=args.ini_high, recenter=not args.no_recenter,
        solvent_correct_fsc=not args.no_solvent_correct_fsc, normalise=not args.no_normalise,
        particle_diameter_A=args.diameter, max_iterations=args.max_iterations, extra_args=shlex.split(args.extra),
        local_time_limit_s=args.local_time_limit_s)
    if args.dataset:
        result["vs_truth"] = judge(result, args.dataset)
        with open(os.path.join(os.path.abspath(args.out), "relion_local.json"), "w") as fh:
            json.dump(result, fh, indent=1)
    print(json.dumps({k: v for k, v in result.items() if k not in ("iteration_log", "commands")}, indent=1))


if __name__ == "__main__":
    main()
