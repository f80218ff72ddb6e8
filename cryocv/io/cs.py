"""cryoSPARC ``.cs`` particle files: numpy structured arrays (``np.save`` format).

Conversions to the RELION model (as pyem's csparc2star and cryoDRGN do):
``A = Rodrigues(alignments3D/pose)ᵀ``; ``rlnOriginXAngst = alignments3D/shift ·
alignments3D/psize_A`` (pixels, same sign); ``df1_A → rlnDefocusU``,
``df2_A → rlnDefocusV``, ``df_angle_rad → rlnDefocusAngle`` (degrees);
``alignments3D/split`` 0/1 → half-set 1/2; ``blob/idx`` is 0-based; a leading
``>`` in ``blob/path`` means "relative to the .cs file's folder" (exported jobs).
"""
from __future__ import annotations

import hashlib
import os

import numpy as np

from ..ctf import CTFParams
from ..errors import CryocvError
from ..geometry import axis_angle_to_matrix, euler_to_matrix, matrix_to_axis_angle, matrix_to_euler
from ..particles import Particles, project_image_path, resolve_image_path
from .mrc import atomic_path


def _field(data, name, default=None):
    if name in data.dtype.names:
        return data[name]
    if default is None:
        return None
    return np.full(len(data), default)


def read_cs(path: str, datadir: str | None = None) -> Particles:
    """Read a cryoSPARC particle ``.cs`` file."""
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise CryocvError(f"{path} is not a cryoSPARC .cs file (a numpy structured array): {exc}") from None
    if data.dtype.names is None or "blob/path" not in data.dtype.names:
        raise CryocvError(f"{path} is not a cryoSPARC particle file (no blob/path field)")
    required = ["blob/idx", "blob/shape", "blob/psize_A"]
    if "alignments3D/pose" in data.dtype.names:
        required += ["alignments3D/shift"]
    if "ctf/df1_A" in data.dtype.names:
        required += ["ctf/df2_A", "ctf/df_angle_rad", "ctf/accel_kv", "ctf/cs_mm", "ctf/amp_contrast"]
    missing = [f for f in required if f not in data.dtype.names]
    if missing:
        raise CryocvError(f"{path} lacks the field(s) {', '.join(missing)}")
    if len(data) == 0:
        raise CryocvError(f"{path} lists no particles")
    n = len(data)
    psizes = data["blob/psize_A"].astype(float)
    pixel_size = float(psizes[0])
    if not (np.all(np.isfinite(psizes)) and psizes.min() > 0):
        raise CryocvError(f"{path} has a bad pixel size (blob/psize_A = {psizes.min()})")
    if psizes.max() / psizes.min() > 1.01:
        raise CryocvError(f"{path} mixes pixel sizes {psizes.min():.4f}–{psizes.max():.4f} Å")
    shapes = np.unique(np.asarray(data["blob/shape"]).reshape(n, -1), axis=0)
    if len(shapes) > 1:
        raise CryocvError(f"{path} mixes image shapes {shapes.tolist()}")
    resolved, stacks = {}, []
    folder = os.path.dirname(os.path.abspath(path))
    for raw in data["blob/path"]:
        name = raw.decode() if isinstance(raw, bytes) else str(raw)
        if name not in resolved:
            resolved[name] = (os.path.join(folder, name[1:]) if name.startswith(">")
                              else resolve_image_path(name, path, datadir))
        stacks.append(resolved[name])

    has_alignment = "alignments3D/pose" in data.dtype.names
    if has_alignment:
        matrices = np.swapaxes(axis_angle_to_matrix(data["alignments3D/pose"].astype(np.float64)), -1, -2)
        euler = matrix_to_euler(matrices)
        shift_psize = _field(data, "alignments3D/psize_A", pixel_size).astype(float)
        origin = data["alignments3D/shift"].astype(float) * shift_psize[:, None]
        half = np.zeros(n, np.int8)
        if "alignments3D/split" in data.dtype.names:
            split = data["alignments3D/split"].astype(np.int64)
            if np.any((split < 0) | (split > 1)):
                raise CryocvError(f"{path}: alignments3D/split must be 0 or 1")
            half = (split + 1).astype(np.int8)
    else:
        euler, origin, half = np.zeros((n, 3)), np.zeros((n, 2)), np.zeros(n, np.int8)

    ctf = None
    if "ctf/df1_A" in data.dtype.names:
        ctf = CTFParams(
            defocus_u_A=data["ctf/df1_A"].astype(float), defocus_v_A=data["ctf/df2_A"].astype(float),
            defocus_angle_deg=np.rad2deg(data["ctf/df_angle_rad"].astype(float)),
            voltage_kV=data["ctf/accel_kv"].astype(float), cs_mm=data["ctf/cs_mm"].astype(float),
            amplitude_contrast=data["ctf/amp_contrast"].astype(float),
            phase_shift_deg=np.rad2deg(_field(data, "ctf/phase_shift_rad", 0.0).astype(float)),
            bfactor_A2=_field(data, "ctf/bfactor", 0.0).astype(float),
            scale=_field(data, "ctf/scale", 1.0).astype(float))
    groups = _field(data, "ctf/exp_group_id", 0).astype(int) + 1
    names = coordinates = micrograph_shape = None
    if "location/micrograph_path" in data.dtype.names:
        names = np.array([p.decode() if isinstance(p, bytes) else str(p) for p in data["location/micrograph_path"]],
                         dtype=object)
    if {"location/center_x_frac", "location/center_y_frac", "location/micrograph_shape"} <= set(data.dtype.names):
        micrograph_shape = np.asarray(data["location/micrograph_shape"]).reshape(n, 2).astype(np.int64)  # (ny, nx)
        coordinates = np.stack([data["location/center_x_frac"] * micrograph_shape[:, 1],
                                data["location/center_y_frac"] * micrograph_shape[:, 0]], axis=1).astype(float)
    return Particles(
        stack_paths=np.array(stacks, dtype=object), stack_indices=data["blob/idx"].astype(np.int64),
        box_size=int(shapes[0][-1]), pixel_size_A=pixel_size, euler_deg=euler, origin_A=origin, ctf=ctf,
        half_set=half, optics_group=groups, has_alignment=has_alignment, source=path,
        micrograph_names=names, coordinates_px=coordinates, micrograph_shape=micrograph_shape,
        extra={"cs_uid": data["uid"] if "uid" in data.dtype.names else None})


def stable_uids(particles: Particles) -> np.ndarray:
    """uids (n,) uint64 from each image's stack path and index (BLAKE2b, 63 bits): the same
    particles get the same uids in every run (Python's own hash is salted per process)."""
    return np.array([int.from_bytes(hashlib.blake2b(f"{os.path.abspath(p)}\0{i}".encode(), digest_size=8).digest(),
                                    "little") >> 1 or 1
                     for p, i in zip(particles.stack_paths, particles.stack_indices)], dtype=np.uint64)


def particles_to_cs(particles: Particles, path: str) -> np.ndarray:
    """The structured array cryoSPARC expects for ``particles``."""
    n = len(particles)
    # cryoSPARC's blob/path: relative to the project directory (here the working directory);
    # '>' (paths relative to an exported .cs file's folder) is only read
    paths = [project_image_path(p, path) for p in particles.stack_paths]
    path_len = max(1, max(len(p.encode()) for p in paths))
    fields = [("uid", "<u8"), ("blob/path", f"S{path_len}"), ("blob/idx", "<u4"), ("blob/shape", "<u4", (2,)),
              ("blob/psize_A", "<f4"), ("blob/sign", "<f4")]
    ctf = particles.ctf
    if ctf is not None:
        fields += [("ctf/type", "S9"), ("ctf/exp_group_id", "<u4"), ("ctf/accel_kv", "<f4"), ("ctf/cs_mm", "<f4"),
                   ("ctf/amp_contrast", "<f4"), ("ctf/df1_A", "<f4"), ("ctf/df2_A", "<f4"),
                   ("ctf/df_angle_rad", "<f4"), ("ctf/phase_shift_rad", "<f4"), ("ctf/scale", "<f4"),
                   ("ctf/scale_const", "<f4"), ("ctf/bfactor", "<f4")]
    # half-sets only where every particle has one: unknown ones stay unknown (no split 0 for all)
    with_split = particles.has_alignment and bool(np.all(particles.half_set > 0))
    if particles.has_alignment:
        fields += [("alignments3D/shift", "<f4", (2,)), ("alignments3D/pose", "<f4", (3,)),
                   ("alignments3D/psize_A", "<f4")] + ([("alignments3D/split", "<u4")] if with_split else [])
    if particles.micrograph_names is not None:
        name_len = max(1, max(len(str(m).encode()) for m in particles.micrograph_names))
        fields += [("location/micrograph_path", f"S{name_len}")]
    # fractional centres need the micrograph's size, which STAR files do not hold
    with_centres = particles.coordinates_px is not None and particles.micrograph_shape is not None
    if with_centres:
        fields += [("location/micrograph_shape", "<u4", (2,)), ("location/center_x_frac", "<f4"),
                   ("location/center_y_frac", "<f4")]
    out = np.zeros(n, dtype=fields)
    if particles.micrograph_names is not None:
        out["location/micrograph_path"] = [str(m).encode() for m in particles.micrograph_names]
    if with_centres:
        out["location/micrograph_shape"] = particles.micrograph_shape
        out["location/center_x_frac"] = particles.coordinates_px[:, 0] / particles.micrograph_shape[:, 1]
        out["location/center_y_frac"] = particles.coordinates_px[:, 1] / particles.micrograph_shape[:, 0]
    uid = particles.extra.get("cs_uid")
    out["uid"] = uid if uid is not None and len(uid) == n else stable_uids(particles)
    out["blob/path"] = [p.encode() for p in paths]
    out["blob/idx"] = particles.stack_indices
    out["blob/shape"] = particles.box_size
    out["blob/psize_A"] = particles.pixel_size_A
    out["blob/sign"] = -1.0
    if ctf is not None:
        out["ctf/type"] = b"imported"
        out["ctf/exp_group_id"] = np.maximum(particles.optics_group - 1, 0)
        out["ctf/accel_kv"], out["ctf/cs_mm"] = ctf.voltage_kV, ctf.cs_mm
        out["ctf/amp_contrast"] = ctf.amplitude_contrast
        out["ctf/df1_A"], out["ctf/df2_A"] = ctf.defocus_u_A, ctf.defocus_v_A
        out["ctf/df_angle_rad"] = np.deg2rad(ctf.defocus_angle_deg)
        out["ctf/phase_shift_rad"] = np.deg2rad(ctf.phase_shift_deg)
        out["ctf/scale"], out["ctf/bfactor"] = ctf.scale, ctf.bfactor_A2
    if particles.has_alignment:
        matrices = euler_to_matrix(particles.euler_deg)
        out["alignments3D/pose"] = matrix_to_axis_angle(np.swapaxes(matrices, -1, -2))
        out["alignments3D/shift"] = particles.origin_A / particles.pixel_size_A
        out["alignments3D/psize_A"] = particles.pixel_size_A
        if with_split:
            out["alignments3D/split"] = np.where(particles.half_set == 2, 1, 0)
    return out


def write_cs(particles: Particles, path: str):
    """Write a ``.cs`` file atomically (``np.save`` to a handle keeps the name)."""
    array = particles_to_cs(particles, path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            np.save(handle, array)
