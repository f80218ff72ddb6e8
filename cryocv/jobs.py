"""Jobs behind the CLI: each reads files, computes on the chosen device and writes
its outputs atomically into a job directory (see README, "Job directory")."""
from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import time

import numpy as np

from . import __version__
from .backend import resolve_xp, to_device, to_numpy
from .errors import CryocvError
from .fsc import fsc_curve, gold_standard_fsc, resolution_at
from .io.mrc import atomic_path, read_map, write_map
from .particles import load_particles, random_half_sets, save_particles
from .symmetry import parse_symmetry

# TRPV1 (PDB 3J5P, C4) computed with gemmi at 2.8 Å/px, box 56
DEMO_MAP = os.path.join(os.path.dirname(__file__), "data", "trpv1_box56_2.8A.mrc.gz")


def write_json(path: str, data: dict):
    with atomic_path(path) as tmp:
        with open(tmp, "w") as handle:
            json.dump(data, handle, indent=2)


def _job_record(job: str, params: dict, xp, started: float) -> dict:
    import numpy
    return {"job": job, "cryocv_version": __version__, "parameters": params,
            "device": "gpu" if xp is not np else "cpu", "python": platform.python_version(),
            "numpy": numpy.__version__, "command": sys.argv, "wall_time_s": round(time.time() - started, 3)}


def run_simulate(map_path: str, n: int, out_dir: str, snr: float = 0.1, seed: int = 0, pixel_size_A=None,
                 shift_sigma_A: float = 3.0, defocus_min_A: float = 8000.0, defocus_max_A: float = 25000.0,
                 no_ctf: bool = False, device: str = "auto", progress: bool = True):
    """Simulate particles from a map → ``out_dir/particles.star`` + ``particles.mrcs``."""
    from .simulate import simulate
    started = time.time()
    _check_pixel_size(pixel_size_A)
    volume, header_px = read_map(map_path)
    pixel = pixel_size_A or header_px
    _check_map(volume, map_path)
    if not pixel or pixel <= 0:
        raise CryocvError(f"{map_path} has no pixel size in its header: pass --pixel-size-A")
    if n <= 0:
        raise CryocvError("--n must be positive")
    if not snr > 0:
        raise CryocvError("--snr must be positive")
    if not 0 < defocus_min_A <= defocus_max_A:
        raise CryocvError("defocus range must satisfy 0 < min <= max")
    xp = resolve_xp(device)
    particles = simulate(volume, pixel, n, out_dir, snr=snr, seed=seed, xp=xp, with_ctf=not no_ctf,
                         shift_sigma_A=shift_sigma_A, defocus_range_A=(defocus_min_A, defocus_max_A),
                         progress=progress)
    write_json(os.path.join(out_dir, "job.json"), _job_record("simulate", {
        "map": os.path.abspath(map_path), "n": n, "snr": snr, "seed": seed, "pixel_size_A": pixel,
        "shift_sigma_A": shift_sigma_A, "defocus_range_A": [defocus_min_A, defocus_max_A], "ctf": not no_ctf},
        xp, started))
    return particles


def _check_pixel_size(pixel_size_A):
    if pixel_size_A is not None and not (np.isfinite(pixel_size_A) and pixel_size_A > 0):
        raise CryocvError(f"--pixel-size-A must be a positive number, got {pixel_size_A}")


def _check_map(volume, path):
    if volume.shape[0] != volume.shape[1] or volume.shape[1] != volume.shape[2]:
        raise CryocvError(f"{path} is not cubic (shape {volume.shape})")


def run_reconstruct(particles_path: str, out_dir: str, symmetry: str = "C1", mask_path=None,
                    device: str = "auto", batch_size: int = 256, seed: int = 0, datadir=None,
                    progress: bool = True) -> dict:
    """Gold-standard reconstruction from given poses (see :func:`cryocv.reconstruct.reconstruct`)."""
    from .masks import auto_threshold_mask
    from .plotting import plot_fsc
    from .reconstruct import combine_half_maps, reconstruct_half_maps
    started = time.time()
    symmetry = _parse_symmetry(symmetry)
    # a rerun must not leave an older finished map beside new partial outputs
    for stale in ("map.mrc", "job.json"):
        if os.path.isfile(os.path.join(out_dir, stale)):
            os.remove(os.path.join(out_dir, stale))
    particles = load_particles(particles_path, datadir)
    particles.require_alignment("reconstruct")
    particles.check_metadata()
    particles.check_images()
    if np.all(particles.half_set == 0):
        particles.half_set = random_half_sets(len(particles), seed)
    elif np.any(particles.half_set == 0):
        raise CryocvError(f"{particles_path}: some particles have rlnRandomSubset and others not")
    for half in (1, 2):
        if not np.any(particles.half_set == half):
            raise CryocvError(f"{particles_path}: half-set {half} is empty; gold-standard reconstruction "
                              f"needs particles in both (rlnRandomSubset 1 and 2)")
    mask = None
    if mask_path:
        mask, _ = read_map(mask_path)
        if mask.shape != (particles.box_size,) * 3:
            raise CryocvError(f"mask {mask_path} is {mask.shape[0]} px, particles are {particles.box_size} px")
    xp = resolve_xp(device)
    half1, half2 = reconstruct_half_maps(particles, xp, symmetry, batch_size, progress=progress)
    average = (half1 + half2) / 2
    if mask is None and float(xp.max(average)) > 0:
        try:
            mask = to_numpy(auto_threshold_mask(average, particles.pixel_size_A))
        except ValueError:
            mask = None
    report = gold_standard_fsc(half1, half2, particles.pixel_size_A,
                               mask=None if mask is None else to_device(mask, xp), seed=seed)
    full = combine_half_maps(half1, half2, report.get("fsc_corrected", report["fsc_unmasked"]))
    report["symmetry"] = symmetry
    report["n_particles"] = len(particles)
    os.makedirs(out_dir, exist_ok=True)
    px = particles.pixel_size_A
    write_map(os.path.join(out_dir, "half_map_1.mrc"), to_numpy(half1), px)
    write_map(os.path.join(out_dir, "half_map_2.mrc"), to_numpy(half2), px)
    if mask is not None:
        write_map(os.path.join(out_dir, "mask.mrc"), mask, px)
    save_particles(particles, os.path.join(out_dir, "particles.star"))
    write_json(os.path.join(out_dir, "fsc.json"), report)
    plot_fsc(report, os.path.join(out_dir, "fsc.png"),
             title=f"{len(particles)} particles, {symmetry}: {report['resolution_A']:.2f} Å")
    write_json(os.path.join(out_dir, "job.json"), _job_record("reconstruct", {
        "particles": os.path.abspath(particles_path), "symmetry": symmetry, "mask": mask_path,
        "batch_size": batch_size, "seed": seed}, xp, started))
    write_map(os.path.join(out_dir, "map.mrc"), to_numpy(full), px)  # last: marks the job finished
    return report


def _parse_symmetry(symmetry: str) -> str:
    try:
        return parse_symmetry(symmetry)
    except ValueError as exc:
        raise CryocvError(str(exc)) from None


def run_fsc(map1_path: str, map2_path: str, mask_path=None, pixel_size_A=None) -> dict:
    """FSC of two maps: resolutions at 0.143 and 0.5 and the curve."""
    _check_pixel_size(pixel_size_A)
    map1, px1 = read_map(map1_path)
    map2, px2 = read_map(map2_path)
    if map1.shape != map2.shape:
        raise CryocvError(f"maps differ in size: {map1_path} is {map1.shape}, {map2_path} is {map2.shape}")
    _check_map(map1, map1_path)
    pixel = pixel_size_A or px1 or px2
    if not pixel:
        raise CryocvError("the maps have no pixel size in their headers: pass --pixel-size-A")
    if px1 and px2 and abs(px1 - px2) > 1e-3 * px1 and not pixel_size_A:
        raise CryocvError(f"pixel sizes differ: {px1:.4f} Å vs {px2:.4f} Å")
    mask = None
    if mask_path:
        mask, _ = read_map(mask_path)
        if mask.shape != map1.shape:
            raise CryocvError(f"mask {mask_path} has shape {mask.shape}, maps have {map1.shape}")
    curve = fsc_curve(map1, map2, mask)
    n = map1.shape[0]
    return {"resolution_0.143_A": resolution_at(curve, 0.143, n, pixel),
            "resolution_0.5_A": resolution_at(curve, 0.5, n, pixel), "pixel_size_A": pixel,
            "fsc": curve.tolist()}


def run_convert(in_path: str, out_path: str, datadir=None) -> int:
    """Convert particles between RELION STAR and cryoSPARC .cs; returns the count."""
    particles = load_particles(in_path, datadir)
    save_particles(particles, out_path)
    return len(particles)


def run_demo(out_dir: str, n: int = 2000, snr: float = 0.05, device: str = "auto", seed: int = 0,
             max_iterations: int = 4, progress: bool = True) -> dict:
    """The README demo: simulate TRPV1 particles (CTF, shifts, SNR 0.05) and run a C4 NU
    refinement from a 30 Å low-pass of the map; report the gold-standard resolution,
    the resolution against the true map and the pose error against the true poses."""
    from .refine import RefineParams, pose_change_deg
    sim_dir = os.path.join(out_dir, "simulated")
    run_simulate(DEMO_MAP, n, sim_dir, snr=snr, seed=seed, device=device, progress=progress)
    ref_dir = os.path.join(out_dir, "refine")
    if os.path.isfile(os.path.join(ref_dir, "checkpoint.json")):
        shutil.rmtree(ref_dir)  # the demo's own folder: a rerun starts over
    params = RefineParams(regularizer="nu", symmetry="C4", max_iterations=max_iterations, seed=seed)
    report = run_refine(os.path.join(sim_dir, "particles.star"), DEMO_MAP, ref_dir, params, device=device,
                        progress=progress)
    truth, px = read_map(DEMO_MAP)
    full, _ = read_map(os.path.join(ref_dir, "map.mrc"))
    report["resolution_vs_truth_0.5_A"] = resolution_at(fsc_curve(full, truth), 0.5, truth.shape[0], px)
    true_poses = load_particles(os.path.join(sim_dir, "particles.star"))
    refined = load_particles(os.path.join(ref_dir, "particles.star"))
    report["pose_error_median_deg"] = float(np.median(pose_change_deg(refined.rotations, true_poses.rotations, "C4")))
    return report

class JobLog:
    """Log lines to stdout (through tqdm, so bars stay intact) and to ``run.log`` in the job folder."""

    def __init__(self, path: str):
        self.path = path

    def __call__(self, message: str):
        from tqdm.auto import tqdm
        tqdm.write(message)
        with open(self.path, "a") as handle:
            handle.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')}  {message}\n")


def _select_gpu(gpu_ids):
    """Use the first of ``gpu_ids`` ("0", "0,1") as the CuPy device; returns the ids."""
    if gpu_ids is None:
        return None
    try:
        ids = [int(i) for i in str(gpu_ids).replace(" ", "").split(",") if i != ""]
    except ValueError:
        raise CryocvError(f"--gpu takes device numbers like 0 or 0,1; got {gpu_ids!r}") from None
    if not ids:
        raise CryocvError("--gpu needs at least one device number")
    from .backend import gpu_available
    if not gpu_available():
        raise CryocvError("--gpu was given but no CUDA GPU is visible to CuPy")
    import cupy
    count = cupy.cuda.runtime.getDeviceCount()
    bad = [i for i in ids if not 0 <= i < count]
    if bad:
        raise CryocvError(f"--gpu {gpu_ids}: this machine has GPUs 0..{count - 1}")
    cupy.cuda.Device(ids[0]).use()
    return ids


REFINE_CONFIG = "refine_config.json"


def refine_params_from_config(parameters: dict):
    """The :class:`~cryocv.refine.RefineParams` a job was started with, from its refine_config.json.
    Runs started before the base-candidate schedule kept ``n_candidates`` at every level and
    keep doing so when continued."""
    from .refine import RefineParams
    parameters = dict(parameters)
    parameters.setdefault("n_base_candidates", parameters.get("n_candidates", RefineParams.n_candidates))
    return RefineParams(**parameters)


def run_refine(particles_path: str | None, reference_path: str | None, out_dir: str, params=None,
               device: str = "auto", gpu_ids=None, datadir=None, resume: bool = False,
               progress: bool = True) -> dict:
    """Gold-standard refinement job (see :mod:`cryocv.refine`); ``resume`` continues ``out_dir``
    from its last checkpoint with the settings it was started with."""
    from dataclasses import asdict
    from .plotting import plot_fsc, plot_poses
    from .refine import CheckpointStore, RefineParams, initial_state, refine
    started = time.time()
    config_path = os.path.join(out_dir, REFINE_CONFIG)
    store = CheckpointStore(out_dir)
    if resume:
        if not os.path.isfile(config_path):
            raise CryocvError(f"{out_dir} holds no refinement to continue (no {REFINE_CONFIG})")
        with open(config_path) as handle:
            config = json.load(handle)
        particles_path, reference_path, datadir = config["particles"], config["reference"], config["datadir"]
        params = refine_params_from_config(config["parameters"])
        device, gpu_ids = config["device"], config["gpu"]
    else:
        params = params or RefineParams()
        params.validate()
        params.symmetry = _parse_symmetry(params.symmetry)
        if os.path.isfile(os.path.join(out_dir, "checkpoint.json")):
            raise CryocvError(f"{out_dir} already holds a refinement: continue it with --continue {out_dir} "
                              f"or choose another --out")
    ids = _select_gpu(gpu_ids)
    xp = resolve_xp("gpu" if ids else device)
    particles = load_particles(particles_path, datadir)
    particles.check_metadata()
    particles.check_images()
    if particles.ctf is None:
        raise CryocvError(f"{particles_path} has no CTF parameters (rlnDefocusU...): refinement needs them")
    reference, reference_px = read_map(reference_path)
    _check_map(reference, reference_path)
    os.makedirs(out_dir, exist_ok=True)
    log = JobLog(os.path.join(out_dir, "run.log"))
    if not resume:
        for stale in ("map.mrc", "job.json"):
            if os.path.isfile(os.path.join(out_dir, stale)):
                os.remove(os.path.join(out_dir, stale))
        write_json(config_path, {"particles": os.path.abspath(particles_path),
                                 "reference": os.path.abspath(reference_path),
                                 "datadir": datadir, "device": device, "gpu": gpu_ids, "parameters": asdict(params)})
    state = store.load_latest() if resume else None
    if np.all(particles.half_set == 0):  # seeded: a resumed job gets the same split
        particles.half_set = random_half_sets(len(particles), params.seed)
        log(f"no rlnRandomSubset in {particles_path}: split the particles at random into two half-sets "
            f"(seed {params.seed}); particles.star records the split")
    elif np.any(particles.half_set == 0):
        raise CryocvError(f"{particles_path}: some particles have rlnRandomSubset and others not")
    for half in (1, 2):
        if np.count_nonzero(particles.half_set == half) < 2:
            raise CryocvError(f"half-set {half} has fewer than 2 particles; refinement needs both half-sets")
    if state is None:
        state = initial_state(reference, reference_px, particles, params)
        log(f"refining {len(particles)} particles ({particles.box_size} px, {particles.pixel_size_A:.3f} Å/px), "
            f"{params.regularizer.upper()} regularizer, symmetry {params.symmetry}, start low-passed to "
            f"{params.initial_lowpass_A:g} Å, on {'GPU ' + str(ids[0]) if ids else ('GPU' if xp is not np else 'CPU')}")
        if ids and len(ids) > 1:
            log(f"  note: using GPU {ids[0]} of {ids}; multi-GPU refinement is not implemented yet")
    else:
        log(f"continuing from the checkpoint of iteration {state.iteration} ({state.resolution_A:.2f} Å)")
    if not state.final_done:
        state, maps, _ = refine(particles, state, params, xp, store, progress=progress, log=log)
        half_maps, mask, report, full = ([to_numpy(m) for m in maps.half_maps],
                                         None if maps.mask is None else to_numpy(maps.mask), maps.report,
                                         to_numpy(maps.full_map))
        cutoff_A = maps.cutoff_A
    else:
        half_maps, mask, report, full, cutoff_A = _final_from_checkpoint(store, state, particles.pixel_size_A)
    particles.euler_deg = state.euler_deg.astype(np.float64)
    particles.origin_A = state.origin_A.astype(np.float64)
    particles.has_alignment = True
    px = particles.pixel_size_A
    report.update(symmetry=params.symmetry, n_particles=len(particles), regularizer=params.regularizer,
                  iterations=state.history)
    write_map(os.path.join(out_dir, "half_map_1.mrc"), half_maps[0], px)
    write_map(os.path.join(out_dir, "half_map_2.mrc"), half_maps[1], px)
    if mask is not None:
        write_map(os.path.join(out_dir, "mask.mrc"), mask, px)
    if cutoff_A is not None:
        write_map(os.path.join(out_dir, "nu_cutoff_A.mrc"), cutoff_A, px)
        shutil.copyfile(os.path.join(store.folder(state.iteration), "map_nu_filtered.mrc"),
                        os.path.join(out_dir, "map_nu_filtered.mrc"))
    save_particles(particles, os.path.join(out_dir, "particles.star"))
    write_json(os.path.join(out_dir, "fsc.json"), report)
    title = (f"{len(particles)} particles, {params.regularizer.upper()}, {params.symmetry}: "
             f"{report['resolution_A']:.2f} Å")
    plot_fsc(report, os.path.join(out_dir, "fsc.png"), title=title)
    plot_poses(**refine_pose_diagnostics(out_dir), path=os.path.join(out_dir, "poses.png"))
    write_json(os.path.join(out_dir, "job.json"), _job_record("refine", {
        "particles": os.path.abspath(particles_path), "reference": os.path.abspath(reference_path),
        "resumed": resume, **asdict(params)}, xp, started))
    write_map(os.path.join(out_dir, "map.mrc"), full, px)  # last: marks the job finished
    log(f"done: {report['resolution_A']:.2f} Å gold-standard (FSC 0.143, masked and corrected) after "
        f"{state.iteration} iterations; map {os.path.join(out_dir, 'map.mrc')}")
    return report


def refine_pose_diagnostics(job_dir: str, input_particles: str | None = None) -> dict:
    """What the pose plot of a refine job shows, read from its files: ``euler_deg``
    (n, 3) refined poses, ``history`` (per-iteration resolution and pose change),
    ``change_vs_input_deg`` (n,) angle (°, smallest over the symmetry group) between
    each refined pose and the input alignment (None if the input had none), ``title``.
    ``input_particles``: the job's input file (default: the path recorded at its start).
    Keyword arguments of :func:`cryocv.plotting.plot_poses` / ``draw_poses``."""
    from .refine import pose_change_deg
    datadir = None
    if input_particles is None:
        with open(os.path.join(job_dir, REFINE_CONFIG)) as handle:
            config = json.load(handle)
        input_particles, datadir = config["particles"], config["datadir"]
    with open(os.path.join(job_dir, "fsc.json")) as handle:
        report = json.load(handle)
    refined = load_particles(os.path.join(job_dir, "particles.star"))
    start = load_particles(input_particles, datadir)  # metadata only: images are not read
    change = None
    if start.has_alignment and len(start) == len(refined):
        change = pose_change_deg(refined.rotations, start.rotations, report["symmetry"])
    history = report.get("iterations") or []
    return {"euler_deg": refined.euler_deg, "history": history, "change_vs_input_deg": change,
            "title": f"{len(refined)} particles after {len(history)} iterations"}


def _final_from_checkpoint(store, state, pixel_size_A: float):
    """Outputs of a refinement whose final pass was checkpointed before the process stopped."""
    folder = store.folder(state.iteration)
    halves = [read_map(os.path.join(folder, f"half_map_{h}.mrc"))[0] for h in (1, 2)]
    with open(os.path.join(folder, "fsc.json")) as handle:
        report = json.load(handle)
    full = read_map(os.path.join(folder, "map.mrc"))[0]
    cutoff_path = os.path.join(folder, "nu_cutoff_A.mrc")
    cutoff = read_map(cutoff_path)[0] if os.path.isfile(cutoff_path) else None
    return halves, state.mask, report, full, cutoff
