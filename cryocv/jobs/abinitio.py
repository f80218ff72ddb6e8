"""Homogeneous ab-initio refinement from no input volume: stochastic gradient descent on two
independent half-sets, each from its own random map (Punjani, Rubinstein, Fleet & Brubaker,
Nat. Methods 2017; preconditioned as Toader, Brubaker & Lederman, Acta D 2025), with resolution
marching from --init-res-A as each half-set's own quarter-set FSC allows; every --check-every
iterations half-set 2 is aligned to half-set 1 (rotation, shift, hand) and moved onto it. Then
passes of the shared gold-standard E/M refinement from the two aligned maps (global search,
--max-iterations, then a final pass to Nyquist). Half-sets from rlnRandomSubset when present,
else a seeded split (recorded in particles.star). Writes half_map_1/2.mrc, map.mrc, mask.mrc,
fsc.json (with the SGD and E/M history), fsc.png, abinitio.png (resolution against iteration),
poses.png, particles.star, unused_particles.star (with --n-particles), sgd_half_map_1/2.mrc,
checkpoints and job.json in DIR. A killed job continues with --continue DIR."""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, replace

import numpy as np

from ..accumulate import insert_with_symmetry
from ..backend import free_device_memory, get_array_module, image_cache_budget_bytes, to_device, to_numpy
from ..errors import CryocvError
from ..fsc import fsc_curve, resolution_at
from ..io.mrc import atomic_path, write_map
from ..io.particle_files import save_particles
from ..masks import spherical_mask
from ..noise import noise_spectrum_from_images
from ..plot_worker import BackgroundPlotter
from ..projector import empty_accumulators, frequency_points, prepare_volume
from ..register import align_maps, transform_volume
from ..search import BaseGrid, global_start, search_schedule, subdivide
from ..sgd import (HalfSetSGD, learning_rate, minibatch_size, quarter_resolution_A, random_initial_volume, recentre,
                   sample_start, sgd_update, temperature)
from ..source import ParticleSource
from ..symmetry import symmetry_operators
from . import jobdir
from .common import (DEFAULT_DEVICE, device_args, load_checked_particles, option, output_args, params_from_args,
                     require_half_sets, select_device)
from .checkpoints import RefineState, finishes_writes_on_error
from .jobdir import JobLog
from .loop import check_against_nyquist, iterate, open_refinement, start_reference
from .refine import RefineParams, add_search_and_regularizer_args, global_search
from .registration import registration_hook

HELP = "ab-initio refinement: SGD on two independent half-sets from random maps, then gold-standard E/M"
IN_REGISTER_SCORE = 0.005  # half-set 2 stays put when that scores within this of the best alignment
NOISE_SAMPLE = 500        # images per half-set whose power spectrum is its SGD noise model


@dataclass
class AbinitioParams(RefineParams):
    """Ab-initio settings; the refinement fields (regularizer, search...) drive the E/M passes
    after the SGD, ``max_iterations`` of them before the final pass."""

    register_halves: bool = False         # E/M passes: not yet measured on bench_abinitio (the SGD registers its own)
    init_res_A: float = 35.0              # the SGD aligns to this resolution first
    max_sgd_res_A: float | None = None    # the SGD never aligns finer (default: 4 pixels, twice Nyquist)
    sgd_iterations: int = 300             # minibatches per half-set
    minibatch_start: int = 90
    minibatch_end: int = 300
    learning_rate: float = 0.4
    learning_rate_hold: int = 100         # iterations at the initial rate, then it decays as hold/iteration
    learning_rate_final: float = 0.05
    momentum: float = 0.5
    initial_temperature: float = 1.0      # stochastic E-step: poses drawn from the posterior over the base cells...
    anneal_iterations: int | None = None  # ...cooling to the best pose over these iterations (default: a third)
    quarter_decay: float = 0.95           # running quarter-set sums: a window of ~20 minibatches
    check_every: int = 20                 # iterations between resolution checks, re-centring and half-set alignment
    n_particles: int | None = None        # use a random subset of this many (default: all)
    max_iterations: int = 8               # E/M iterations after the SGD (then the final pass), if not converged
    em_start_res_A: float | None = None   # the E/M starts from the SGD maps low-passed to this (default: the SGD's resolution)
    particle_diameter_A: float | None = None  # the SGD maps' support (a soft sphere; default 80% of the box)
    min_iterations: int = 3

    def validate(self):
        RefineParams.validate(replace(self, max_iterations=max(self.max_iterations, 1)))   # 0 E/M iterations is fine here
        checks = [(self.init_res_A > 0, "--init-res-A must be positive"),
                  (self.sgd_iterations >= 1, "--sgd-iterations must be at least 1"),
                  (1 <= self.minibatch_start <= self.minibatch_end, "need 1 <= --minibatch START <= END"),
                  (0 < self.learning_rate <= 1, "--learning-rate must be in (0, 1]"),
                  (0 <= self.momentum < 1, "--momentum must be in [0, 1)"),
                  (self.check_every >= 1, "--check-every must be at least 1"),
                  (self.n_particles is None or self.n_particles >= 8, "--n-particles must be at least 8"),
                  (self.max_iterations >= 0, "--max-iterations must be >= 0"),
                  (self.em_start_res_A is None or self.em_start_res_A > 0, "--em-start-res-A must be positive"),
                  (self.particle_diameter_A is None or self.particle_diameter_A > 0,
                   "--particle-diameter-A must be positive")]
        for ok, message in checks:
            if not ok:
                raise CryocvError(message)


def add_args(p):
    p.add_argument("--particles", help="particles (.star or .cs) with CTF; poses are not needed")
    p.add_argument("--out", help="output directory")
    p.add_argument("--continue", dest="continue_dir", metavar="DIR",
                   help="continue the job in DIR from its last checkpoint (other options are ignored)")
    p.add_argument("--n-particles", dest="n_particles", type=int, default=AbinitioParams.n_particles,
                   help="use a random subset of this many particles, balanced over the half-sets (default: all)")
    option(p, "--init-res-A", AbinitioParams, "init_res_A", help="the SGD's first alignment resolution (Å)")
    p.add_argument("--max-sgd-res-A", dest="max_sgd_res_A", type=float, default=AbinitioParams.max_sgd_res_A,
                   help="the SGD never aligns finer than this (Å; default: 4 pixels)")
    p.add_argument("--particle-diameter-A", dest="particle_diameter_A", type=float,
                   default=AbinitioParams.particle_diameter_A,
                   help="diameter of the SGD maps' spherical support (Å; default 80%% of the box, at most the box)")
    p.add_argument("--em-start-res-A", dest="em_start_res_A", type=float, default=AbinitioParams.em_start_res_A,
                   help="the E/M passes start from the SGD maps low-passed to this (Å; never finer than the SGD's "
                        "resolution, the default)")
    option(p, "--sgd-iterations", AbinitioParams, "sgd_iterations", help="SGD minibatches per half-set")
    p.add_argument("--minibatch", nargs=2, type=int, metavar=("START", "END"),
                   default=(AbinitioParams.minibatch_start, AbinitioParams.minibatch_end),
                   help=f"images per minibatch, growing over the first two thirds (default: "
                        f"{AbinitioParams.minibatch_start} {AbinitioParams.minibatch_end})")
    option(p, "--learning-rate", AbinitioParams, "learning_rate", help="initial SGD step (1: onto the minibatch's map)")
    option(p, "--learning-rate-hold", AbinitioParams, "learning_rate_hold",
           help="iterations at the initial step, then it decays as hold/iteration")
    option(p, "--learning-rate-final", AbinitioParams, "learning_rate_final", help="smallest SGD step")
    option(p, "--momentum", AbinitioParams, "momentum", help="SGD momentum")
    option(p, "--initial-temperature", AbinitioParams, "initial_temperature",
           help="stochastic E-step: each image's start pose is drawn from its posterior over the base grid's best "
                "cells at this temperature (1: the posterior), cooling to the best pose (0 turns it off)")
    p.add_argument("--anneal-iterations", dest="anneal_iterations", type=int,
                   default=AbinitioParams.anneal_iterations,
                   help="SGD iterations over which the temperature falls to 0 (default: a third of them)")
    option(p, "--check-every", AbinitioParams, "check_every",
           help="SGD iterations between resolution checks, re-centring and aligning half-set 2 to half-set 1")
    p.add_argument("--max-shift-A", dest="max_shift_A", type=float, default=AbinitioParams.max_shift_A,
                   help="shift search range ± (default 10%% of the box)")
    option(p, "--base-step-deg", AbinitioParams, "base_step_deg", help="base angular grid of the search")
    add_search_and_regularizer_args(p, AbinitioParams, initial_lowpass=False)
    output_args(p)
    device_args(p, gpu=True)


def main(args) -> int:
    if args.continue_dir:
        args.out = args.continue_dir
        report = run(None, args.continue_dir, resume=True, progress=not args.quiet)
    else:
        missing = [flag for flag, value in (("--particles", args.particles), ("--out", args.out)) if not value]
        if missing:
            raise CryocvError(f"abinitio needs {', '.join(missing)} (or --continue DIR)")
        args.minibatch_start, args.minibatch_end = args.minibatch
        report = run(args.particles, args.out, params_from_args(AbinitioParams, args), device=args.device,
                     gpu_ids=args.gpu, datadir=args.datadir, progress=not args.quiet, overwrite=args.overwrite)
    print(f"gold-standard resolution {report['resolution_A']:.2f} Å (FSC 0.143, masked, corrected); "
          f"map: {jobdir.path(args.out, jobdir.MAP)}, plots: {jobdir.path(args.out, jobdir.SGD_PNG)}, "
          f"{jobdir.path(args.out, jobdir.FSC_PNG)}")
    return 0


def choose_particles(half_set: np.ndarray, n_particles: int | None, seed: int) -> np.ndarray:
    """Sorted positions of the particles used: all, or ``n_particles`` drawn at random in
    proportion from each half-set."""
    if n_particles is None or n_particles >= half_set.size:
        return np.arange(half_set.size)
    rng = np.random.default_rng([seed, 17])
    used = []
    for half in (1, 2):
        members = np.nonzero(half_set == half)[0]
        take = int(round(n_particles * members.size / half_set.size))
        used.append(rng.choice(members, size=min(members.size, max(take, 4)), replace=False))
    return np.sort(np.concatenate(used))


def _save_sgd(out_dir, states, rngs, noise, history, iteration, transform_log):
    arrays = {}
    for h in (1, 2):
        s = states[h]
        arrays.update({f"volume_{h}": to_numpy(s.volume), f"velocity_{h}": to_numpy(s.velocity),
                       f"hessian_{h}": to_numpy(s.hessian_shell), f"noise_{h}": to_numpy(noise[h]),
                       f"cutoff_{h}": np.float64(s.cutoff_A), f"steps_{h}": np.int64(s.steps)})
    meta = {"iteration": iteration, "history": history, "transforms": transform_log,
            "rng": {str(h): rngs[h].bit_generator.state for h in (1, 2)}}
    with atomic_path(jobdir.path(out_dir, jobdir.SGD_STATE)) as tmp:
        with open(tmp, "wb") as handle:
            np.savez(handle, meta=np.array(json.dumps(meta)), **arrays)


def _load_sgd(out_dir, xp):
    with np.load(jobdir.path(out_dir, jobdir.SGD_STATE)) as saved:
        meta = json.loads(str(saved["meta"]))
        states, noise, rngs = {}, {}, {}
        for h in (1, 2):
            state = HalfSetSGD.start(to_device(saved[f"volume_{h}"], xp), float(saved[f"cutoff_{h}"]))
            state.velocity = to_device(saved[f"velocity_{h}"], xp)
            state.hessian_shell = to_device(saved[f"hessian_{h}"], xp)
            state.steps = int(saved[f"steps_{h}"])
            states[h], noise[h] = state, to_device(saved[f"noise_{h}"], xp)
            rngs[h] = np.random.default_rng()
            rngs[h].bit_generator.state = meta["rng"][str(h)]
    return states, rngs, noise, meta


def support_radius_px(box_size: int, pixel_size_A: float, particle_diameter_A: float | None) -> float:
    """Radius (px) of the SGD maps' soft spherical support: half ``particle_diameter_A`` (default 80 %
    of the box); a given diameter at most what fits inside the box with the mask's 4 px edge."""
    if particle_diameter_A is None:
        return 0.4 * box_size
    return float(min(particle_diameter_A / (2 * pixel_size_A), box_size / 2 - 4))


def sgd_phase(particles, source: ParticleSource, params: AbinitioParams, xp, out_dir: str, resume: bool, log,
              progress: bool):
    """SGD of both half-sets (interleaved, never sharing data) → (two aligned maps, history)."""
    n, px = particles.box_size, particles.pixel_size_A
    search = params.search_params(n, px)
    ops = symmetry_operators(params.symmetry)
    points = frequency_points(n, xp=xp)
    support = spherical_mask(n, support_radius_px(n, px, params.particle_diameter_A), 4.0, xp)
    max_res_A = params.max_sgd_res_A or 4 * px
    members = {h: source.members(h) for h in (1, 2)}
    # minibatches alternate between two fixed quarter-sets of each half-set, so that the running
    # sums of even and odd steps never share an image and their FSC is an honest resolution
    quarters = {}
    for h in (1, 2):
        order = np.random.default_rng([params.seed, h, 4]).permutation(members[h])
        quarters[h] = (np.sort(order[0::2]), np.sort(order[1::2]))
    if resume and os.path.isfile(jobdir.path(out_dir, jobdir.SGD_STATE)):
        states, rngs, noise, meta = _load_sgd(out_dir, xp)
        first, history, transforms = meta["iteration"], meta["history"], meta["transforms"]
        log(f"SGD continues from its checkpoint at iteration {first} (the quarter-set sums start again)")
    else:
        rngs = {h: np.random.default_rng([params.seed, h]) for h in (1, 2)}
        states, noise = {}, {}
        for h in (1, 2):
            sample = np.sort(rngs[h].permutation(members[h])[:NOISE_SAMPLE])
            noise[h] = noise_spectrum_from_images(source.images_ft(sample)).astype(xp.float32)
            volume = random_initial_volume(n, px, params.init_res_A, rngs[h], xp)
            states[h] = HalfSetSGD.start(volume, params.init_res_A)
        first, history, transforms = 0, [], []
    anneal = params.anneal_iterations if params.anneal_iterations is not None else params.sgd_iterations // 3
    started = time.time()
    for iteration in range(first, params.sgd_iterations):
        b = minibatch_size(iteration, params.sgd_iterations, params.minibatch_start, params.minibatch_end)
        rate = learning_rate(iteration, params.learning_rate, params.learning_rate_hold, params.learning_rate_final)
        heat = temperature(iteration, params.initial_temperature, anneal)
        for h in (1, 2):
            state = states[h]
            pool = quarters[h][state.steps % 2]
            index = np.sort(rngs[h].choice(pool, size=min(b, pool.size), replace=False))
            batch = source.load(index, half=h)
            cutoff_px = min(n / 2, n * px / state.cutoff_A)
            volume_ft = prepare_volume(state.volume)
            levels = search_schedule(n, cutoff_px, search)
            start = global_start(BaseGrid(volume_ft, n, levels[0], search), batch.images_ft, batch.ctf, noise[h],
                                 search.n_base_candidates)
            draws = to_device(rngs[h].random(len(index)), xp)
            found = subdivide(volume_ft, batch.images_ft, batch.ctf, noise[h], levels, search,
                              sample_start(start, draws, heat))
            volume_ft = None
            x = points.gather(batch.recentred_ft(found.shifts_px))
            c = points.gather(batch.ctf)
            data, weight = empty_accumulators(n, xp=xp)
            insert_with_symmetry((data, weight), found.rotations, points, x * c, c * c, ops)
            sgd_update(state, data, weight, len(index), cutoff_px, rate, params.momentum, support,
                       params.quarter_decay)
        if (iteration + 1) % params.check_every == 0 or iteration + 1 == params.sgd_iterations:
            record = _check(states, px, max_res_A, iteration + 1, b, rate, log, transforms)
            history.append(record)
            _save_sgd(out_dir, states, rngs, noise, history, iteration + 1, transforms)
            if progress:
                log(f"  SGD {iteration + 1}/{params.sgd_iterations} ({time.time() - started:.0f} s)")
    return [states[1].volume, states[2].volume], history


def _check(states, px: float, max_res_A: float, iteration: int, b: int, rate: float, log, transforms) -> dict:
    """Every few iterations: each half-set's own resolution sets its next cutoff (finer only, at
    most 1.5× the Fourier radius per check); both maps are re-centred; half-set 2 is aligned
    to half-set 1 and moved onto it (its quarter sums restart); the FSC of the two is recorded."""
    n = states[1].volume.shape[0]
    xp = get_array_module(states[1].volume)
    quarter = []
    for h in (1, 2):
        state = states[h]
        own, _ = quarter_resolution_A(state, px)
        quarter.append(own)
        fastest = n * px / (1.5 * n * px / state.cutoff_A)
        state.cutoff_A = float(max(min(state.cutoff_A, max(own, fastest)), max_res_A))
        recentre(state)
    align_res = max(states[1].cutoff_A, states[2].cutoff_A)
    transform = align_maps(states[1].volume, states[2].volume, px, align_res, keep_identity_within=IN_REGISTER_SCORE)
    moved = not transform.is_identity(max_deg=0.5, max_px=0.5)
    if moved:
        states[2].volume = xp.clip(transform_volume(states[2].volume, transform), 0, None)
        states[2].velocity = transform_volume(states[2].velocity, transform)
        states[2].quarter_sums = [empty_accumulators(n, xp=xp) for _ in range(2)]
        transforms.append({"iteration": iteration, **transform.as_dict()})
    sphere = spherical_mask(n, 0.45 * n, 4.0, xp)
    fsc = to_numpy(fsc_curve(states[1].volume * sphere, states[2].volume * sphere))
    # never finer than the coarser cutoff: beyond it the maps hold only what non-negativity made alike
    half_res = max(float(resolution_at(fsc, 0.143, n, px)), states[1].cutoff_A, states[2].cutoff_A)
    record = {"iteration": iteration, "minibatch": b, "learning_rate": rate,
              "cutoff_A": [states[1].cutoff_A, states[2].cutoff_A], "quarter_resolution_A": quarter,
              "half_map_resolution_A": half_res, "half_2_moved": moved,
              "alignment_score": transform.score}
    log(f"  SGD iteration {iteration}: aligning to {states[1].cutoff_A:.1f} / {states[2].cutoff_A:.1f} Å, own "
        f"quarter-set FSC {quarter[0]:.1f} / {quarter[1]:.1f} Å, half-maps {half_res:.1f} Å; half-set 2 "
        + ("moved onto half-set 1 (" + f"{transform.rotation_deg:.1f}°, "
           f"{float(np.linalg.norm(transform.shift_px)):.1f} px" + (", hand flipped" if transform.flips_hand else "")
           + ")" if record["half_2_moved"] else "already in register"))
    return record


@finishes_writes_on_error
def run(particles_path: str | None, out_dir: str, params: AbinitioParams | None = None, device: str = DEFAULT_DEVICE,
        gpu_ids=None, datadir=None, resume: bool = False, progress: bool = True, overwrite: bool = False) -> dict:
    """Ab-initio job (see the module docstring); returns the FSC report (+ ``sgd`` history)."""
    started = time.time()
    config_path = jobdir.path(out_dir, jobdir.REFINE_CONFIG)
    config, params, store = open_refinement(out_dir, resume, params, AbinitioParams, ("particles",),
                                            overwrite=overwrite)
    if resume:
        particles_path, datadir, device, gpu_ids = (config["particles"], config["datadir"], config["device"],
                                                    config["gpu"])
    xp, ids = select_device(device, gpu_ids)
    notes = []
    everyone = load_checked_particles(particles_path, datadir, params.strict, notes.append)
    if everyone.ctf is None:
        raise CryocvError(f"{particles_path} has no CTF parameters (rlnDefocusU...): ab-initio needs them")
    require_half_sets(everyone, params.seed, 8, notes.append)
    used = choose_particles(everyone.half_set, params.n_particles, params.seed)
    particles = everyone.subset(used)
    n, px = particles.box_size, particles.pixel_size_A
    check_against_nyquist(params, px)
    if not resume:
        jobdir.create_output_dir(out_dir, overwrite, also=(jobdir.SGD_STATE,) + jobdir.SGD_HALF_MAPS
                                 + (jobdir.UNUSED_PARTICLES_STAR, jobdir.SGD_PNG))
        jobdir.write_json(config_path, {"particles": os.path.abspath(particles_path), "datadir": datadir,
                                        "device": device, "gpu": gpu_ids, "parameters": asdict(params)})
    log, plotter = JobLog(out_dir), BackgroundPlotter()     # the plotter imports matplotlib meanwhile
    for note in notes:
        log(note)
    state = store.load_latest() if resume else None
    # image FTs cached on the device as minibatches first read them (the E/M loop, after, makes its own cache)
    source = ParticleSource(particles, xp, 0 if params.stream else image_cache_budget_bytes(xp))
    if state is None:
        log(f"ab-initio of {len(particles)} particles ({n} px, {px:.3f} Å/px), symmetry {params.symmetry}: SGD on "
            f"each half-set from its own random map, {params.sgd_iterations} minibatches of "
            f"{params.minibatch_start}→{params.minibatch_end} from {params.init_res_A:g} Å, on "
            f"{'GPU' if xp is not np else 'CPU'}")
        maps, sgd_history = sgd_phase(particles, source, params, xp, out_dir, resume, log, progress)
        for name, volume in zip(jobdir.SGD_HALF_MAPS, maps):
            write_map(jobdir.path(out_dir, name), to_numpy(volume), px)
        start_res = max(min(sgd_history[-1]["cutoff_A"] + [sgd_history[-1]["half_map_resolution_A"]]),
                        params.em_start_res_A or 0, 2 * px)
        references = [to_numpy(m) if params.em_start_res_A is None else start_reference(m, px, start_res) for m in maps]
        state = RefineState(iteration=0, references=references, mask=None, resolution_A=start_res, euler_deg=None,
                            origin_A=None, noise_var_shell=None)
        log(f"E/M refinement from the aligned SGD maps ({state.resolution_A:.1f} Å): {params.max_iterations} "
            f"iterations at most, then the final pass")
    else:
        sgd_history = _sgd_history(out_dir)
        log(f"continuing the E/M refinement from the checkpoint of iteration {state.iteration}")
    source = None                                   # its cache, if any, is freed before the E/M loop's
    free_device_memory(xp)
    if not state.final_done:
        state, maps = iterate(particles, state, params, xp, store, global_search(params, n, px, xp),
                              progress=progress, log=log,
                              register_halves=registration_hook(params, particles, xp, log))
        half, mask, report, full = maps.half_maps, maps.mask, maps.report, maps.full_map
    else:
        half, mask, report, full, _ = store.final_outputs(state)
    particles.euler_deg = state.euler_deg.astype(np.float64)
    particles.origin_A = state.origin_A.astype(np.float64)
    particles.has_alignment = True
    report.update(symmetry=params.symmetry, n_particles=len(particles), regularizer=params.regularizer,
                  iterations=state.history, sgd=sgd_history)
    title = f"ab-initio, {len(particles)} particles, {params.symmetry}: {report['resolution_A']:.2f} Å"
    record = jobdir.job_record("abinitio", {"particles": os.path.abspath(particles_path), "resumed": resume,
                                            **asdict(params)}, xp, started,
                               {"resolution_A": report["resolution_A"], "n_particles": len(particles),
                                "n_unused": len(everyone) - len(particles),
                                "steps": ["sgd", f"em x{state.iteration}"]})

    def plots(plotter):
        plotter.plot("plot_abinitio", sgd_history, jobdir.path(out_dir, jobdir.SGD_PNG), state.history, title)
        plotter.plot("plot_poses", particles.euler_deg, jobdir.path(out_dir, jobdir.POSES_PNG), state.history,
                     title=title)
        if len(used) < len(everyone):      # written while the plotter draws
            unused = np.setdiff1d(np.arange(len(everyone)), used)
            save_particles(everyone.subset(unused), jobdir.path(out_dir, jobdir.UNUSED_PARTICLES_STAR))
    outputs_started = time.time()
    jobdir.write_results(out_dir, px, half, full, mask, report, particles, title, record, {}, before_record=plots,
                         checkpoint=store, iteration=state.iteration, plotter=plotter)
    log(f"done: {report['resolution_A']:.2f} Å gold-standard (SGD, then {state.iteration} E/M passes including the "
        f"final one; {jobdir.outputs_note(record, outputs_started, started)})")
    return report


def _sgd_history(out_dir: str) -> list:
    """The SGD history of a job whose SGD phase finished (from its SGD checkpoint)."""
    with np.load(jobdir.path(out_dir, jobdir.SGD_STATE)) as saved:
        return json.loads(str(saved["meta"]))["history"]
