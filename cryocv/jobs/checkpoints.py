"""Checkpoints of an iterative job: :class:`RefineState` (what one holds), :class:`CheckpointStore`
(per-iteration folders under ``iterations/``, written in the background while the next pass runs)
and the decorator that finishes a background write when a job stops. File names: :mod:`.jobdir`."""
from __future__ import annotations

import copy
import glob
import os
import shutil
import weakref
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import wraps

import numpy as np

from ..backend import to_numpy
from ..errors import CryocvError
from ..io.mrc import atomic_path, read_map, write_map
from ..plot_worker import BackgroundPlotter
from .jobdir import (CHECKPOINT, FSC_JSON, HALF_MAPS, ITERATIONS, MAP, MASK, NU_CUTOFF, NU_FILTERED_MAP,
                     POSES_NPZ, REFERENCES, STATE_JSON, path, read_json, write_json)


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


def finishes_writes_on_error(job):
    """Decorator of a job's ``run``: when it raises, the checkpoint being written in the background
    (the final pass's goes on while the job writes its other outputs) is finished first, so the job
    directory holds no half-written checkpoint however the job stopped; plot helpers are stopped."""
    @wraps(job)
    def run(*args, **kwargs):
        try:
            return job(*args, **kwargs)
        except BaseException:
            for plotter in list(BackgroundPlotter.opened):
                plotter.close()      # its helper process goes now, not when Python exits
            for store in list(CheckpointStore.opened):
                try:
                    store.wait()
                except Exception:
                    pass             # the error that stopped the job is the one to report
            raise
    return run


class CheckpointStore:
    """Per-iteration checkpoints in ``job_dir/iterations/iter_NNN`` and ``checkpoint.json`` (written last);
    after each save only the newest ``keep`` iteration folders stay (0: all)."""

    opened = weakref.WeakSet()            # every store alive (see finishes_writes_on_error)

    def __init__(self, job_dir: str, keep: int = 0):
        CheckpointStore.opened.add(self)
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
