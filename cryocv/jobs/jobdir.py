"""Everything a job writes into its directory, each file named once here; atomic writes,
stale-output removal, the job record, the log and the per-iteration checkpoints.

A job's last write is ``map.mrc``: its presence marks a finished job.
"""
from __future__ import annotations

import copy
import glob
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from .. import __version__
from ..backend import StageTimer, to_numpy
from ..errors import CryocvError
from ..io.mrc import atomic_path, read_map, write_map
from ..io.particle_files import save_particles
from ..plotting import plot_fsc

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
                  checkpoint_folder: str | None = None):
    """Write a finished job: half-maps, mask, ``extra_maps`` {name: map}, particles.star,
    fsc.json, fsc.png, then ``before_record()`` (more plots), job.json and map.mrc last.
    ``checkpoint_folder``: the final pass's checkpoint, which holds the same maps under the same
    names: they are hard-linked from there (copied where links fail) instead of written again
    (at box 512 each is half a gigabyte)."""
    timer = StageTimer()

    def put(name, volume):
        if checkpoint_folder is not None and os.path.isfile(os.path.join(checkpoint_folder, name)):
            _link_or_copy(os.path.join(checkpoint_folder, name), path(job_dir, name))
        else:
            write_map(path(job_dir, name), to_numpy(volume), pixel_size_A)

    with timer("maps"):
        for name, volume in zip(HALF_MAPS, half_maps):
            put(name, volume)
        if mask is not None:
            put(MASK, mask)
        for name, volume in (extra_maps or {}).items():
            put(name, volume)
    with timer("particles"):
        save_particles(particles, path(job_dir, PARTICLES_STAR))
    with timer("fsc"):
        write_json(path(job_dir, FSC_JSON), report)
        plot_fsc(report, path(job_dir, FSC_PNG), title=fsc_title)
    if before_record is not None:
        with timer("plots"):
            before_record()
    record["output_seconds"] = timer.rounded(2)
    finish_record(record)                  # the wall time includes the outputs written so far
    write_json(path(job_dir, JOB_JSON), record)
    with timer("maps"):
        put(MAP, full_map)                 # last: marks the job finished
    record["output_seconds"] = timer.rounded(2)


def _link_or_copy(source: str, target: str):
    """``target`` becomes a hard link to ``source`` (a copy where the file system refuses),
    replacing what was there, atomically."""
    with atomic_path(target) as tmp:
        os.remove(tmp)
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)


@dataclass
class RefineState:
    """What a checkpoint holds: the references and poses after ``iteration``."""

    iteration: int
    references: list | None              # two (N, N, N) float32 numpy: regularized half-maps (next references; None after the last pass)
    mask: np.ndarray | None              # dynamic mask (N, N, N) or None
    resolution_A: float
    euler_deg: np.ndarray | None         # (n, 3) current poses (None before the first pass)
    origin_A: np.ndarray | None          # (n, 2)
    noise_var_shell: np.ndarray | None   # (N//2+1,)
    history: list = field(default_factory=list)
    converged: bool = False
    final_done: bool = False


class CheckpointStore:
    """Per-iteration checkpoints in ``job_dir/iterations/iter_NNN`` and ``checkpoint.json`` (written last);
    after each save only the newest ``keep`` iteration folders stay (0: all)."""

    def __init__(self, job_dir: str, keep: int = 0):
        self.job_dir = job_dir
        self.keep = keep
        self.root = path(job_dir, ITERATIONS)
        self.skipped = []                # (folder, reason) of checkpoints load_latest passed over
        self._writer = None              # one background thread writing the files of a save
        self._pending = None             # its future

    def folder(self, iteration: int) -> str:
        return os.path.join(self.root, f"iter_{iteration:03d}")

    def exists(self) -> bool:
        return os.path.isfile(path(self.job_dir, CHECKPOINT))

    def save(self, state: RefineState, maps, pixel_size_A: float, half_set: np.ndarray, scores=None,
             background: bool = False):
        """Write iteration ``state.iteration``: references, unfiltered half-maps, mask, FSC, poses
        (``maps`` a :class:`~cryocv.regularize.MapResult`) and, for the final pass (the job's
        outputs, should the process stop before writing them), the full map and NU maps;
        ``checkpoint.json`` last. The arrays are copied to host memory here; with ``background``
        the files are written by a thread while the caller goes on (the next iteration's pass),
        one save at a time: call :meth:`wait` before reading them. A save killed half-way leaves
        a folder without ``checkpoint.json`` pointing to it, which :meth:`load_latest` skips."""
        folder = self.folder(state.iteration)
        # the next iteration's references: none after the last pass (box 512: 1 GB less to write)
        maps_out = {} if state.final_done else {REFERENCES[h - 1]: state.references[h - 1] for h in (1, 2)}
        maps_out.update({HALF_MAPS[h - 1]: to_numpy(maps.half_maps[h - 1]) for h in (1, 2)})
        if state.mask is not None:
            maps_out[MASK] = state.mask
        if state.final_done:
            maps_out[MAP] = to_numpy(maps.full_map)
        if state.final_done and maps.cutoff_A is not None:
            maps_out[NU_CUTOFF] = maps.cutoff_A
            maps_out[NU_FILTERED_MAP] = to_numpy(maps.nu_filtered_map)
        report = copy.deepcopy(maps.report)          # the caller goes on changing its own
        poses = dict(euler_deg=state.euler_deg, origin_A=state.origin_A, half_set=half_set,
                     noise_var_shell=state.noise_var_shell, scores=np.zeros(0) if scores is None else scores)
        meta = {"iteration": state.iteration, "resolution_A": state.resolution_A, "history": copy.deepcopy(state.history),
                "converged": state.converged, "final_done": state.final_done, "has_mask": state.mask is not None}

        def write():
            os.makedirs(folder, exist_ok=True)
            # a few at once: header statistics and file writes release the GIL (box 512: eight 0.5 GB maps)
            with ThreadPoolExecutor(max_workers=min(4, len(maps_out)), thread_name_prefix="cryocv-map") as pool:
                list(pool.map(lambda item: write_map(os.path.join(folder, item[0]), item[1], pixel_size_A),
                              maps_out.items()))
            write_json(os.path.join(folder, FSC_JSON), report)
            with atomic_path(os.path.join(folder, POSES_NPZ)) as tmp:
                with open(tmp, "wb") as handle:
                    np.savez(handle, **poses)
            write_json(os.path.join(folder, STATE_JSON), meta)
            write_json(path(self.job_dir, CHECKPOINT), {"iteration": meta["iteration"],
                                                         "folder": os.path.relpath(folder, self.job_dir)})
            if self.keep > 0:  # the one just written is intact: older ones beyond `keep` go
                for old in self.folders()[self.keep:]:
                    shutil.rmtree(old, ignore_errors=True)

        self.wait()
        if not background:
            write()
            return
        if self._writer is None:
            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cryocv-checkpoint")
        self._pending = self._writer.submit(write)

    def wait(self):
        """Block until a background save is written (its error, if any, is raised here)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def folders(self) -> list:
        """Iteration folders, newest first."""
        return sorted(glob.glob(os.path.join(self.root, "iter_[0-9][0-9][0-9]*")), reverse=True)

    def load_latest(self) -> RefineState | None:
        """The newest intact checkpoint, or None (the job starts over). A folder a killed job left
        half-written, or a damaged one, is skipped for the one before it (listed in ``skipped``)."""
        self.skipped = []
        for folder in self.folders():
            try:
                return self._load(folder)
            except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, CryocvError) as exc:
                self.skipped.append((os.path.relpath(folder, self.job_dir), f"{type(exc).__name__}: {exc}"))
        return None

    def _load(self, folder: str) -> RefineState:
        meta = read_json(os.path.join(folder, STATE_JSON))
        references = None if meta["final_done"] else [read_map(os.path.join(folder, name))[0] for name in REFERENCES]
        mask = read_map(os.path.join(folder, MASK))[0] if meta["has_mask"] else None
        poses = np.load(os.path.join(folder, POSES_NPZ))
        return RefineState(iteration=meta["iteration"], references=references, mask=mask,
                           resolution_A=meta["resolution_A"], euler_deg=poses["euler_deg"],
                           origin_A=poses["origin_A"], noise_var_shell=poses["noise_var_shell"],
                           history=meta["history"], converged=meta["converged"], final_done=meta["final_done"])

    def final_outputs(self, state: RefineState):
        """(half-maps, mask, FSC report, full map, NU cutoff map or None) of a checkpointed final pass."""
        folder = self.folder(state.iteration)
        halves = [read_map(os.path.join(folder, name))[0] for name in HALF_MAPS]
        cutoff_path = os.path.join(folder, NU_CUTOFF)
        cutoff = read_map(cutoff_path)[0] if os.path.isfile(cutoff_path) else None
        return (halves, state.mask, read_json(os.path.join(folder, FSC_JSON)),
                read_map(os.path.join(folder, MAP))[0], cutoff)
