"""Everything a job writes into its directory, each file named once here; atomic writes,
stale-output removal, the job record, the log and the finished job's outputs (the per-iteration
checkpoints: :mod:`.checkpoints`).

A job's last write is ``map.mrc``: its presence marks a finished job.
"""
from __future__ import annotations

import glob
import json
import os
import platform
import shutil
import subprocess
import sys
import time

import numpy as np
from tqdm.auto import tqdm

from .. import __version__
from ..backend import StageTimer, to_numpy
from ..errors import CryocvError
from ..io.mrc import atomic_path, write_map
from ..io.particle_files import save_particles
from ..plot_worker import InlinePlotter

# outputs of every job that makes maps
MAP = "map.mrc"                          # FSC-weighted full map; written last
HALF_MAPS = ("half_map_1.mrc", "half_map_2.mrc")
MASK = "mask.mrc"
FSC_JSON = "fsc.json"
FSC_PNG = "fsc.png"
PARTICLES_STAR = "particles.star"
PARTICLES_STACK = "particles.mrcs"       # simulate
JOB_JSON = "job.json"
RUN_LOG = "run.log"
# refinement
POSES_PNG = "poses.png"
NU_CUTOFF = "nu_cutoff_A.mrc"
NU_FILTERED_MAP = "map_nu_filtered.mrc"
REFINE_CONFIG = "refine_config.json"     # what --continue needs: inputs, device, parameters
CHECKPOINT = "checkpoint.json"           # points at the last complete iteration folder; written last
ITERATIONS = "iterations"
REFERENCES = ("reference_1.mrc", "reference_2.mrc")  # per iteration: the next iteration's references
STATE_JSON = "state.json"
POSES_NPZ = "poses.npz"
# subtract: writes the stack, job.json, then particles.star (its last write: marks the job finished)
SUBTRACTED_STACK = "particles_subtracted.mrcs"
POSE_CHANGE_PNG = "pose_change.png"         # local refinement: rotation and shift change from the input
# symmetry relaxation: the relaxed map minus its symmetrized version, and its diagnostics
DIFFERENCE_MAP = "difference_map.mrc"
RELAX_PNG = "relax.png"
# abinitio: the SGD phase's state (for --continue) and its aligned half-maps, particles left out by --n-particles
SGD_STATE = "sgd_state.npz"
SGD_HALF_MAPS = ("sgd_half_map_1.mrc", "sgd_half_map_2.mrc")
SGD_PNG = "abinitio.png"                    # resolution against SGD iteration, then the E/M iterations
UNUSED_PARTICLES_STAR = "unused_particles.star"
# demo
DEMO_SIMULATED = "simulated"
DEMO_REFINE = "refine"


def path(job_dir: str, name: str) -> str:
    return os.path.join(job_dir, name)


def _finite_or_null(value):
    """JSON has no NaN or Infinity: such numbers are written as null."""
    if isinstance(value, dict):
        return {key: _finite_or_null(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(item) for item in value]
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def write_json(file_path: str, data: dict):
    """Write valid JSON atomically (non-finite numbers as null)."""
    with atomic_path(file_path) as tmp:
        with open(tmp, "w") as handle:
            json.dump(_finite_or_null(data), handle, indent=2, allow_nan=False)


def read_json(file_path: str) -> dict:
    with open(file_path) as handle:
        return json.load(handle)


def read_job_config(job_dir: str, keys: tuple, make_params) -> tuple:
    """(config, params) of the refine_config.json a refinement (global or local) started with, for
    --continue: ``keys`` must be there and ``make_params(config["parameters"])`` must work; a
    missing or damaged file is a one-line error."""
    config_path = path(job_dir, REFINE_CONFIG)
    if not os.path.isfile(config_path):
        raise CryocvError(f"{job_dir} holds no refinement to continue (no {REFINE_CONFIG})")
    try:
        config = read_json(config_path)
        missing = [key for key in keys + ("parameters",) if key not in config]
        if missing:
            raise KeyError(", ".join(missing))
        return config, make_params(config["parameters"])
    except (ValueError, KeyError, TypeError) as exc:
        raise CryocvError(f"{config_path} is damaged ({type(exc).__name__}: {exc}): start the refinement again "
                          f"with --overwrite") from None


def remove_stale_outputs(job_dir: str, also=()):
    """A rerun must not leave an older finished map (or record, or the files ``also`` names)
    beside new partial outputs."""
    for name in (MAP, JOB_JSON) + tuple(also):
        if os.path.isfile(path(job_dir, name)):
            os.remove(path(job_dir, name))


def check_output_dir(job_dir: str, overwrite: bool, finished=(MAP,)):
    """Before any work: ``job_dir`` must be (or become) a writable folder, and not hold a finished
    job (one of the files ``finished``) or a refinement unless ``overwrite`` (the same rule for every
    job). Creates nothing."""
    if os.path.exists(job_dir) and not os.path.isdir(job_dir):
        raise CryocvError(f"--out {job_dir} is a file, not a folder")
    held = [name for name in (CHECKPOINT,) + tuple(finished) if os.path.isfile(path(job_dir, name))]
    if held and not overwrite:
        what = "a refinement" if held[0] == CHECKPOINT else "a finished job"
        resume = f"continue it with --continue {job_dir}, " if held[0] == CHECKPOINT else ""
        raise CryocvError(f"{job_dir} already holds {what} ({held[0]}): {resume}replace it with --overwrite, "
                          f"or choose another --out")
    existing = os.path.abspath(job_dir)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        raise CryocvError(f"cannot write into {job_dir}: {existing} is not a writable folder")


def create_output_dir(job_dir: str, overwrite: bool, also=()):
    """After the inputs were checked: make ``job_dir`` and, with ``overwrite``, remove the
    previous job's outputs (with the files ``also`` names) and checkpoints."""
    try:
        os.makedirs(job_dir, exist_ok=True)
    except OSError as exc:
        raise CryocvError(f"cannot create {job_dir}: {exc.strerror}") from None
    remove_stale_temp_files(job_dir)
    if overwrite:
        remove_stale_outputs(job_dir, also)
        for name in (CHECKPOINT, REFINE_CONFIG):
            if os.path.isfile(path(job_dir, name)):
                os.remove(path(job_dir, name))
        shutil.rmtree(path(job_dir, ITERATIONS), ignore_errors=True)


def _timestamp(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(seconds))


def _source_commit() -> str | None:
    """The git commit of the checkout cryocv runs from (None for an installed package)."""
    checkout = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if not os.path.isdir(os.path.join(checkout, ".git")):
        return None
    try:
        found = subprocess.run(["git", "-C", checkout, "rev-parse", "HEAD"], capture_output=True, text=True,
                               timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return found.stdout.strip() or None


def _device_name(xp) -> str:
    if xp is np:
        return f"CPU ({platform.processor() or platform.machine()})"
    props = xp.cuda.runtime.getDeviceProperties(xp.cuda.Device().id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    return f"GPU {xp.cuda.Device().id}: {name}"


def job_record(job: str, params: dict, xp, started: float, result: dict | None = None) -> dict:
    """``job.json``: what produced the outputs: the job and its parameters, start and end time,
    wall time, cryocv version (and git commit from a checkout), device, library versions, command
    line, and ``result`` (e.g. the final resolution)."""
    finished = time.time()
    return {"job": job, "cryocv_version": __version__, "git_commit": _source_commit(), "parameters": params,
            "started": _timestamp(started), "started_unix_s": round(started, 3), "finished": _timestamp(finished),
            "wall_time_s": round(finished - started, 3), "device": "gpu" if xp is not np else "cpu",
            "device_name": _device_name(xp), "python": platform.python_version(), "numpy": np.__version__,
            "command": sys.argv, **({"result": result} if result else {})}


def finish_record(record: dict):
    """Set ``record``'s (from :func:`job_record`) end time and wall time to now."""
    finished = time.time()
    started = record["started_unix_s"]
    record.update(finished=_timestamp(finished), wall_time_s=round(finished - started, 3))


def remove_stale_temp_files(job_dir: str) -> int:
    """Remove the hidden temporary files (``.NAME.*.tmp*``) that a killed job's atomic writes left in
    ``job_dir``; returns how many."""
    stale = glob.glob(os.path.join(job_dir, ".*.tmp*")) + glob.glob(os.path.join(job_dir, ITERATIONS, "*", ".*.tmp*"))
    for name in stale:
        os.remove(name)
    return len(stale)


class JobLog:
    """Log lines to stdout (through tqdm, so bars stay intact) and to ``run.log`` in the job folder."""

    def __init__(self, job_dir: str):
        self.path = path(job_dir, RUN_LOG)

    def __call__(self, message: str):
        tqdm.write(message)
        with open(self.path, "a") as handle:
            handle.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')}  {message}\n")


def write_results(job_dir: str, pixel_size_A: float, half_maps, full_map, mask, report: dict, particles,
                  fsc_title: str, record: dict, extra_maps: dict | None = None, before_record=None,
                  checkpoint=None, iteration: int | None = None, plotter=None):
    """Write a finished job: fsc.png and ``before_record(plotter)`` (more outputs and plots) first,
    then particles.star, fsc.json, half-maps, mask, ``extra_maps`` {name: map or None}, job.json and
    map.mrc last. ``plotter``: a :mod:`cryocv.plot_worker` plotter (default: draws here, at once);
    a background one draws while the rest is written, and is waited for before job.json.
    ``checkpoint``: the :class:`~.checkpoints.CheckpointStore` whose save of ``iteration`` (the final pass) holds the same maps
    under the same names, maybe still being written in the background (the files above are
    written meanwhile): they are hard-linked from there (copied where links fail) instead of
    written again (at box 512 each is half a gigabyte); an extra map given as None comes only
    from there."""
    timer = StageTimer()
    folder = None if checkpoint is None else checkpoint.folder(iteration)
    plotter = plotter or InlinePlotter()

    def put(name, volume):
        if folder is not None and os.path.isfile(os.path.join(folder, name)):
            _link_or_copy(os.path.join(folder, name), path(job_dir, name))
        elif volume is not None:
            write_map(path(job_dir, name), to_numpy(volume), pixel_size_A)
        else:
            raise CryocvError(f"{name} is missing from the final checkpoint {folder}")

    with timer("plots"):                   # first: a background plotter draws them while the rest is written
        plotter.plot("plot_fsc", report, path(job_dir, FSC_PNG), title=fsc_title)
        if before_record is not None:
            before_record(plotter)
    with timer("particles"):
        save_particles(particles, path(job_dir, PARTICLES_STAR))
    with timer("fsc"):
        write_json(path(job_dir, FSC_JSON), report)
    if checkpoint is not None:
        with timer("checkpoint write"):
            checkpoint.wait()
    with timer("maps"):
        for name, volume in zip(HALF_MAPS, half_maps):
            put(name, volume)
        if mask is not None:
            put(MASK, mask)
        for name, volume in (extra_maps or {}).items():
            put(name, volume)
    with timer("plots: waited"):
        plotter.wait()
    record["output_seconds"] = timer.rounded(2)
    finish_record(record)                  # the wall time includes the outputs written so far
    write_json(path(job_dir, JOB_JSON), record)
    with timer("maps"):
        put(MAP, full_map)                 # last: marks the job finished
    record["output_seconds"] = timer.rounded(2)


def outputs_note(record: dict, outputs_started: float, job_started: float) -> str:
    """'outputs and plots written in X s: particles 0.4, ...; job Y s': the end of a job's "done:"
    line in run.log (``record`` as :func:`write_results` left it; times from ``time.time()``)."""
    steps = ", ".join(f"{name} {value:.2f}" for name, value in record["output_seconds"].items())
    return (f"outputs and plots written in {time.time() - outputs_started:.1f} s: {steps}; "
            f"job {time.time() - job_started:.1f} s")


def _link_or_copy(source: str, target: str):
    """``target`` becomes a hard link to ``source`` (a copy where the file system refuses),
    replacing what was there, atomically."""
    with atomic_path(target) as tmp:
        os.remove(tmp)
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)
