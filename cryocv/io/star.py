"""RELION STAR particle files (3.0 style and 3.1+ with optics groups) via ``starfile``.

Per-particle columns take precedence over the optics table, as in RELION. The
pixel size comes from ``rlnImagePixelSize`` (3.1+), ``rlnPixelSize`` or
``rlnDetectorPixelSize · 1e4 / rlnMagnification`` (3.0). Image names are
``index@stack`` (1-based); stack paths resolve as in
:func:`cryocv.particles.resolve_image_path`.
"""
from __future__ import annotations

import csv
import os

import numpy as np
import pandas as pd
import starfile

from ..ctf import CTFParams
from ..errors import CryocvError
from ..particles import Particles, project_image_path, resolve_image_path
from .mrc import StackCache, atomic_path

ANGLES = ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]
ORIGINS_A = ["rlnOriginXAngst", "rlnOriginYAngst"]
ORIGINS_PX = ["rlnOriginX", "rlnOriginY"]
OPTICS_CTF = ["rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast"]
# columns this module writes itself (stale copies in a passthrough table are dropped)
_MANAGED = set(ANGLES + ORIGINS_A + ORIGINS_PX + OPTICS_CTF + [
    "rlnImageName", "rlnOpticsGroup", "rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnPhaseShift",
    "rlnCtfBfactor", "rlnCtfScalefactor", "rlnRandomSubset", "rlnMagnification", "rlnDetectorPixelSize",
    "rlnPixelSize", "rlnImagePixelSize", "rlnImageSize", "rlnMicrographName", "rlnCoordinateX", "rlnCoordinateY"])


def _particle_table(blocks: dict, path: str):
    for key in ("particles", "images", ""):
        if key in blocks and isinstance(blocks[key], pd.DataFrame):
            return blocks[key]
    for table in blocks.values():
        if isinstance(table, pd.DataFrame) and "rlnImageName" in table.columns:
            return table
    raise CryocvError(f"{path} has no particle table (data_particles with rlnImageName)")


def _column_getter(parts: pd.DataFrame, optics: pd.DataFrame | None):
    groups = parts["rlnOpticsGroup"].to_numpy(int) if "rlnOpticsGroup" in parts else None

    def get(name, default=None):
        if name in parts.columns:
            return parts[name].to_numpy()
        if optics is not None and name in optics.columns:
            mapping = dict(zip(optics["rlnOpticsGroup"].astype(int), optics[name]))
            if groups is None:
                return np.full(len(parts), optics[name].iloc[0])
            missing = set(np.unique(groups)) - set(mapping)
            if missing:
                raise CryocvError(f"optics group(s) {sorted(missing)} used by particles but not defined")
            return pd.Series(mapping).reindex(groups).to_numpy()
        return None if default is None else np.full(len(parts), default)

    return get


def _pixel_size(get, path):
    px = get("rlnImagePixelSize")
    if px is None:
        px = get("rlnPixelSize")
    if px is None:
        det, mag = get("rlnDetectorPixelSize"), get("rlnMagnification")
        if det is not None and mag is not None:
            px = det.astype(float) * 1e4 / mag.astype(float)
    if px is None:
        raise CryocvError(f"{path} gives no pixel size (rlnImagePixelSize, or rlnDetectorPixelSize "
                          f"and rlnMagnification)")
    px = px.astype(float)
    if not np.all(np.isfinite(px)) or np.any(px <= 0):
        raise CryocvError(f"{path} has a bad pixel size ({px.min()} Å): it must be positive")
    if px.max() / px.min() > 1.01:
        raise CryocvError(f"{path} mixes pixel sizes {px.min():.4f}–{px.max():.4f} Å across optics groups; "
                          f"rescale the particles to one pixel size first")
    return float(px[0])


def _ctf(get, path):
    defocus_u = get("rlnDefocusU")
    if defocus_u is None:
        return None
    defocus_v = get("rlnDefocusV")
    fields = {}
    for name in OPTICS_CTF:
        value = get(name)
        if value is None:
            raise CryocvError(f"{path} has defocus values but no {name} column (particles or optics table)")
        fields[name] = value.astype(float)
    return CTFParams(
        defocus_u_A=defocus_u.astype(float),
        defocus_v_A=(defocus_u if defocus_v is None else defocus_v).astype(float),
        defocus_angle_deg=get("rlnDefocusAngle", 0.0).astype(float),
        voltage_kV=fields["rlnVoltage"], cs_mm=fields["rlnSphericalAberration"],
        amplitude_contrast=fields["rlnAmplitudeContrast"],
        phase_shift_deg=get("rlnPhaseShift", 0.0).astype(float),
        bfactor_A2=get("rlnCtfBfactor", 0.0).astype(float),
        scale=get("rlnCtfScalefactor", 1.0).astype(float))


def read_star(path: str, datadir: str | None = None) -> Particles:
    """Read a RELION particle STAR file into :class:`~cryocv.particles.Particles`."""
    try:
        blocks = starfile.read(path, always_dict=True)
    except Exception as exc:
        raise CryocvError(f"cannot parse STAR file {path}: {exc}") from None
    try:
        return _particles_from_blocks(blocks, path, datadir)
    except (ValueError, TypeError, KeyError) as exc:  # non-numeric values, missing key columns
        raise CryocvError(f"{path}: unreadable particle metadata ({type(exc).__name__}: {exc})") from None


def _particles_from_blocks(blocks: dict, path: str, datadir) -> Particles:
    parts = _particle_table(blocks, path).reset_index(drop=True)
    optics = blocks.get("optics") if isinstance(blocks.get("optics"), pd.DataFrame) else None
    if "rlnImageName" not in parts.columns:
        raise CryocvError(f"{path} has no rlnImageName column")
    if len(parts) == 0:
        raise CryocvError(f"{path} lists no particles")
    get = _column_getter(parts, optics)
    pixel_size = _pixel_size(get, path)

    names = parts["rlnImageName"].astype(str).to_numpy()
    indices, stacks = np.empty(len(names), dtype=np.int64), []
    resolved = {}
    for i, name in enumerate(names):
        if "@" in name:
            idx, stack = name.split("@", 1)
            if not idx.strip().isdigit():
                raise CryocvError(f"{path}: bad rlnImageName {name!r} on row {i + 1} (expected index@stack)")
            indices[i] = int(idx) - 1
        else:
            indices[i], stack = 0, name
        if stack not in resolved:
            resolved[stack] = resolve_image_path(stack, path, datadir)
        stacks.append(resolved[stack])
    stack_paths = np.array(stacks, dtype=object)

    sizes = get("rlnImageSize")
    cache = StackCache()
    if sizes is not None:
        if len(np.unique(sizes.astype(int))) > 1:
            raise CryocvError(f"{path} mixes image sizes {sorted(np.unique(sizes.astype(int)))}")
        box = int(sizes[0])
    else:
        try:
            box = int(cache.stack(stack_paths[0]).shape[-1])
        except CryocvError:
            box = 0  # unknown until images are present

    has_alignment = all(c in parts.columns for c in ANGLES)
    euler = parts[ANGLES].to_numpy(float) if has_alignment else np.zeros((len(parts), 3))
    if all(c in parts.columns for c in ORIGINS_A):
        origin = parts[ORIGINS_A].to_numpy(float)
    elif all(c in parts.columns for c in ORIGINS_PX):
        origin = parts[ORIGINS_PX].to_numpy(float) * pixel_size
    else:
        origin = np.zeros((len(parts), 2))
    half = get("rlnRandomSubset", 0).astype(np.int64)
    if np.any((half < 0) | (half > 2)):
        raise CryocvError(f"{path}: rlnRandomSubset must be 1 or 2")
    half = half.astype(np.int8)
    return Particles(
        stack_paths=stack_paths, stack_indices=indices, box_size=box, pixel_size_A=pixel_size,
        euler_deg=euler, origin_A=origin, ctf=_ctf(get, path), half_set=half,
        optics_group=get("rlnOpticsGroup", 1).astype(int), has_alignment=has_alignment, source=path,
        micrograph_names=(parts["rlnMicrographName"].astype(str).to_numpy(dtype=object)
                          if "rlnMicrographName" in parts.columns else None),
        coordinates_px=(parts[["rlnCoordinateX", "rlnCoordinateY"]].to_numpy(float)
                        if {"rlnCoordinateX", "rlnCoordinateY"} <= set(parts.columns) else None),
        extra={"particles_table": parts, "optics_table": optics}, _cache=cache)


def _optics_table(particles: Particles):
    """One optics row per (group, voltage, Cs, Q0) combination; returns (table, group per particle)."""
    n = len(particles)
    ctf = particles.ctf
    keys = np.stack([particles.optics_group.astype(float)] + (
        [ctf.voltage_kV, ctf.cs_mm, ctf.amplitude_contrast] if ctf is not None else []), axis=1)
    unique, inverse = np.unique(keys, axis=0, return_inverse=True)
    old = particles.extra.get("optics_table")
    names = {}
    if old is not None and "rlnOpticsGroupName" in old:
        names = dict(zip(old["rlnOpticsGroup"].astype(int), old["rlnOpticsGroupName"]))
    rows = []
    for number, key in enumerate(unique, start=1):
        row = {"rlnOpticsGroup": number,
               "rlnOpticsGroupName": names.get(int(key[0]), f"opticsGroup{number}") if len(unique) == len(
                   np.unique(keys[:, 0])) else f"opticsGroup{number}"}
        if ctf is not None:
            row.update(rlnVoltage=key[1], rlnSphericalAberration=key[2], rlnAmplitudeContrast=key[3])
        row.update(rlnImagePixelSize=particles.pixel_size_A, rlnImageSize=particles.box_size,
                   rlnImageDimensionality=2)
        rows.append(row)
    return pd.DataFrame(rows), inverse.reshape(n) + 1


def image_names(particles: Particles, path: str, input_names=None) -> list:
    """rlnImageName of each particle for a STAR file at ``path``: the input's own name where RELION
    itself would still find the same image with it (absolute, or relative to the working directory,
    the project directory: a job run there keeps its input's names unchanged), else ``index@stack``
    with the stack named by :func:`project_image_path`."""
    stacks = {p: project_image_path(p, path) for p in dict.fromkeys(particles.stack_paths)}   # few distinct
    names = [f"{i + 1:06d}@{stacks[p]}" for i, p in zip(particles.stack_indices, particles.stack_paths)]
    if input_names is None or len(input_names) != len(particles):
        return names
    found, absolute = {}, {p: os.path.abspath(p) for p in stacks}
    for row, name in enumerate(np.asarray(input_names, dtype=str)):
        index, stack = name.split("@", 1) if "@" in name else ("", name)
        if stack not in found:
            found[stack] = os.path.abspath(stack) if stack and os.path.exists(stack) else None
        if (found[stack] is not None and found[stack] == absolute[particles.stack_paths[row]]
                and (int(index) - 1 if index.strip().isdigit() else 0) == particles.stack_indices[row]):
            names[row] = name
    return names


def particles_to_tables(particles: Particles, path: str):
    """The (optics, particles) DataFrames RELION 3.1 expects for ``particles``."""
    optics, groups = _optics_table(particles)
    table = particles.extra.get("particles_table")
    if table is None or len(table) != len(particles):
        table = pd.DataFrame(index=range(len(particles)))
    names = image_names(particles, path, table.get("rlnImageName"))
    table = table.drop(columns=[c for c in table.columns if c in _MANAGED]).reset_index(drop=True)
    columns = {"rlnImageName": names, "rlnOpticsGroup": groups}
    if particles.has_alignment:
        columns.update(zip(ANGLES, particles.euler_deg.T))
    columns.update(zip(ORIGINS_A, particles.origin_A.T))
    ctf = particles.ctf
    if ctf is not None:
        columns.update(rlnDefocusU=ctf.defocus_u_A, rlnDefocusV=ctf.defocus_v_A,
                       rlnDefocusAngle=ctf.defocus_angle_deg, rlnPhaseShift=ctf.phase_shift_deg,
                       rlnCtfBfactor=ctf.bfactor_A2, rlnCtfScalefactor=ctf.scale)
    if np.any(particles.half_set > 0):
        columns["rlnRandomSubset"] = particles.half_set.astype(int)
    if particles.micrograph_names is not None:
        columns["rlnMicrographName"] = particles.micrograph_names
    if particles.coordinates_px is not None:
        columns.update(rlnCoordinateX=particles.coordinates_px[:, 0], rlnCoordinateY=particles.coordinates_px[:, 1])
    table = pd.concat([pd.DataFrame(columns), table], axis=1)
    return optics, table


def write_star(particles: Particles, path: str):
    """Write RELION 3.1 STAR (``data_optics`` + ``data_particles``) atomically."""
    optics, table = particles_to_tables(particles, path)
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write("# written by cryocv\n\n")
        for name, df in (("optics", optics), ("particles", table)):
            write_loop_block(f, name, df)


def write_loop_block(f, name: str, df: pd.DataFrame):
    """One STAR ``loop_`` block as ``starfile.write`` lays it out (tab-separated, floats to six
    decimals, strings quoted only where they are empty or hold a space), but printed by pandas'
    C writer without a Python call per value (50 000 particles: ~0.3 s instead of ~1.4 s).
    Floats are rounded by numpy and printed with pandas' shortest repr: what "%.6f" would
    give, less trailing zeros."""
    columns = {}
    for column in df.columns:
        values = df[column]
        if values.dtype.kind == "f":
            values = values.round(6)
        elif values.dtype.kind == "O":
            missing = values.isna()
            text = values.astype(str)
            text = text.where(~(text.str.contains(" ", regex=False) | (text == "")), '"' + text + '"')
            values = text.where(~missing, "<NA>")         # as starfile: None/NaN are <NA>, not "None"/"nan"
        columns[column] = values
    f.write(f"data_{name}\n\nloop_\n" + "".join(f"_{c} #{i}\n" for i, c in enumerate(df.columns, 1)))
    pd.DataFrame(columns).to_csv(f, sep="\t", header=False, index=False, quoting=csv.QUOTE_NONE,
                                 na_rep="<NA>", lineterminator="\n")
    f.write("\n\n")
