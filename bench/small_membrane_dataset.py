"""Benchmark dataset: a small membrane protein (or one globin) in a per-particle disordered belt.

Chains of a model (protein atoms; default 8zpm: CXCR4 + nanobody) in a micelle or nanodisc of
``belt_mass_ratio`` × their mass, drawn afresh per particle. Maps ``[z, y, x]``, index ``N//2`` = the
chains' centre of mass; points ``(x, y, z)`` Å from it; the belt is built in a membrane frame (z = n):

- normal, ``belt_axis="helices"``: α-helical stretches of the CA trace (CA i→i+3 4.5–5.8 Å, i→i+4
  5.6–6.9 Å) of ≥ 14 residues (one membrane span) give axes ``v`` (mean of the last 4 CAs − of the
  first 4); ``n`` = leading eigenvector of ``Σ v vᵀ/|v|``: the length-weighted mean axis with signs
  aligned, long TM helices outvoting short amphipathic ones. ``"principal"`` (soluble): the atoms'
  principal axis of least extent.
- slab centre: the offset along ``n`` whose ``thickness_A`` (32 Å) window holds the largest score of
  residues' CA (+1 AILMFVWC, −1 DEKR); the belt axis passes through the centroid of the slab's atoms.
- belt: micelle = :class:`membrane_dataset.MicelleBelt` (protein surface per azimuth − 3 Å out to a
  rounded rim: detergent fills grooves, not the protein); nanodisc = a flat lipid annulus
  (:class:`FlatBelt`) and a thin scaffold band at protein density (``scaffold_fraction`` of the mass).
  Detergent/lipid density = ``belt_density_fraction`` (0.5) × the protein's mean density; widths
  give volume = mass / density. Per particle: U(0.75, 1.25) × volume / ``blob_volume_A3`` Gaussian
  blobs, uniform positions, masses U(0.5, 1.5) rescaled to the exact mass (voxel sums like the maps).

Optional **belt motion** (``belt_tilt_sigma_deg``, ``belt_shift_sigma_A``): each particle's belt turned
about its centre by N(0, σ) about a random axis and moved in the membrane plane by N(0, σ) per axis, so
the belt's shape is not rigidly attached to the protein; ``belt_mean.mrc`` is then the mean over 48 motions.

Optional **flexible periphery** (``flexible_chains``, e.g. CXCR4's nanobody ``N``): those chains are
left out of the judged protein and turned per particle about their hinge (centroid of their atoms within
4.5 Å of the rigid chains) by N(0, ``wobble_sigma_deg``) about a random axis; ``belt_mean.mrc`` then holds
the belt's and the periphery's expectation (mean of 48 wobbles).

``image = IFT(CTF · shift_{−o/p}[P_A(protein) + P_{AW}(periphery, hinge shift) + Σ_blobs analytic 2D
Gaussians]) + noise``: pose A
Haar-uniform, origin o uniform in ±2 Å, CTF :func:`cryocv.simulate.random_ctf` (0.8–2.5 µm, 300 kV),
white noise of variance mean signal variance (belt included) / ``snr``.
Defaults box 128 at 1.1 Å (Nyquist 2.2 Å, beyond what aligning ~40 kDa reaches) hold CXCR4 + Nb
(radius 63 Å); the receptor alone (``--chains R``, 48 Å with its micelle) fits box 96 at 1.2 Å.
``python bench/small_membrane_dataset.py --out DIR --n 2000 [--chains R] [--belt nanodisc]
[--chains R,N --flexible-chains N --wobble-sigma-deg 10] [--check]``
writes ``particles.star``/``.mrcs``, ``truth_protein.mrc``, ``protein_mask.mrc``, ``belt_mean.mrc``,
``initial_reference.mrc`` (protein + mean belt, 30 Å low-pass) and ``dataset.json``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass, replace

import numpy as np
from scipy import ndimage
from scipy.optimize import brentq

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]

from cryocv.backend import resolve_xp, to_device, to_numpy  # noqa: E402
from cryocv.ctf import ctf_half_plane  # noqa: E402
from cryocv.fourier import ift2_centered  # noqa: E402
from cryocv.geometry import euler_to_matrix, matrix_to_euler, random_rotations  # noqa: E402
from cryocv.io.mrc import read_map, write_map, write_stack  # noqa: E402
from cryocv.io.particle_files import load_particles, save_particles  # noqa: E402
from cryocv.particles import Particles, random_half_sets  # noqa: E402
from cryocv.projector import prepare_volume, project  # noqa: E402
from cryocv.simulate import DEFAULT_DEFOCUS_RANGE_A, clean_projections, random_ctf  # noqa: E402
from cryocv.source import ParticleSource  # noqa: E402
from membrane_dataset import (PROTEIN_A3_PER_DALTON, MicelleBelt, core_mask, density_map,  # noqa: E402
                              domain_poses, initial_reference, load_model, micelle_projection_ft, pack_micelles,
                              refmac_blur_A2, save_montage, select_residues, wobble_rotations)
from two_body_dataset import hinge_point, rotate_map_about_point  # noqa: E402

SHARED_DATA = os.environ.get("CRYOCV_SHARED_DATA", os.path.join(HERE, os.pardir, os.pardir, "shared", "data"))
DEFAULT_MODEL = os.path.abspath(os.path.join(SHARED_DATA, "models", "8zpm_cxcr4.cif"))
DEFAULT_BOX_SIZE, DEFAULT_PIXEL_SIZE_A = 128, 1.1
SLAB_THICKNESS_A = 32.0      # belt height along the normal: hydrophobic ~30 Å + part of the head groups
MIN_HELIX_RESIDUES = 14
_BELT_STREAM = 11            # belt of particle i: np.random.default_rng([seed, _BELT_STREAM, i])
_WOBBLE_STREAM = 12          # periphery wobble of particle i: np.random.default_rng([seed, _WOBBLE_STREAM, i])
MEAN_SAMPLES = 48            # wobbles (belt motions) averaged into the periphery's (belt's) mean map
_BELT_MOTION_STREAM = 13     # belt tilt and shift of particle i: np.random.default_rng([seed, _BELT_MOTION_STREAM, i])


def ca_trace(structure):
    """Residues with a CA → (chain index (R,), number (R,), one-letter codes (R,) str, CA xyz (R, 3) Å)."""
    import gemmi
    res = [(c, r, gemmi.find_tabulated_residue(r.name)) for c, ch in enumerate(structure[0]) for r in ch
           if r.find_atom("CA", "*")]
    return (np.array([c for c, _, _ in res]), np.array([r.seqid.num for _, r, _ in res]),
            np.array([t.one_letter_code.upper() if t else "X" for _, _, t in res]),
            np.array([r.find_atom("CA", "*").pos.tolist() for _, r, _ in res]).reshape(-1, 3))


def membrane_normal(structure, xyz_A, mass, belt_axis: str = "helices"):
    """Normal (3,) from the helices or the atoms ``xyz_A`` (n, 3), ``mass`` (n,) → (normal, JSON-ready note)."""
    if belt_axis == "helices":
        chain, num, _, xyz = ca_trace(structure)
        d3, d4 = (np.linalg.norm(xyz[k:] - xyz[:-k], axis=1) for k in (3, 4))
        ok = ((d3[:-1] > 4.5) & (d3[:-1] < 5.8) & (d4 > 5.6) & (d4 < 6.9) & (num[4:] - num[:-4] == 4)
              & (chain[4:] == chain[:-4]))
        helical = np.r_[np.convolve(ok, np.ones(5))[:len(xyz)] > 0, False]  # residues i…i+4 of each ok i
        runs = np.r_[0, np.flatnonzero(np.diff(helical.astype(np.int8)) | (np.diff(np.r_[chain, -1]) != 0)) + 1]
        axes = np.array([xyz[b - 4:b].mean(axis=0) - xyz[a:a + 4].mean(axis=0) for a, b in zip(runs, runs[1:])
                         if helical[a] and b - a >= MIN_HELIX_RESIDUES]).reshape(-1, 3)
        if len(axes) < 2:
            raise ValueError(f"{len(axes)} helices of >= {MIN_HELIX_RESIDUES} residues: use belt_axis='principal'")
        lengths = np.linalg.norm(axes, axis=1)
        values, vectors = np.linalg.eigh(np.einsum("hi,hj->ij", axes / lengths[:, None], axes))
        normal, tilts = vectors[:, -1], np.degrees(np.arccos(np.abs(axes @ vectors[:, -1]) / lengths))
        note = {"method": "helices", "helix_lengths_A": lengths.round(1).tolist(),
                "helix_tilts_deg": tilts.round(1).tolist(), "order_parameter": float(values[-1] / values.sum())}
    elif belt_axis == "principal":
        centred = xyz_A - mass @ xyz_A / mass.sum()
        values, vectors = np.linalg.eigh(np.einsum("a,ai,aj->ij", mass, centred, centred) / mass.sum())
        normal, note = vectors[:, 0], {"method": "principal", "rms_extents_A": np.sqrt(values).round(2).tolist()}
    else:
        raise ValueError(f"belt_axis must be 'helices' or 'principal', not {belt_axis!r}")
    return normal * np.sign(normal[np.argmax(np.abs(normal))]), note


def slab_centre_A(structure, normal, centre_A, thickness_A: float = SLAB_THICKNESS_A) -> float:
    """Offset (Å) along ``normal`` from ``centre_A`` of the most hydrophobic slab (module docstring)."""
    _, _, codes, xyz = ca_trace(structure)
    t = (xyz - centre_A) @ normal
    score = np.isin(codes, list("AILMFVWC")).astype(float) - np.isin(codes, list("DEKR"))
    scan = np.arange(t.min() + thickness_A / 2, max(t.max(), t.min() + thickness_A) - thickness_A / 2 + 0.25, 0.5)
    totals = np.array([score[np.abs(t - c) <= thickness_A / 2].sum() for c in scan])
    return float(scan[totals == totals.max()].mean())


class FlatBelt(MicelleBelt):
    """A :class:`MicelleBelt` with a flat rim: outer radius ``tm_radius_A + belt_width_A`` at every z."""
    def outer_radius_A(self, z_A):
        return np.full(np.shape(z_A), self.tm_radius_A + self.belt_width_A)


@dataclass
class BeltComponent:
    """Blobs of width ``blob_sigma_A`` filling ``region`` (membrane frame), total ``mass`` (voxel sum)."""
    name: str
    region: MicelleBelt
    mass: float
    blob_sigma_A: float
    mean_blobs: float

    def sample(self, rng, frame):
        """One particle's blobs → (centres (J, 3) Å, map frame ``o + R p``, masses (J,) summing to ``mass``)."""
        count = max(1, int(round(self.mean_blobs * rng.uniform(0.75, 1.25))))
        masses = rng.uniform(0.5, 1.5, count)
        return frame[0] + self.region.sample(rng, count) @ frame[1].T, masses * (self.mass / masses.sum())


def build_belt(kind: str, slab_xyz_A, belt_mass: float, protein_density: float, voxel_A3: float,
               belt_density_fraction: float = 0.5, thickness_A: float = SLAB_THICKNESS_A, blob_sigma_A: float = 5.0,
               blob_volume_A3: float = 800.0, scaffold_fraction: float = 0.33, scaffold_height_A: float = 24.0,
               inner_gap_A: float = 3.0) -> list:
    """Belt components around protein atoms ``slab_xyz_A`` (membrane frame); masses in voxel sums,
    densities in voxel values; scaffold blobs are 0.6 × as wide and 4 × as many per volume."""
    lipid_mass = belt_mass * (1 - scaffold_fraction) if kind == "nanodisc" else belt_mass
    region = {"micelle": MicelleBelt, "nanodisc": FlatBelt}[kind].around(slab_xyz_A, -thickness_A / 2,
                                                                         thickness_A / 2, inner_gap_A)
    excess = lambda w: replace(region, belt_width_A=w).volume_A3() - lipid_mass * voxel_A3 / (  # noqa: E731
        belt_density_fraction * protein_density)
    if excess(0.0) > 0:
        raise ValueError("the belt is too light to fill even the grooves: raise the belt mass ratio")
    region = replace(region, belt_width_A=brentq(excess, 0.0, 300.0, xtol=1e-4))
    parts = [BeltComponent("micelle" if kind == "micelle" else "lipids", region, lipid_mass, blob_sigma_A,
                           region.volume_A3() / blob_volume_A3)]
    if kind == "nanodisc":
        radius, volume = region.tm_radius_A + region.belt_width_A, belt_mass * scaffold_fraction * voxel_A3
        width = math.sqrt(radius ** 2 + volume / protein_density / (math.pi * scaffold_height_A)) - radius
        ring = FlatBelt(-scaffold_height_A / 2, scaffold_height_A / 2, np.full(72, radius), radius, width)
        parts.append(BeltComponent("scaffold", ring, belt_mass * scaffold_fraction, 0.6 * blob_sigma_A,
                                   ring.volume_A3() / (blob_volume_A3 / 4)))
    return parts


@dataclass
class SmallMembraneTruth:
    box_size: int
    pixel_size_A: float
    protein_map: np.ndarray          # (N, N, N) float32
    frame: tuple                     # (origin (3,) Å, rotation (3, 3) columns e1, e2, normal): p → o + R p
    components: list                 # [BeltComponent]
    info: dict                       # JSON-ready
    periphery_map: np.ndarray | None = None  # (N, N, N) float32: flexible chains at rest, or None
    hinge_A: np.ndarray | None = None        # (3,) x, y, z Å from the box centre: the periphery's pivot
    wobble_sigma_deg: float = 0.0            # periphery rotation about the hinge ~ N(0, σ) about a random axis
    belt_tilt_sigma_deg: float = 0.0         # the whole belt turned per particle about its centre ~ N(0, σ)
    belt_shift_sigma_A: float = 0.0          # ... and moved in the membrane plane ~ N(0, σ) per axis

    def belt_motion(self, seed: int, index: int):
        """The belt's rigid motion in particle ``index`` (map frame): rotation W (3, 3) about the belt's
        centre (frame origin), then translation t (3,) Å (in the membrane plane); identity without one."""
        if not (self.belt_tilt_sigma_deg or self.belt_shift_sigma_A):
            return np.eye(3), np.zeros(3)
        rng = np.random.default_rng([seed, _BELT_MOTION_STREAM, index])
        rotation = wobble_rotations(rng, 1, 1, self.belt_tilt_sigma_deg)[0][0, 0]
        in_plane = self.frame[1][:, :2] @ rng.normal(0.0, self.belt_shift_sigma_A, 2)
        return rotation, in_plane

    def particle_wobble(self, seed: int, index: int) -> np.ndarray:
        """The periphery's rotation W (3, 3) about the hinge in particle ``index``; depends on (seed, index) only."""
        rng = np.random.default_rng([seed, _WOBBLE_STREAM, index])
        return wobble_rotations(rng, 1, 1, self.wobble_sigma_deg)[0][0, 0]

    def periphery_mean_map(self, samples: int = MEAN_SAMPLES) -> np.ndarray:
        """Expected periphery (N, N, N) float32: the mean of ``samples`` wobbles (fixed draw) of the
        periphery about its hinge (linear interpolation); zeros without a periphery."""
        if self.periphery_map is None:
            return np.zeros((self.box_size,) * 3, np.float32)
        wobbles = wobble_rotations(np.random.default_rng(_WOBBLE_STREAM), samples, 1, self.wobble_sigma_deg)[0][:, 0]
        return mean_over_motions(self.periphery_map, [(w, np.zeros(3)) for w in wobbles], self.hinge_A,
                                 self.pixel_size_A).astype(np.float32)

    def particle_belt(self, seed: int, index: int) -> list:
        """[(centres (J, 3) Å, masses (J,)) per component] of particle ``index``; depends on (seed, index) only."""
        rng = np.random.default_rng([seed, _BELT_STREAM, index])
        rotation, shift = self.belt_motion(seed, index)
        origin = self.frame[0]
        return [(origin + (centres - origin) @ rotation.T + shift, masses)
                for centres, masses in (c.sample(rng, self.frame) for c in self.components)]

    def belt_mean_map(self) -> np.ndarray:
        """Expected belt (N, N, N) float32: each region's occupancy (on a membrane-frame grid, moved to the
        map frame by linear interpolation) × its mass / occupied volume, blurred by its blobs."""
        (origin, rotation), n, p, flip = self.frame, self.box_size, self.pixel_size_A, np.eye(3)[::-1]
        matrix, centre = flip @ rotation.T @ flip, np.full(3, n // 2, float)
        offset = centre - matrix @ centre - flip @ (rotation.T @ origin) / p
        out = np.zeros((n, n, n))
        for c in self.components:
            occupancy = c.region.occupancy(n, p).astype(np.float64)
            density = ndimage.affine_transform(occupancy * (c.mass / occupancy.sum()), matrix, offset=offset, order=1)
            out += ndimage.gaussian_filter(density, c.blob_sigma_A / p, mode="constant")
        if self.belt_tilt_sigma_deg or self.belt_shift_sigma_A:      # the mean over belt motions (fixed draw)
            out = mean_over_motions(out, [self.belt_motion(_BELT_MOTION_STREAM, i) for i in range(MEAN_SAMPLES)],
                                    origin, p)
        return out.astype(np.float32)


def mean_over_motions(volume, motions, point_A, pixel_size_A: float) -> np.ndarray:
    """The mean (N, N, N) float64 of ``volume`` moved by each of ``motions`` [(rotation W (3, 3) about
    ``point_A``, then translation t (3,) Å)] (linear interpolation): the expectation of a part that moves."""
    return sum(rotate_map_about_point(volume, w, point_A, pixel_size_A, translation_A=t, order=1)
               for w, t in motions) / len(motions)


def build_truth(model_path: str = DEFAULT_MODEL, chains=None, box_size: int = DEFAULT_BOX_SIZE,
                pixel_size_A: float = DEFAULT_PIXEL_SIZE_A, belt: str = "micelle", belt_axis: str = "helices",
                belt_mass_ratio: float = 1.25, bfactor_A2: float | None = 50.0, oversampling: int = 2,
                flexible_chains=None, wobble_sigma_deg: float = 10.0, belt_tilt_sigma_deg: float = 0.0,
                belt_shift_sigma_A: float = 0.0, **belt_options) -> SmallMembraneTruth:
    """Map of ``chains`` (None: all) centred on their centre of mass, membrane frame and belt
    (``belt_options``: :func:`build_belt`'s keywords). ``flexible_chains`` (e.g. ``"N"``: a nanobody) form
    a **flexible periphery**: left out of ``protein_map`` (the rigid part, the one judged) and kept as
    ``periphery_map``, turned per particle about its hinge (centroid of its atoms within 4.5 Å of the
    rigid chains) by ``wobble_sigma_deg``; the belt's mass counts all chains. ``belt_tilt_sigma_deg`` and
    ``belt_shift_sigma_A``: each particle's belt turned about its centre and moved in the membrane plane
    (the detergent does not sit the same way around every protein)."""
    structure = load_model(model_path, bfactor_A2)
    if set(chains or []) - {ch.name for ch in structure[0]}:
        raise ValueError(f"chains {chains}: not all in {model_path} ({[ch.name for ch in structure[0]]})")
    structure = select_residues(structure, lambda c, r: c in chains) if chains else structure
    flexible = set(flexible_chains.split(",") if isinstance(flexible_chains, str) else flexible_chains or [])
    if flexible and (flexible - {ch.name for ch in structure[0]} or flexible == {ch.name for ch in structure[0]}):
        raise ValueError(f"flexible chains {sorted(flexible)}: must be some, not all, of {[ch.name for ch in structure[0]]}")
    atoms = [a for ch in structure[0] for res in ch for a in res]
    xyz, mass = np.array([a.pos.tolist() for a in atoms]), np.array([a.element.weight for a in atoms])
    com = mass @ xyz / mass.sum()
    blur = refmac_blur_A2(structure, pixel_size_A, oversampling)
    rigid = select_residues(structure, lambda c, r: c not in flexible) if flexible else structure
    protein = density_map(rigid, box_size, pixel_size_A, com, blur, oversampling)
    periphery = hinge = None
    if flexible:
        periphery = density_map(select_residues(structure, lambda c, r: c in flexible), box_size, pixel_size_A, com,
                                blur, oversampling)
        in_flexible = np.array([ch.name in flexible for ch in structure[0] for res in ch for a in res])
        hinge, n_contact = hinge_point(xyz[in_flexible], xyz[~in_flexible], mass[~in_flexible] @ xyz[~in_flexible]
                                       / mass[~in_flexible].sum())
        hinge = hinge - com
    normal, normal_note = membrane_normal(structure, xyz, mass, belt_axis)
    thickness = belt_options.get("thickness_A", SLAB_THICKNESS_A)
    offset, rel = slab_centre_A(structure, normal, com, thickness), xyz - com
    in_slab = np.abs(rel @ normal - offset) <= thickness / 2
    axis_point = rel[in_slab].mean(axis=0)
    e1 = np.cross(normal, np.eye(3)[np.argmin(np.abs(normal))])
    e1 /= np.linalg.norm(e1)
    frame = (axis_point + (offset - axis_point @ normal) * normal, np.stack([e1, np.cross(normal, e1), normal], 1))
    protein_sum = float(protein.sum(dtype=np.float64)) + (0.0 if periphery is None else float(periphery.sum(dtype=np.float64)))
    protein_density = protein_sum * pixel_size_A ** 3 / (mass.sum() * PROTEIN_A3_PER_DALTON)
    components = build_belt(belt, (rel[in_slab] - frame[0]) @ frame[1], belt_mass_ratio * protein_sum, protein_density,
                            pixel_size_A ** 3, **belt_options)
    far = max(np.linalg.norm(frame[0] + c.region.sample(np.random.default_rng(0), 20000) @ frame[1].T, axis=1).max()
              + 2 * c.blob_sigma_A for c in components)
    info = {"model": os.path.abspath(model_path), "chains": [ch.name for ch in structure[0]], "n_atoms": len(atoms),
            "center_of_mass_model_A": com.round(3).tolist(), "bfactor_A2": bfactor_A2,
            "mass_kDa": {"protein": mass[~in_flexible].sum() / 1e3 if flexible else mass.sum() / 1e3,
                         **({"periphery": mass[in_flexible].sum() / 1e3} if flexible else {}),
                         "belt": belt_mass_ratio * mass.sum() / 1e3, "belt_mass_ratio": belt_mass_ratio,
                         "note": "modelled heavy atoms (no H); protein = the rigid chains (judged); belt: voxel-sum "
                                 "ratio × all chains"},
            "density": {"gemmi_blur_A2": blur, "protein_voxel_sum": protein_sum, "protein_mean_voxel": protein_density,
                        "note": "all chains (the belt's mass is a ratio of this), flexible ones included"},
            "normal_xyz": normal.round(5).tolist(), "normal_estimate": normal_note,
            "slab": {"thickness_A": thickness, "centre_along_normal_A": offset, "n_atoms": int(in_slab.sum()),
                     "belt_axis_point_A_xyz": frame[0].round(3).tolist()},
            "belt_components": [{"name": c.name, "mass_voxel_sum": c.mass, "volume_A3": c.region.volume_A3(),
                                 "blob_sigma_A": c.blob_sigma_A, "mean_blobs": c.mean_blobs, "height_A": 2 * r.z_max_A,
                                 "radius_A_min_tm_outer": [r.inner_radius_A.min(), r.tm_radius_A,
                                                           r.tm_radius_A + r.belt_width_A]} for c in components
                                for r in [c.region]],
            "extent": {"protein_max_radius_A": float(np.linalg.norm(rel, axis=1).max()),
                       "belt_max_radius_plus_2sigma_A": float(far),
                       "reconstruction_window_radius_A": (box_size / 2 - 3) * pixel_size_A}}
    if flexible:
        info["periphery"] = {"chains": sorted(flexible), "wobble_sigma_deg": wobble_sigma_deg,
                             "hinge_A_xyz_from_box_centre": hinge.round(3).tolist(), "hinge_contact_atoms": n_contact,
                             "max_radius_from_hinge_A": float(np.linalg.norm(xyz[in_flexible] - com - hinge, axis=1).max())}
    info["belt_motion"] = {"tilt_sigma_deg": belt_tilt_sigma_deg, "shift_sigma_A": belt_shift_sigma_A}
    return SmallMembraneTruth(box_size, float(pixel_size_A), protein, frame, components, info, periphery, hinge,
                              float(wobble_sigma_deg) if flexible else 0.0, float(belt_tilt_sigma_deg),
                              float(belt_shift_sigma_A))


def render(truth: SmallMembraneTruth, protein_ft, rotations, origin_A, belts=None, ctf_matrix=None, xp=np,
           periphery_ft=None, wobbles=None):
    """Noise-free images (B, N, N) float32 numpy: the protein (``prepare_volume``'d) + ``belts`` (B
    :meth:`SmallMembraneTruth.particle_belt` lists, or None) + the periphery (``prepare_volume``'d, or
    None) turned by ``wobbles`` (B, 3, 3) about the hinge, at poses (B, 3, 3), origins (B, 2) Å,
    times the CTFs ``ctf_matrix`` (B, 9) unless None."""
    n, p = truth.box_size, truth.pixel_size_A
    dev = lambda a: to_device(np.ascontiguousarray(a, dtype=np.float32), xp)  # noqa: E731
    origin_px = np.asarray(origin_A, dtype=np.float64) / p
    slices = project(protein_ft, dev(rotations), n, shifts_px=dev(-origin_px))
    if periphery_ft is not None:      # domain D'(x) = D(Wᵀ(x − h) + h): pose A·W, content moved by (A(h − W h))_xy
        poses, shifts = domain_poses(rotations, np.asarray(wobbles)[:, None], truth.hinge_A[None], p)
        slices += project(periphery_ft, dev(poses[:, 0]), n, shifts_px=dev(shifts[:, 0] - origin_px))
    for k, component in enumerate(truth.components if belts is not None else []):
        centres, masses = pack_micelles([b[k] for b in belts])
        xy_px = np.einsum("bij,bkj->bki", np.asarray(rotations)[:, :2], centres) / p - origin_px[:, None]
        slices += micelle_projection_ft(dev(xy_px), dev(masses), n, component.blob_sigma_A / p)
    if ctf_matrix is not None:
        slices = slices * ctf_half_plane(to_device(np.asarray(ctf_matrix), xp), n, p)
    return to_numpy(ift2_centered(slices, n)).astype(np.float32)


def check_belt_projection(truth: SmallMembraneTruth, seed: int, rotations, origin_A) -> dict:
    """Analytic belt projections vs the same blobs sampled on the 3D grid, rotated by cubic splines and
    summed along z (``∫ V(Aᵀ(x + o_x, y + o_y, z)) dz``); and that 3D map's mass / the protein's. Particles
    0 … len(rotations) − 1 of ``seed`` at their poses (n, 3, 3) and origins (n, 2) Å."""
    n, p, flip = truth.box_size, truth.pixel_size_A, np.eye(3)[::-1]
    grid, out = (np.arange(n) - n // 2) * p, {"belt_rel_error_vs_realspace": [], "rendered_3d_mass_ratio": []}
    gauss = lambda x, s: np.exp(-(grid - x[:, None]) ** 2 / (2 * s * s)) / (np.sqrt(2 * np.pi) * s / p)  # noqa: E731
    for i, belt in enumerate(truth.particle_belt(seed, j) for j in range(len(rotations))):
        volume = sum(np.einsum("j,jz,jy,jx->zyx", m, *(gauss(c[:, k], comp.blob_sigma_A) for k in (2, 1, 0)))
                     for (c, m), comp in zip(belt, truth.components))
        matrix, centre = flip @ rotations[i].T @ flip, np.full(3, n // 2, float)
        offset = centre - matrix @ centre + flip @ (rotations[i].T @ np.r_[origin_A[i] / p, 0.0])
        real = ndimage.affine_transform(volume, matrix, offset=offset, order=3).sum(axis=0)
        analytic = render(truth, prepare_volume(0 * volume), rotations[i:i + 1], origin_A[i:i + 1], [belt])[0]
        out["belt_rel_error_vs_realspace"].append(float(np.linalg.norm(analytic - real) / np.linalg.norm(real)))
        out["rendered_3d_mass_ratio"].append(float(volume.sum()) / truth.info["density"]["protein_voxel_sum"])
    return out


def check_protein_projection(truth: SmallMembraneTruth, out_dir: str, count: int = 8) -> dict:
    """Protein-only images (CTF, true pose and origin) vs :func:`cryocv.simulate.clean_projections` of the
    written ``truth_protein.mrc`` with the poses, origins and CTFs read back from ``particles.star``."""
    particles = load_particles(os.path.join(out_dir, "particles.star"))
    index = np.arange(min(count, len(particles)))
    batch = ParticleSource(particles, np).load(index, images=False)
    theirs = clean_projections(prepare_volume(read_map(os.path.join(out_dir, "truth_protein.mrc"))[0]),
                               batch.rotations, batch.origin_px, batch.ctf, truth.box_size)
    ours = render(truth, prepare_volume(truth.protein_map), particles.rotations[index], particles.origin_A[index],
                  None, None if particles.ctf is None else particles.ctf.as_matrix()[index])
    return {"protein_rel_error_vs_cryocv_projection": float(np.linalg.norm(ours - theirs) / np.linalg.norm(theirs))}


def check_periphery_projection(truth: SmallMembraneTruth, seed: int, rotations, origin_A) -> dict:
    """The periphery rendered by its pose A·W and hinge shift vs the projection of the periphery map
    turned by W about the hinge in real space (cubic), particles 0 … len(rotations) − 1 of ``seed``."""
    errors, nothing_ft, periphery_ft = [], prepare_volume(0 * truth.protein_map), prepare_volume(truth.periphery_map)
    for i in range(len(rotations)):
        w = truth.particle_wobble(seed, i)
        ours = render(truth, nothing_ft, rotations[i:i + 1], origin_A[i:i + 1], periphery_ft=periphery_ft,
                      wobbles=[w])[0]
        turned = rotate_map_about_point(truth.periphery_map, w, truth.hinge_A, truth.pixel_size_A).astype(np.float32)
        theirs = render(truth, prepare_volume(turned), rotations[i:i + 1], origin_A[i:i + 1])[0]
        errors.append(float(np.linalg.norm(ours - theirs) / np.linalg.norm(theirs)))
    return {"periphery_rel_error_vs_turned_map": errors}


def build_dataset(out_dir: str, n: int, model_path: str = DEFAULT_MODEL, chains=None,
                  box_size: int = DEFAULT_BOX_SIZE, pixel_size_A: float = DEFAULT_PIXEL_SIZE_A, snr: float = 0.05,
                  belt: str = "micelle", belt_axis: str = "helices", belt_mass_ratio: float = 1.25, seed: int = 0,
                  shift_range_A: float = 2.0, defocus_range_A=DEFAULT_DEFOCUS_RANGE_A, voltage_kV: float = 300.0,
                  with_ctf: bool = True, lowpass_A: float = 30.0, batch_size: int = 256, xp=np, checks: bool = False,
                  montage: str | None = None, **belt_options) -> dict:
    """Simulate ``n`` particles into ``out_dir`` (files in the module docstring); returns dataset.json.
    ``montage``: a PNG of 4 particles in rows: protein (+ periphery), + belt, + CTF, + noise."""
    if n <= 0 or not snr > 0:
        raise ValueError("need n > 0 and snr > 0 (inf: noise-free)")
    started = time.perf_counter()
    truth = build_truth(model_path, chains, box_size, pixel_size_A, belt, belt_axis, belt_mass_ratio, **belt_options)
    times, extent = {"truth_s": time.perf_counter() - started}, truth.info["extent"]
    if max(extent["protein_max_radius_A"], extent["belt_max_radius_plus_2sigma_A"]) > \
            extent["reconstruction_window_radius_A"]:
        print("warning: the particle exceeds the reconstruction window: " + json.dumps(extent), file=sys.stderr)
    rng = np.random.default_rng(seed)
    euler = matrix_to_euler(random_rotations(n, rng))
    rotations = euler_to_matrix(euler)                   # as the STAR file's angles give them
    origin_A = rng.uniform(-shift_range_A, shift_range_A, size=(n, 2))
    ctf = random_ctf(n, rng, defocus_range_A, voltage_kV=voltage_kV)
    ctf_matrix = ctf.as_matrix() if with_ctf else None
    t0, protein_ft = time.perf_counter(), prepare_volume(to_device(truth.protein_map, xp))
    periphery_ft = None if truth.periphery_map is None else prepare_volume(to_device(truth.periphery_map, xp))
    images, belt_mass = np.empty((n, box_size, box_size), np.float32), np.empty(n)
    for s in range(0, n, batch_size):
        sl = slice(s, min(s + batch_size, n))
        belts = [truth.particle_belt(seed, i) for i in range(sl.start, sl.stop)]
        belt_mass[sl] = [sum(m.sum() for _, m in b) for b in belts]
        wobbles = None if periphery_ft is None else [truth.particle_wobble(seed, i) for i in range(sl.start, sl.stop)]
        images[sl] = render(truth, protein_ft, rotations[sl], origin_A[sl], belts,
                            None if ctf_matrix is None else ctf_matrix[sl], xp, periphery_ft, wobbles)
    times["particles_s"] = time.perf_counter() - t0
    signal_var, clean = float(images.var(axis=(1, 2)).mean()), images[:4].copy()
    noise_sigma = math.sqrt(signal_var / snr) if np.isfinite(snr) else 0.0
    for s in range(0, n, batch_size):
        images[s:s + batch_size] += (rng.normal(size=images[s:s + batch_size].shape) * noise_sigma).astype(np.float32)
    os.makedirs(out_dir, exist_ok=True)
    t0, stack = time.perf_counter(), os.path.abspath(os.path.join(out_dir, "particles.mrcs"))
    write_stack(stack, images, pixel_size_A)
    particles = Particles(stack_paths=np.array([stack] * n, dtype=object), stack_indices=np.arange(n),
                          box_size=box_size, pixel_size_A=float(pixel_size_A), euler_deg=euler, origin_A=origin_A,
                          ctf=ctf if with_ctf else None, half_set=random_half_sets(n, seed),
                          optics_group=np.ones(n, dtype=int), source=stack)
    save_particles(particles, os.path.join(out_dir, "particles.star"))
    mass_kDa, protein_sum = truth.info["mass_kDa"], truth.info["density"]["protein_voxel_sum"]
    mask, threshold = core_mask(truth.protein_map, mass_kDa["protein"] * 1e3 * PROTEIN_A3_PER_DALTON, pixel_size_A)
    belt_mean = truth.belt_mean_map()
    belt_mean_ratio = float(belt_mean.sum(dtype=np.float64) / protein_sum)
    if truth.periphery_map is not None:     # judged: the rigid protein; the belt's expectation carries the periphery's
        belt_mean = belt_mean + truth.periphery_mean_map()
    maps = {"truth_protein.mrc": truth.protein_map, "protein_mask.mrc": mask, "belt_mean.mrc": belt_mean,
            "initial_reference.mrc": initial_reference(truth.protein_map + belt_mean, pixel_size_A, lowpass_A)}
    for name, volume in maps.items():
        write_map(os.path.join(out_dir, name), volume, pixel_size_A)
    times["write_s"] = time.perf_counter() - t0
    dataset = {"n": n, "box_size": box_size, "pixel_size_A": float(pixel_size_A), "snr": snr, "seed": seed,
               "belt": belt, "belt_axis": belt_axis, "mass_kDa": mass_kDa, "normal_xyz": truth.info["normal_xyz"],
               "signal_variance": signal_var, "noise_sigma": noise_sigma, "shift_range_A": shift_range_A,
               "ctf": {"defocus_range_A": list(defocus_range_A), "voltage_kV": voltage_kV} if with_ctf else None,
               "belt_mass_ratio_realised": {"per_particle_mean_min_max": [float(f(belt_mass) / protein_sum) for f in (
                   np.mean, np.min, np.max)], "belt_mean_map": belt_mean_ratio},
               "note_belt_mean": "belt_mean.mrc = the belt's expectation (+ the wobbling periphery's, if any)",
               "protein_mask": {"threshold": threshold, "enclosed": "molecular volume", "dilation_A": 3, "edge_A": 6},
               "half_sets": np.bincount(particles.half_set, minlength=3)[1:].tolist(), "truth": truth.info,
               "initial_reference_lowpass_A": lowpass_A, "files": {k[:-4]: k for k in maps}}
    if checks:
        t0 = time.perf_counter()
        dataset["checks"] = {"belt_mass_ratio": dataset["belt_mass_ratio_realised"]["per_particle_mean_min_max"][0],
                             **check_belt_projection(truth, seed, rotations[:2], origin_A[:2]),
                             **check_protein_projection(truth, out_dir)}
        if truth.periphery_map is not None:
            dataset["checks"].update(check_periphery_projection(truth, seed, rotations[:2], origin_A[:2]))
        times["checks_s"] = time.perf_counter() - t0
    if montage:
        k, volume_ft = len(clean), prepare_volume(truth.protein_map)
        wobbles = None if periphery_ft is None else [truth.particle_wobble(seed, i) for i in range(k)]
        periphery_np = None if periphery_ft is None else prepare_volume(truth.periphery_map)
        rows = [render(truth, volume_ft, rotations[:k], origin_A[:k], b, periphery_ft=periphery_np, wobbles=wobbles)
                for b in (None, [truth.particle_belt(seed, i) for i in range(k)])]
        save_montage(np.concatenate(rows + [clean, images[:k]]), montage, n_cols=k)
    times["total_s"] = time.perf_counter() - started
    dataset["timings_s"] = {k: round(v, 2) for k, v in times.items()}
    with open(os.path.join(out_dir, "dataset.json"), "w") as handle:
        json.dump(dataset, handle, indent=2, default=float)
    return dataset


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--chains", type=lambda s: s.split(","), help="comma-separated chains to keep (default all)")
    p.add_argument("--flexible-chains", help="comma-separated chains that wobble about their hinge (a flexible "
                   "periphery, e.g. N: CXCR4's nanobody); judged: the other chains")
    p.add_argument("--wobble-sigma-deg", type=float, default=10.0, help="periphery wobble (default 10)")
    p.add_argument("--belt-tilt-sigma-deg", type=float, default=0.0,
                   help="each particle's belt turned about its centre by N(0, this) (default 0)")
    p.add_argument("--belt-shift-sigma-A", type=float, default=0.0,
                   help="each particle's belt moved in the membrane plane by N(0, this) per axis (default 0)")
    for flag, kind, default, text in (
            ("--model", str, DEFAULT_MODEL, "PDB/mmCIF model"), ("--n", int, 2000, "particles"),
            ("--box-size", int, DEFAULT_BOX_SIZE, "box"), ("--pixel-size-A", float, DEFAULT_PIXEL_SIZE_A, "pixel"),
            ("--snr", float, 0.05, "mean signal variance (belt included) / noise variance; inf = noise-free"),
            ("--belt-mass-ratio", float, 1.25, "belt mass / protein mass"),
            ("--belt-density-fraction", float, 0.5, "detergent/lipid density / the protein's mean density"),
            ("--thickness-A", float, SLAB_THICKNESS_A, "belt height along the normal"),
            ("--blob-sigma-A", float, 5.0, "detergent/lipid blob width"),
            ("--blob-volume-A3", float, 800.0, "belt volume per blob (sets their number)"), ("--seed", int, 0, "random seed"),
            ("--shift-range-A", float, 2.0, "origins uniform in ± this"), ("--batch-size", int, 256, "batch"),
            ("--lowpass-A", float, 30.0, "initial reference low-pass")):
        p.add_argument(flag, type=kind, default=default, help=f"{text} (default {default})")
    for flag, choices, text in (("--belt", ["micelle", "nanodisc"], "belt kind"),
                                ("--belt-axis", ["helices", "principal"], "normal from the helices (membrane "
                                 "protein) or the axis of least extent (soluble)"),
                                ("--device", ["auto", "cpu", "gpu"], "where to compute")):
        p.add_argument(flag, choices=choices, default=choices[0], help=f"{text} (default {choices[0]})")
    p.add_argument("--no-ctf", dest="with_ctf", action="store_false")
    p.add_argument("--montage", help="PNG of 4 particles: protein, + belt, + CTF, + noise (rows)")
    p.add_argument("--check", dest="checks", action="store_true", help="run the self-checks and print them")
    args = vars(p.parse_args(argv))
    xp, out, model_path = resolve_xp(args.pop("device")), args.pop("out"), args.pop("model")
    dataset = build_dataset(out, model_path=model_path, **args, xp=xp)
    print(f"{dataset['n']} particles, {dataset['timings_s']['total_s']:.1f} s; masses (kDa) "
          f"{json.dumps(dataset['mass_kDa'])}; extent {json.dumps(dataset['truth']['extent'])}")
    if "checks" in dataset:
        print(json.dumps(dataset["checks"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
