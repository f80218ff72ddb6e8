"""Benchmark dataset: a membrane protein with wobbling domains in a disordered micelle.

Builds a simulated cryo-EM dataset from the TRPV1 model 3j5p (C4 axis on z, chains
A–D, residues 199–762):

- **core** (rigid): everything but the four ankyrin-repeat domains;
- **domains** (wobbling): residues ``<= domain_last_residue`` (default 355: the
  ankyrin-repeat domain up to the end of ANK6) of each chain, each rotated per
  particle about its **hinge** (the CA of residue ``domain_last_residue``) by an
  angle ~ N(0, ``wobble_sigma_deg``) about a random axis;
- **micelle**: per particle, a fresh set of isotropic 3D Gaussian blobs placed
  uniformly in a belt around the transmembrane slab.

Conventions (cryocv/RELION, see README "Conventions"): maps are ``[z, y, x]`` with
the origin at index ``N//2``, which is the whole model's centre of mass for every
part map. Positions in this module are ``(x, y, z)`` in Å relative to that centre
unless named ``*_voxel_zyx``. A pose ``A`` (RELION matrix) projects a point ``c`` of
the map to image position ``(A c)_xy``; shifts move image content by ``+shift``.

Image model, particle ``i`` with pose ``A``, origin ``o`` (Å) and CTF::

    image = IFT( CTF · shift_{−o/p} [ P_A(core)
                                      + Σ_d shift_{t_d} P_{A·W_d}(domain_d)
                                      + M_i ] ) + noise

``W_d`` rotates domain ``d`` about its hinge ``p_d``: ``D'(x) = D(W_dᵀ(x − p_d) + p_d)``,
whose projection at ``A`` is that of ``D`` at ``A·W_d`` moved by
``t_d = (A (p_d − W_d p_d))_xy / p`` pixels (:func:`check_wobble_formula` verifies this
against a real-space rotation). ``M_i`` is the micelle's projection, rendered
analytically on the half plane (:func:`micelle_projection_ft`). The noise is white
Gaussian with variance ``mean per-image signal variance / snr`` (as
:mod:`cryocv.simulate`).

Usage::

    python bench/membrane_dataset.py --out bench/out/trpv1 --n 10000 [--snr 0.05] [--device auto]
    python bench/membrane_dataset.py --out /tmp/m --n 16 --snr inf --montage /tmp/m.png --check

Writes ``particles.star`` / ``particles.mrcs`` (true poses A, origins, CTF, half-sets),
``truth_protein.mrc`` (core + domains at rest), ``truth_core.mrc``, ``core_mask.mrc``,
``micelle_mean.mrc`` (expected micelle density), ``truth_protein_mean_micelle.mrc``,
``initial_reference.mrc`` (truth low-passed to 30 Å), ``truth_particles.npz`` (per-particle
wobble rotations, micelle blob counts and masses) and ``dataset.json`` (all parameters).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from tqdm.auto import tqdm

if importlib.util.find_spec("cryocv") is None:  # run as a script from a checkout without cryocv installed
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cryocv.backend import get_array_module, resolve_xp, to_device, to_numpy
from cryocv.ctf import ctf_half_plane
from cryocv.fourier import ft3_centered, half_plane_frequencies, half_volume_radius, ift2_centered, ift3_centered
from cryocv.geometry import (axis_angle_to_matrix, euler_to_matrix, matrix_to_euler, random_rotations,
                             rotation_about_axis)
from cryocv.io.mrc import write_map, write_stack
from cryocv.masks import threshold_mask
from cryocv.particles import Particles, random_half_sets
from cryocv.io.particle_files import save_particles
from cryocv.projector import prepare_volume, project
from cryocv.simulate import random_ctf

DEFAULT_MODEL = "/work/shared/data/models/3j5p_trpv1_c4.pdb"
DEFAULT_BOX_SIZE = 72           # 172.8 Å: TRPV1 (radius 70 Å) + micelle fit the reconstruction window
DEFAULT_PIXEL_SIZE_A = 2.4
DEFAULT_DOMAIN_LAST_RESIDUE = 355  # ANK6's outer helix ends at 353; 356–360 is the linker
DEFAULT_TM_RESIDUES = (430, 690)   # pre-S1 helix end … S6 / start of the TRP helix
DALTON_PER_RESIDUE = 110.0
PROTEIN_A3_PER_DALTON = 1.21
_MICELLE_STREAM = 7  # micelle of particle i: np.random.default_rng([seed, _MICELLE_STREAM, i])


# --------------------------------------------------------------------------- atomic model

def _gemmi():
    try:
        import gemmi
    except ImportError:  # pragma: no cover
        raise SystemExit("membrane_dataset needs gemmi: pip install gemmi") from None
    return gemmi


def load_model(model_path: str, bfactor_A2: float | None = 50.0):
    """Read a PDB/mmCIF model as :func:`cryocv.models.map_from_model` does (no ligands,
    waters or hydrogens). ``bfactor_A2`` sets every atom's B (None keeps the file's)."""
    gemmi = _gemmi()
    structure = gemmi.read_structure(model_path)
    structure.setup_entities()
    structure.remove_ligands_and_waters()
    structure.remove_hydrogens()
    if bfactor_A2 is not None:
        for cra in structure[0].all():
            cra.atom.b_iso = float(bfactor_A2)
    return structure


@dataclass
class AtomTable:
    """Flat per-atom arrays of model 0: ``chain`` (n,) str, ``residue`` (n,) int,
    ``name`` (n,) str, ``xyz_A`` (n, 3) model coordinates in Å."""

    chain: np.ndarray
    residue: np.ndarray
    name: np.ndarray
    xyz_A: np.ndarray


def atom_table(structure) -> AtomTable:
    rows = [(ch.name, res.seqid.num, atom.name, atom.pos.x, atom.pos.y, atom.pos.z)
            for ch in structure[0] for res in ch for atom in res]
    chain, residue, name, x, y, z = zip(*rows)
    return AtomTable(np.array(chain), np.array(residue), np.array(name), np.stack([x, y, z], axis=1))


def select_residues(structure, keep):
    """Copy of ``structure`` keeping the residues for which ``keep(chain_name, residue_number)``."""
    out = structure.clone()
    model = out[0]
    for chain in model:
        for i in reversed(range(len(chain))):
            if not keep(chain.name, chain[i].seqid.num):
                del chain[i]
    for name in [ch.name for ch in model if len(ch) == 0]:
        model.remove_chain(name)
    return out


def split_model(structure, domain_last_residue: int = DEFAULT_DOMAIN_LAST_RESIDUE):
    """→ (core structure, {chain name: domain structure}) with domains = residues
    ``<= domain_last_residue`` of each chain (chains sorted by name)."""
    chains = sorted(ch.name for ch in structure[0])
    core = select_residues(structure, lambda c, r: r > domain_last_residue)
    domains = {name: select_residues(structure, lambda c, r, name=name: c == name and r <= domain_last_residue)
               for name in chains}
    return core, domains


def refmac_blur_A2(structure, pixel_size_A: float, oversampling: int) -> float:
    """gemmi's Refmac-compatible blur (Å²) for a grid of spacing ``pixel_size_A / oversampling``."""
    calc = _gemmi().DensityCalculatorE()
    calc.d_min = 2.0 * pixel_size_A
    calc.rate = float(oversampling)
    calc.set_refmac_compatible_blur(structure[0])
    return float(calc.blur)


def density_map(structure, box_size: int, pixel_size_A: float, center_A, blur_A2: float,
                oversampling: int = 2, remove_blur: bool = True) -> np.ndarray:
    """Electron-scattering potential of ``structure`` on a (N, N, N) ``[z, y, x]`` grid.

    The model point ``center_A`` (x, y, z Å, model frame) lands on index ``N//2``, so
    maps of parts of one model built with the same ``center_A`` and ``blur_A2`` add up
    to the whole model's map. gemmi's ``DensityCalculatorE`` samples the atoms blurred
    by ``blur_A2`` on a grid ``oversampling`` times finer; with ``remove_blur`` the
    blur is divided out in Fourier space and the map is Fourier-cropped to the
    ``box_size`` grid (a band-limited map of the atoms with their own B-factors).
    ``oversampling=1, remove_blur=False`` and the model's own Refmac blur reproduce
    :func:`cryocv.models.map_from_model` (which keeps gemmi's blur in the map).
    """
    gemmi = _gemmi()
    fine = box_size * oversampling
    model = structure.clone()[0]
    box_center = (box_size // 2) * pixel_size_A
    cx, cy, cz = (float(v) for v in center_A)
    model.transform_pos_and_adp(gemmi.Transform(gemmi.Mat33(), gemmi.Vec3(
        box_center - cx, box_center - cy, box_center - cz)))
    calc = gemmi.DensityCalculatorE()
    calc.d_min = 2.0 * pixel_size_A
    calc.rate = float(oversampling)
    edge = box_size * pixel_size_A
    calc.grid.unit_cell = gemmi.UnitCell(edge, edge, edge, 90, 90, 90)
    calc.grid.spacegroup = gemmi.SpaceGroup("P1")
    calc.grid.set_size(fine, fine, fine)
    calc.blur = float(blur_A2)
    calc.grid.fill(0.0)
    calc.add_model_density_to_grid(model)
    calc.grid.symmetrize_sum()
    grid_xyz = np.array(calc.grid, dtype=np.float64)  # [x, y, z], index j at j·spacing
    if remove_blur or oversampling != 1:
        grid_xyz = _fourier_crop_deblur(grid_xyz, box_size, pixel_size_A, blur_A2 if remove_blur else 0.0)
    return np.ascontiguousarray(grid_xyz.transpose(2, 1, 0), dtype=np.float32)


def _fourier_crop_deblur(grid, box_size: int, pixel_size_A: float, blur_A2: float) -> np.ndarray:
    """Uncentered periodic grid (M, M, M) sampled at j·(N·p/M) → (N, N, N) at j·p,
    keeping frequencies |k_i| < N/2 and multiplying by exp(+blur·s²/4)."""
    m, n = grid.shape[0], box_size
    ft = np.fft.rfftn(grid)
    keep = np.r_[0:n // 2, m - n // 2:m]  # k = 0…N/2−1 and −N/2…−1
    small = ft[np.ix_(keep, keep, np.arange(n // 2 + 1))]
    k = np.fft.fftfreq(n, d=1.0 / n)
    kr = np.arange(n // 2 + 1)
    s2 = (k[:, None, None] ** 2 + k[None, :, None] ** 2 + kr[None, None, :] ** 2) / (n * pixel_size_A) ** 2
    small = small * np.exp(blur_A2 * s2 / 4.0)
    return np.fft.irfftn(small, s=(n, n, n), axes=(0, 1, 2)) * (n / m) ** 3


def domain_hinges_A(atoms: AtomTable, center_A, domain_last_residue: int = DEFAULT_DOMAIN_LAST_RESIDUE):
    """Hinge of each chain's domain: CA of residue ``domain_last_residue`` → {chain: (x, y, z) Å
    relative to ``center_A``}."""
    hinges = {}
    for name in sorted(set(atoms.chain)):
        sel = (atoms.chain == name) & (atoms.residue == domain_last_residue) & (atoms.name == "CA")
        if not sel.any():
            raise ValueError(f"chain {name} has no CA at residue {domain_last_residue}")
        hinges[name] = atoms.xyz_A[sel][0] - np.asarray(center_A)
    return hinges


def membrane_slab_A(atoms: AtomTable, center_A, tm_residues=DEFAULT_TM_RESIDUES, percentile: float = 5.0):
    """z range (Å, relative to ``center_A``) of the transmembrane residues' atoms, trimmed to
    the [percentile, 100 − percentile] quantiles (the loops beyond the bilayer are dropped)."""
    sel = (atoms.residue >= tm_residues[0]) & (atoms.residue <= tm_residues[1])
    z = atoms.xyz_A[sel, 2] - center_A[2]
    low, high = np.percentile(z, [percentile, 100.0 - percentile])
    return float(low), float(high)


# --------------------------------------------------------------------------- micelle

@dataclass
class MicelleBelt:
    """Region holding the micelle, in Å relative to the box centre (C4 axis = z).

    A point at radius ``r`` (from the z axis), azimuth ``φ`` and height ``z`` is inside when
    ``z_min_A <= z <= z_max_A``, ``r >= inner_radius_A[bin(φ)]`` (the protein's outer surface in
    that direction minus a gap, so the detergent fills the grooves between subunits) and
    ``r <= tm_radius_A + belt_width_A · √(1 − t²)``, ``t = (z − z_mid)/(half height)``: a
    belt ``belt_width_A`` thick at mid-slab with a rounded (elliptic) rim.
    """

    z_min_A: float
    z_max_A: float
    inner_radius_A: np.ndarray  # (n_bins,) over φ ∈ [−π, π)
    tm_radius_A: float
    belt_width_A: float

    @classmethod
    def around(cls, tm_xyz_A, z_min_A: float, z_max_A: float, inner_gap_A: float = 3.0,
               belt_width_A: float = 15.0, n_bins: int = 72):
        """Belt around transmembrane atoms ``tm_xyz_A`` (n, 3) (relative to the box centre)."""
        in_slab = (tm_xyz_A[:, 2] >= z_min_A) & (tm_xyz_A[:, 2] <= z_max_A)
        xyz = tm_xyz_A[in_slab]
        radius = np.hypot(xyz[:, 0], xyz[:, 1])
        bins = _angle_bin(np.arctan2(xyz[:, 1], xyz[:, 0]), n_bins)
        surface = np.zeros(n_bins)
        np.maximum.at(surface, bins, radius)
        surface = ndimage.maximum_filter1d(surface, size=3, mode="wrap")  # atoms near a bin edge
        return cls(float(z_min_A), float(z_max_A), np.maximum(surface - inner_gap_A, 0.0),
                   float(radius.max()), float(belt_width_A))

    def outer_radius_A(self, z_A):
        half = (self.z_max_A - self.z_min_A) / 2
        t = (np.asarray(z_A) - (self.z_min_A + self.z_max_A) / 2) / half
        return self.tm_radius_A + self.belt_width_A * np.sqrt(np.clip(1 - t ** 2, 0, None))

    def contains(self, xyz_A) -> np.ndarray:
        """(..., 3) → (...) bool."""
        xyz_A = np.asarray(xyz_A)
        r = np.hypot(xyz_A[..., 0], xyz_A[..., 1])
        z = xyz_A[..., 2]
        inner = self.inner_radius_A[_angle_bin(np.arctan2(xyz_A[..., 1], xyz_A[..., 0]), self.inner_radius_A.size)]
        return (z >= self.z_min_A) & (z <= self.z_max_A) & (r >= inner) & (r <= self.outer_radius_A(z))

    def sample(self, rng, n: int) -> np.ndarray:
        """``n`` points uniform in the belt: (n, 3) Å (rejection from the enclosing cylinder shell)."""
        r_low, r_high = float(self.inner_radius_A.min()), self.tm_radius_A + self.belt_width_A
        out = np.empty((0, 3))
        while len(out) < n:
            m = 2 * (n - len(out)) + 16
            r = np.sqrt(rng.uniform(r_low ** 2, r_high ** 2, m))
            phi = rng.uniform(-np.pi, np.pi, m)
            z = rng.uniform(self.z_min_A, self.z_max_A, m)
            pts = np.stack([r * np.cos(phi), r * np.sin(phi), z], axis=1)
            out = np.concatenate([out, pts[self.contains(pts)]])
        return out[:n]

    def volume_A3(self, n_z: int = 400) -> float:
        """Volume of the belt (numerical integral over z and the φ bins)."""
        z = self.z_min_A + (np.arange(n_z) + 0.5) * (self.z_max_A - self.z_min_A) / n_z
        outer2 = self.outer_radius_A(z)[:, None] ** 2
        area = 0.5 * np.clip(outer2 - self.inner_radius_A[None] ** 2, 0, None).sum(axis=1)
        area *= 2 * np.pi / self.inner_radius_A.size
        return float(area.sum() * (self.z_max_A - self.z_min_A) / n_z)

    def occupancy(self, box_size: int, pixel_size_A: float, supersample: int = 3) -> np.ndarray:
        """Fraction of each voxel inside the belt: (N, N, N) ``[z, y, x]`` float32."""
        n, s = box_size, supersample
        sub = (np.arange(n * s) + 0.5) / s - 0.5 - n // 2  # sub-voxel centres, voxel units
        out = np.zeros((n, n, n), dtype=np.float32)
        y, x = np.meshgrid(sub * pixel_size_A, sub * pixel_size_A, indexing="ij")
        for iz in range(n):
            zs = sub[iz * s:(iz + 1) * s] * pixel_size_A
            if zs.max() < self.z_min_A or zs.min() > self.z_max_A:
                continue
            inside = np.stack([self.contains(np.stack([x, y, np.full_like(x, zv)], -1)) for zv in zs])
            out[iz] = inside.reshape(s, n, s, n, s).mean(axis=(0, 2, 4))
        return out


def _angle_bin(phi, n_bins: int):
    return np.clip(((np.asarray(phi) + np.pi) / (2 * np.pi) * n_bins).astype(int), 0, n_bins - 1)


@dataclass
class MicelleParams:
    """Blob statistics: per particle ``n ~ U{blobs_min … blobs_max}`` blobs of width
    ``blob_sigma_A``, each with mass ``mean_blob_mass · U(1 − spread, 1 + spread)``; masses
    are in voxel-sum units (the sum of a map's voxel values), like the truth maps."""

    blob_sigma_A: float
    blobs_min: int
    blobs_max: int
    mean_blob_mass: float
    mass_spread: float = 0.5

    def sample(self, belt: MicelleBelt, rng):
        """One particle's micelle → (centres (J, 3) Å, masses (J,))."""
        count = int(rng.integers(self.blobs_min, self.blobs_max + 1))
        centers = belt.sample(rng, count)
        masses = self.mean_blob_mass * rng.uniform(1 - self.mass_spread, 1 + self.mass_spread, count)
        return centers, masses


def micelle_projection_ft(centers_px, masses, box_size: int, sigma_px: float):
    """Half-plane FTs of sums of 2D Gaussians: (B, N, N//2+1) complex64.

    ``centers_px`` (B, J, 2) image positions (x, y) in pixels relative to the box centre
    (index N//2), ``masses`` (B, J) integrals (0 for padding). On the grid of
    :func:`cryocv.fourier.ft2_centered` (rows ``ky = i − N//2``, columns ``kx >= 0``) a
    Gaussian of integral ``m`` at ``(x, y)`` has the transform
    ``m · exp(−2π²σ²|k|²/N²) · exp(−2πi (kx x + ky y)/N)`` (the sign of
    :func:`cryocv.fourier.phase_shift_images`: a blob at +x appears at +x); the sum over
    blobs is one batched matrix product. Zero beyond Nyquist, like projections.
    """
    xp = get_array_module(centers_px)
    n = box_size
    kx, ky = half_plane_frequencies(n, xp)
    ky_axis, kx_axis = ky[:, 0], kx[0]
    x = centers_px[..., 0].astype(xp.float32)
    y = centers_px[..., 1].astype(xp.float32)
    two_pi = np.float32(2 * np.pi / n)
    phase_y = ky_axis[None, :, None] * y[:, None, :] * (-two_pi)  # (B, N, J)
    phase_x = x[:, :, None] * kx_axis[None, None, :] * (-two_pi)  # (B, J, N//2+1)
    left = (xp.cos(phase_y) + 1j * xp.sin(phase_y)).astype(xp.complex64) * masses[:, None, :].astype(xp.float32)
    right = (xp.cos(phase_x) + 1j * xp.sin(phase_x)).astype(xp.complex64)
    k2 = kx ** 2 + ky ** 2
    envelope = xp.exp(np.float32(-2 * np.pi ** 2 * sigma_px ** 2 / n ** 2) * k2) * (k2 <= (n / 2) ** 2)
    return xp.matmul(left, right) * envelope.astype(xp.float32)


# --------------------------------------------------------------------------- domain wobble

def wobble_rotations(rng, n: int, n_domains: int, sigma_deg: float):
    """Random rotations about uniform random axes by angles ~ N(0, sigma_deg):
    → (matrices (n, D, 3, 3) active rotations, angles (n, D) degrees)."""
    axes = rng.normal(size=(n, n_domains, 3))
    axes /= np.linalg.norm(axes, axis=-1, keepdims=True)
    angles_deg = rng.normal(0.0, sigma_deg, size=(n, n_domains)) if sigma_deg > 0 else np.zeros((n, n_domains))
    return axis_angle_to_matrix(axes * np.deg2rad(angles_deg)[..., None]), angles_deg


def domain_poses(rotations, wobbles, hinges_A, pixel_size_A: float):
    """Poses and in-plane shifts that render wobbled domains with the plain projector.

    ``rotations`` (B, 3, 3) particle poses A, ``wobbles`` (B, D, 3, 3) rotations W about
    ``hinges_A`` (D, 3) (x, y, z Å relative to the box centre) → (poses A·W (B, D, 3, 3),
    shifts (B, D, 2) pixels = (A (p − W p))_xy / pixel, content moved by +shift).
    """
    rotations = np.asarray(rotations, dtype=np.float64)
    wobbles = np.asarray(wobbles, dtype=np.float64)
    hinges = np.asarray(hinges_A, dtype=np.float64)
    poses = rotations[:, None] @ wobbles
    lever = hinges[None] - np.einsum("bdij,dj->bdi", wobbles, hinges)  # p − W p, (B, D, 3)
    shifts = np.einsum("bij,bdj->bdi", rotations[:, :2, :], lever) / pixel_size_A
    return poses, shifts


# --------------------------------------------------------------------------- truth

@dataclass
class MembraneTruth:
    """Ground truth shared by all particles (maps (N, N, N) ``[z, y, x]`` float32, numpy)."""

    box_size: int
    pixel_size_A: float
    core_map: np.ndarray
    domain_maps: np.ndarray          # (D, N, N, N)
    domain_chains: list
    hinges_A: np.ndarray             # (D, 3) x, y, z relative to the box centre
    belt: MicelleBelt
    micelle: MicelleParams
    info: dict                       # JSON-ready description (model, slab, densities, extents)

    @property
    def protein_map(self) -> np.ndarray:
        return self.core_map + self.domain_maps.sum(axis=0)

    def hinges_voxel_zyx(self) -> np.ndarray:
        """Hinges as (D, 3) fractional voxel indices [z, y, x] of the maps."""
        return self.box_size // 2 + self.hinges_A[:, ::-1] / self.pixel_size_A

    def micelle_mean_map(self) -> np.ndarray:
        """Expected micelle density (mean over particles): belt occupancy × mean density,
        blurred by the blob Gaussian. (N, N, N) float32."""
        density = self.info["micelle"]["mean_density_voxel"]
        occupancy = self.belt.occupancy(self.box_size, self.pixel_size_A)
        sigma_px = self.micelle.blob_sigma_A / self.pixel_size_A
        return (ndimage.gaussian_filter(occupancy.astype(np.float64), sigma_px, mode="wrap") * density).astype(
            np.float32)


def build_truth(model_path: str = DEFAULT_MODEL, box_size: int = DEFAULT_BOX_SIZE,
                pixel_size_A: float = DEFAULT_PIXEL_SIZE_A, bfactor_A2: float | None = 50.0,
                domain_last_residue: int = DEFAULT_DOMAIN_LAST_RESIDUE, tm_residues=DEFAULT_TM_RESIDUES,
                slab_percentile: float = 5.0, inner_gap_A: float = 3.0, belt_width_A: float = 15.0,
                blob_sigma_A: float = 5.0, blobs_min: int = 150, blobs_max: int = 300,
                micelle_density_fraction: float = 0.35, oversampling: int = 2,
                remove_blur: bool = True) -> MembraneTruth:
    """Split the model into core and domains, compute their maps on one grid (centred on the
    whole model's centre of mass), find hinges, the membrane slab and the micelle belt, and
    scale the blobs so the micelle's mean density is ``micelle_density_fraction`` × the
    protein's mean density (total protein density / molecular volume, 110 Da per residue,
    1.21 Å³/Da)."""
    if blobs_min < 1 or blobs_max < blobs_min:
        raise ValueError("need 1 <= blobs_min <= blobs_max")
    structure = load_model(model_path, bfactor_A2)
    atoms = atom_table(structure)
    center = np.array(structure[0].calculate_center_of_mass().tolist())
    blur = refmac_blur_A2(structure, pixel_size_A, oversampling)
    core, domains = split_model(structure, domain_last_residue)
    core_map = density_map(core, box_size, pixel_size_A, center, blur, oversampling, remove_blur)
    chains = sorted(domains)
    domain_maps = np.stack([density_map(domains[c], box_size, pixel_size_A, center, blur, oversampling,
                                        remove_blur) for c in chains])
    hinges = domain_hinges_A(atoms, center, domain_last_residue)
    hinges_A = np.stack([hinges[c] for c in chains])

    slab = membrane_slab_A(atoms, center, tm_residues, slab_percentile)
    tm = (atoms.residue >= tm_residues[0]) & (atoms.residue <= tm_residues[1])
    belt = MicelleBelt.around(atoms.xyz_A[tm] - center, *slab, inner_gap_A=inner_gap_A, belt_width_A=belt_width_A)

    n_residues = sum(len(ch) for ch in structure[0])
    voxel_A3 = pixel_size_A ** 3
    protein_volume_A3 = n_residues * DALTON_PER_RESIDUE * PROTEIN_A3_PER_DALTON
    protein_sum = float(core_map.sum(dtype=np.float64) + domain_maps.sum(dtype=np.float64))
    protein_density = protein_sum / (protein_volume_A3 / voxel_A3)  # mean voxel value inside the protein
    belt_volume_A3 = belt.volume_A3()
    micelle_density = micelle_density_fraction * protein_density
    mean_blobs = (blobs_min + blobs_max) / 2
    micelle = MicelleParams(blob_sigma_A, blobs_min, blobs_max,
                            mean_blob_mass=micelle_density * (belt_volume_A3 / voxel_A3) / mean_blobs)

    rel = atoms.xyz_A - center
    domain_atoms = atoms.residue <= domain_last_residue
    belt_points = belt.sample(np.random.default_rng(0), 200_000)
    window_A = (box_size / 2 - 3) * pixel_size_A
    info = {
        "model": os.path.abspath(model_path),
        "center_of_mass_A": center.tolist(),
        "n_atoms": int(len(atoms.chain)), "n_residues": int(n_residues),
        "bfactor_A2": "model" if bfactor_A2 is None else float(bfactor_A2),
        "density": {"calculator": "gemmi.DensityCalculatorE", "oversampling": oversampling,
                    "gemmi_blur_A2": blur, "blur_removed": bool(remove_blur)},
        "core": {"residues": f"> {domain_last_residue} of chains {','.join(chains)}",
                 "n_atoms": int((~domain_atoms).sum()), "density_sum": float(core_map.sum(dtype=np.float64))},
        "domains": {"chains": chains, "residues": f"{int(atoms.residue.min())}-{domain_last_residue}",
                    "n_atoms_each": [int((domain_atoms & (atoms.chain == c)).sum()) for c in chains],
                    "hinge_atom": f"CA {domain_last_residue}",
                    "hinges_A_xyz": hinges_A.round(3).tolist(),
                    "hinges_voxel_zyx": (box_size // 2 + hinges_A[:, ::-1] / pixel_size_A).round(3).tolist(),
                    "domain_com_A_xyz": [(rel[domain_atoms & (atoms.chain == c)].mean(axis=0)).round(2).tolist()
                                         for c in chains]},
        "tm_slab": {"residues": list(tm_residues), "percentile": slab_percentile,
                    "z_min_A": slab[0], "z_max_A": slab[1],
                    "z_min_voxel": box_size // 2 + slab[0] / pixel_size_A,
                    "z_max_voxel": box_size // 2 + slab[1] / pixel_size_A,
                    "z_range_untrimmed_A": [float(rel[tm, 2].min()), float(rel[tm, 2].max())]},
        "micelle": {"shape": "belt: protein surface − inner gap … tm radius + width, elliptic rim",
                    "inner_gap_A": inner_gap_A, "tm_radius_A": belt.tm_radius_A, "belt_width_A": belt_width_A,
                    "inner_radius_A_min_max": [float(belt.inner_radius_A.min()), float(belt.inner_radius_A.max())],
                    "volume_A3": belt_volume_A3, "blob_sigma_A": blob_sigma_A,
                    "blobs_per_particle": [blobs_min, blobs_max], "blob_mass_spread": micelle.mass_spread,
                    "mean_blob_mass_voxel_sum": micelle.mean_blob_mass,
                    "density_fraction_of_protein": micelle_density_fraction,
                    "mean_density_voxel": micelle_density, "protein_mean_density_voxel": protein_density,
                    "protein_volume_A3": protein_volume_A3},
        "extent": {"protein_max_radius_A": float(np.linalg.norm(rel, axis=1).max()),
                   "protein_max_radius_xy_A": float(np.hypot(rel[:, 0], rel[:, 1]).max()),
                   "micelle_max_radius_A": float(np.linalg.norm(belt_points, axis=1).max()),
                   "micelle_max_radius_plus_2sigma_A": float(np.linalg.norm(belt_points, axis=1).max()
                                                            + 2 * blob_sigma_A),
                   "reconstruction_window_radius_A": window_A, "box_half_width_A": box_size / 2 * pixel_size_A},
    }
    return MembraneTruth(box_size, float(pixel_size_A), core_map, domain_maps, chains, hinges_A, belt, micelle,
                         info)


# --------------------------------------------------------------------------- rendering

class ParticleRenderer:
    """Renders noise-free particle images of a :class:`MembraneTruth` on ``xp``'s device."""

    def __init__(self, truth: MembraneTruth, xp=np, with_micelle: bool = True):
        self.truth = truth
        self.xp = xp
        self.with_micelle = with_micelle
        self.core_ft = prepare_volume(to_device(truth.core_map, xp))
        self.domain_fts = [prepare_volume(to_device(m, xp)) for m in truth.domain_maps]

    def projections_ft(self, rotations, origin_A, wobbles, micelles=None):
        """Un-CTF'd half-plane FTs (B, N, N//2+1) on the device.

        ``rotations`` (B, 3, 3), ``origin_A`` (B, 2), ``wobbles`` (B, D, 3, 3) numpy;
        ``micelles`` a list of B (centres (J, 3) Å, masses (J,)) or None.
        """
        xp, t = self.xp, self.truth
        n, p = t.box_size, t.pixel_size_A
        origin_px = np.asarray(origin_A, dtype=np.float64) / p
        dev = lambda a: to_device(np.ascontiguousarray(a, dtype=np.float32), xp)  # noqa: E731
        slices = project(self.core_ft, dev(rotations), n, shifts_px=dev(-origin_px))
        poses, shifts = domain_poses(rotations, wobbles, t.hinges_A, p)
        for d, volume_ft in enumerate(self.domain_fts):
            slices += project(volume_ft, dev(poses[:, d]), n, shifts_px=dev(shifts[:, d] - origin_px))
        if self.with_micelle and micelles is not None:
            centers_A, masses = pack_micelles(micelles)
            xy_px = np.einsum("bij,bkj->bki", np.asarray(rotations)[:, :2, :], centers_A) / p - origin_px[:, None]
            slices += micelle_projection_ft(dev(xy_px), dev(masses), n, t.micelle.blob_sigma_A / p)
        return slices

    def images(self, rotations, origin_A, wobbles, micelles=None, ctf_matrix=None):
        """Noise-free images (B, N, N) float32 on the device (CTF applied if given, (B, 9))."""
        slices = self.projections_ft(rotations, origin_A, wobbles, micelles)
        if ctf_matrix is not None:
            slices = slices * ctf_half_plane(to_device(np.asarray(ctf_matrix), self.xp), self.truth.box_size,
                                             self.truth.pixel_size_A)
        return ift2_centered(slices, self.truth.box_size).astype(self.xp.float32)


def pack_micelles(micelles):
    """List of (centres (J_i, 3), masses (J_i,)) → zero-padded (B, J, 3), (B, J) arrays."""
    width = max(len(m) for _, m in micelles)
    centers = np.zeros((len(micelles), width, 3))
    masses = np.zeros((len(micelles), width))
    for i, (c, m) in enumerate(micelles):
        centers[i, :len(m)] = c
        masses[i, :len(m)] = m
    return centers, masses


def particle_micelle(truth: MembraneTruth, seed: int, index: int):
    """Micelle of particle ``index``: depends only on (seed, index), not on batching."""
    return truth.micelle.sample(truth.belt, np.random.default_rng([seed, _MICELLE_STREAM, index]))


# --------------------------------------------------------------------------- maps for refinement

def initial_reference(truth_protein, pixel_size_A: float, lowpass_A: float = 30.0, edge_shells: float = 2.0):
    """Low-pass a map to ``lowpass_A`` with a raised-cosine edge ``edge_shells`` wide (ending at
    1/lowpass_A), as a refinement start. (N, N, N) → (N, N, N) float32 on the input's device."""
    xp = get_array_module(truth_protein)
    n = truth_protein.shape[0]
    cutoff = n * pixel_size_A / lowpass_A  # shells
    radius = half_volume_radius(n, xp)
    t = xp.clip((radius - (cutoff - edge_shells)) / edge_shells, 0, 1)
    profile = 0.5 * (1 + xp.cos(np.pi * t))
    return ift3_centered(ft3_centered(truth_protein.astype(xp.float64)) * profile, n).astype(xp.float32)


def core_mask(core_map, volume_A3: float, pixel_size_A: float, dilation_A: float = 3.0, edge_A: float = 6.0):
    """Soft mask of the core: threshold enclosing ``volume_A3`` (its molecular volume), dilated by
    ``dilation_A`` with a cosine edge of ``edge_A`` (:func:`cryocv.masks.threshold_mask`).
    → (mask (N, N, N) float32 in [0, 1], threshold)."""
    values = np.sort(np.asarray(core_map).ravel())[::-1]
    count = int(round(volume_A3 / pixel_size_A ** 3))
    threshold = float(values[min(count, values.size - 1)])
    return threshold_mask(core_map, threshold, dilation_A / pixel_size_A, edge_A / pixel_size_A), threshold


# --------------------------------------------------------------------------- checks

def _rotate_about_point(volume, rotation, point_A, pixel_size_A: float):
    """Real-space ``D'(x) = D(Wᵀ(x − p) + p)`` of a ``[z, y, x]`` map (cubic spline)."""
    n = volume.shape[0]
    flip = np.eye(3)[::-1]                       # (x, y, z) ↔ (z, y, x)
    matrix = flip @ rotation.T @ flip            # index-space Wᵀ
    center = np.full(3, n // 2, dtype=np.float64)
    p = np.asarray(point_A) / pixel_size_A
    offset = center - matrix @ center + flip @ (p - rotation.T @ p)
    return ndimage.affine_transform(volume.astype(np.float64), matrix, offset=offset, order=3, mode="constant")


def check_wobble_formula(volume, hinge_A, pixel_size_A: float, angle_deg: float = 15.0, seed: int = 0) -> dict:
    """Projection of ``volume`` rotated about ``hinge_A`` by a real-space spline rotation vs the
    formula (pose A·W, shift (A(p − Wp))_xy). Returns relative L2 errors of the formula and of
    two wrong variants (no shift, opposite shift) for comparison."""
    rng = np.random.default_rng(seed)
    n = volume.shape[0]
    axis = rng.normal(size=3)
    wobble = rotation_about_axis(axis, np.deg2rad(angle_deg))
    pose = random_rotations(1, rng)
    rotated = _rotate_about_point(volume, wobble, hinge_A, pixel_size_A)
    reference = ift2_centered(project(prepare_volume(rotated.astype(np.float32)), pose.astype(np.float32), n), n)
    poses, shifts = domain_poses(pose, wobble[None, None], np.asarray(hinge_A)[None], pixel_size_A)
    volume_ft = prepare_volume(volume.astype(np.float32))

    def error(shift):
        image = ift2_centered(project(volume_ft, poses[:, 0].astype(np.float32), n,
                                      shifts_px=shift.astype(np.float32)), n)
        return float(np.linalg.norm(image - reference) / np.linalg.norm(reference))

    return {"angle_deg": angle_deg, "shift_px": shifts[0, 0].round(3).tolist(),
            "rel_error_formula": error(shifts[:, 0]), "rel_error_no_shift": error(0 * shifts[:, 0]),
            "rel_error_opposite_shift": error(-shifts[:, 0])}


def check_micelle_projection(truth: MembraneTruth, seed: int = 0) -> dict:
    """Analytic micelle projection vs real-space 3D blobs projected by the projector (random pose
    and origin), plus the position of a single blob placed at +x and +y in the image."""
    rng = np.random.default_rng(seed)
    n, p = truth.box_size, truth.pixel_size_A
    sigma_px = truth.micelle.blob_sigma_A / p
    centers, masses = truth.micelle.sample(truth.belt, rng)
    grid = (np.arange(n) - n // 2).astype(np.float64)
    volume = np.zeros((n, n, n))
    norm = (2 * np.pi * sigma_px ** 2) ** -1.5
    for c, m in zip(centers / p, masses):
        gz, gy, gx = (np.exp(-(grid - c[i]) ** 2 / (2 * sigma_px ** 2)) for i in (2, 1, 0))
        volume += m * norm * gz[:, None, None] * gy[None, :, None] * gx[None, None, :]
    pose = random_rotations(1, rng)
    origin_px = rng.normal(0, 2, size=(1, 2))
    reference = ift2_centered(project(prepare_volume(volume.astype(np.float32)), pose.astype(np.float32), n,
                                      shifts_px=(-origin_px).astype(np.float32)), n)
    xy = (pose[0, :2] @ centers.T).T[None] / p - origin_px[:, None]
    analytic = ift2_centered(micelle_projection_ft(xy, masses[None], n, sigma_px), n)
    one = ift2_centered(micelle_projection_ft(np.array([[[7.0, -4.0]]]), np.ones((1, 1)), n, sigma_px), n)[0]
    peak_yx = np.unravel_index(np.argmax(one), one.shape)
    return {"rel_error_vs_realspace": float(np.linalg.norm(analytic - reference) / np.linalg.norm(reference)),
            "blob_at_x7_y-4_peak_offset_xy": [int(peak_yx[1] - n // 2), int(peak_yx[0] - n // 2)],
            "image_sum_analytic": float(analytic.sum()), "mass_sum": float(masses.sum())}


def check_parts_sum(truth: MembraneTruth, model_path: str, bfactor_A2, oversampling: int, remove_blur: bool) -> dict:
    """Whole-model map vs core + domains (same grid and blur)."""
    structure = load_model(model_path, bfactor_A2)
    center = np.array(truth.info["center_of_mass_A"])
    whole = density_map(structure, truth.box_size, truth.pixel_size_A, center,
                        truth.info["density"]["gemmi_blur_A2"], oversampling, remove_blur)
    diff = np.abs(whole - truth.protein_map).max()
    return {"max_abs_diff_over_max": float(diff / np.abs(whole).max())}


def save_montage(images, path: str, n_cols: int = 4):
    """Tile images (k, N, N) into one PNG (each panel scaled to its own 1–99% range; y up)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    images = np.asarray(images, dtype=np.float64)
    k, n = images.shape[0], images.shape[-1]
    rows = math.ceil(k / n_cols)
    gap = 2
    canvas = np.ones((rows * (n + gap) - gap, n_cols * (n + gap) - gap))
    for i, image in enumerate(images):
        low, high = np.percentile(image, [1, 99])
        tile = np.clip((image - low) / max(high - low, 1e-12), 0, 1)[::-1]  # row 0 = bottom (y up)
        r, c = divmod(i, n_cols)
        canvas[r * (n + gap):r * (n + gap) + n, c * (n + gap):c * (n + gap) + n] = tile
    plt.imsave(path, canvas, cmap="gray", vmin=0, vmax=1)


# --------------------------------------------------------------------------- dataset

def build_dataset(out_dir: str, n: int, box_size: int = DEFAULT_BOX_SIZE, pixel_size_A: float = DEFAULT_PIXEL_SIZE_A,
                  snr: float = 0.05, seed: int = 0, wobble_sigma_deg: float = 6.0, shift_sigma_A: float = 3.0,
                  defocus_range_A=(8000.0, 25000.0), voltage_kV: float = 300.0, with_ctf: bool = True,
                  with_micelle: bool = True, model_path: str = DEFAULT_MODEL, batch_size: int = 512,
                  xp=np, progress: bool = True, checks: bool = False, lowpass_A: float = 30.0,
                  truth_options: dict | None = None) -> dict:
    """Simulate ``n`` particles and write the dataset into ``out_dir``; returns the dataset.json dict.

    ``truth_options`` are passed to :func:`build_truth` (bfactor_A2, domain_last_residue,
    blob counts, …). Poses are Haar-uniform, origins Gaussian (``shift_sigma_A``), CTFs from
    :func:`cryocv.simulate.random_ctf`; ``snr`` = inf gives noise-free images.
    """
    if n <= 0:
        raise ValueError("number of particles must be positive")
    if not snr > 0:
        raise ValueError("SNR must be positive")
    timings = {}
    started = time.perf_counter()
    options = dict(truth_options or {})
    truth = build_truth(model_path, box_size, pixel_size_A, **options)
    timings["truth_maps_s"] = time.perf_counter() - started
    extent = truth.info["extent"]
    if max(extent["protein_max_radius_A"], extent["micelle_max_radius_A"]) > extent["reconstruction_window_radius_A"]:
        print(f"warning: particle radius (protein {extent['protein_max_radius_A']:.1f} Å, micelle "
              f"{extent['micelle_max_radius_A']:.1f} Å) exceeds the reconstruction window "
              f"{extent['reconstruction_window_radius_A']:.1f} Å of box {box_size} at {pixel_size_A} Å",
              file=sys.stderr)

    rng = np.random.default_rng(seed)
    euler = matrix_to_euler(random_rotations(n, rng))
    rotations = euler_to_matrix(euler)
    origin_A = rng.normal(0, shift_sigma_A, size=(n, 2)) if shift_sigma_A > 0 else np.zeros((n, 2))
    ctf = random_ctf(n, rng, defocus_range_A, voltage_kV=voltage_kV) if with_ctf else None
    n_domains = len(truth.domain_chains)
    wobbles, wobble_angles = wobble_rotations(rng, n, n_domains, wobble_sigma_deg)

    renderer = ParticleRenderer(truth, xp, with_micelle)
    images = np.empty((n, box_size, box_size), dtype=np.float32)
    blob_counts = np.zeros(n, dtype=np.int32)
    micelle_mass = np.zeros(n)
    t0 = time.perf_counter()
    bar = tqdm(total=n, desc="membrane particles", unit="particle", disable=not progress)
    for start in range(0, n, batch_size):
        sel = slice(start, min(start + batch_size, n))
        micelles = [particle_micelle(truth, seed, i) for i in range(sel.start, sel.stop)] if with_micelle else None
        if micelles is not None:
            blob_counts[sel] = [len(m) for _, m in micelles]
            micelle_mass[sel] = [m.sum() for _, m in micelles]
        ctf_m = None if ctf is None else ctf.as_matrix()[sel]
        images[sel] = to_numpy(renderer.images(rotations[sel], origin_A[sel], wobbles[sel], micelles, ctf_m))
        bar.update(sel.stop - sel.start)
    bar.close()
    timings["particles_s"] = time.perf_counter() - t0
    signal_var = float(images.var(axis=(1, 2)).mean())
    noise_sigma = math.sqrt(signal_var / snr) if np.isfinite(snr) else 0.0
    if noise_sigma > 0:
        for start in range(0, n, batch_size):
            chunk = images[start:start + batch_size]
            chunk += rng.normal(0, noise_sigma, size=chunk.shape).astype(np.float32)

    t0 = time.perf_counter()
    os.makedirs(out_dir, exist_ok=True)
    stack = os.path.join(out_dir, "particles.mrcs")
    write_stack(stack, images, pixel_size_A)
    particles = Particles(
        stack_paths=np.array([os.path.abspath(stack)] * n, dtype=object), stack_indices=np.arange(n),
        box_size=box_size, pixel_size_A=float(pixel_size_A), euler_deg=euler, origin_A=origin_A, ctf=ctf,
        half_set=random_half_sets(n, seed), optics_group=np.ones(n, dtype=int), source=stack)
    save_particles(particles, os.path.join(out_dir, "particles.star"))

    protein = truth.protein_map
    micelle_mean = truth.micelle_mean_map()
    core_volume_A3 = (truth.info["micelle"]["protein_volume_A3"] * truth.info["core"]["n_atoms"]
                      / truth.info["n_atoms"])
    mask, mask_threshold = core_mask(truth.core_map, core_volume_A3, pixel_size_A)
    maps = {"truth_protein.mrc": protein, "truth_core.mrc": truth.core_map, "core_mask.mrc": mask,
            "micelle_mean.mrc": micelle_mean, "truth_protein_mean_micelle.mrc": protein + micelle_mean,
            "initial_reference.mrc": initial_reference(protein, pixel_size_A, lowpass_A)}
    for name, volume in maps.items():
        write_map(os.path.join(out_dir, name), volume, pixel_size_A)
    np.savez_compressed(os.path.join(out_dir, "truth_particles.npz"), wobble_rotations=wobbles.astype(np.float32),
                        wobble_angles_deg=wobble_angles.astype(np.float32), domain_chains=np.array(truth.domain_chains),
                        micelle_blob_counts=blob_counts, micelle_mass_voxel_sum=micelle_mass)
    timings["write_s"] = time.perf_counter() - t0
    domain_sum = truth.domain_maps.sum(axis=0)
    in_belt = micelle_mean > 0.5 * truth.info["micelle"]["mean_density_voxel"]

    dataset = {
        "description": "TRPV1 (3j5p): rigid core + 4 wobbling ankyrin-repeat domains + per-particle micelle",
        "conventions": "maps [z,y,x], origin at index N//2 = model centre of mass; positions (x,y,z) Å relative "
                       "to it; RELION poses A (euler rot/tilt/psi), origins rlnOriginX/YAngst; image of a point c "
                       "at (A c)_xy; domain d in particle i is rotated by wobble_rotations[i,d] about its hinge",
        "n": n, "box_size": box_size, "pixel_size_A": pixel_size_A, "snr": snr, "seed": seed,
        "noise_sigma": noise_sigma, "signal_variance": signal_var,
        "wobble_sigma_deg": wobble_sigma_deg, "shift_sigma_A": shift_sigma_A,
        "ctf": None if not with_ctf else {"defocus_range_A": list(defocus_range_A), "voltage_kV": voltage_kV,
                                          "cs_mm": 2.7, "amplitude_contrast": 0.1, "astigmatism_A": 400.0},
        "with_micelle": with_micelle, "batch_size": batch_size, "device": "gpu" if xp is not np else "cpu",
        "micelle_stream": f"np.random.default_rng([seed, {_MICELLE_STREAM}, particle_index])",
        "truth": truth.info,
        "core_mask": {"threshold": mask_threshold, "volume_A3_target": core_volume_A3, "dilation_A": 3.0,
                      "edge_A": 6.0, "domain_density_inside_fraction":
                          float((domain_sum * mask).sum() / domain_sum.sum())},
        "micelle_realised": {"blob_count_mean": float(blob_counts.mean()) if with_micelle else 0.0,
                             "mass_mean_voxel_sum": float(micelle_mass.mean()) if with_micelle else 0.0,
                             "mass_fraction_of_protein": float(micelle_mass.mean() / protein.sum())
                             if with_micelle else 0.0,
                             "mean_map_core_value_over_protein_density":
                                 float(micelle_mean[in_belt].mean() / truth.info["micelle"]["protein_mean_density_voxel"])
                                 if in_belt.any() else 0.0},
        "initial_reference_lowpass_A": lowpass_A,
        "files": {"particles": "particles.star", "stack": "particles.mrcs", **{k[:-4]: k for k in maps},
                  "per_particle_truth": "truth_particles.npz"},
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
    }
    if checks:
        t0 = time.perf_counter()
        options.setdefault("bfactor_A2", 50.0)
        dataset["checks"] = {
            "wobble_formula": check_wobble_formula(truth.domain_maps[0], truth.hinges_A[0], pixel_size_A),
            "micelle_projection": check_micelle_projection(truth, seed),
            "parts_sum": check_parts_sum(truth, model_path, options["bfactor_A2"], options.get("oversampling", 2),
                                         options.get("remove_blur", True)),
        }
        dataset["timings_s"]["checks_s"] = round(time.perf_counter() - t0, 3)
    dataset["timings_s"]["total_s"] = round(time.perf_counter() - started, 3)
    with open(os.path.join(out_dir, "dataset.json"), "w") as handle:
        json.dump(dataset, handle, indent=2)
    return dataset


# --------------------------------------------------------------------------- CLI

def _bfactor(text: str):
    return None if text == "model" else float(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Simulate a membrane-protein benchmark dataset (TRPV1 with wobbling "
                                            "ankyrin domains in a disordered micelle).")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--n", type=int, required=True, help="number of particles")
    p.add_argument("--box-size", type=int, default=DEFAULT_BOX_SIZE, help=f"box (default {DEFAULT_BOX_SIZE})")
    p.add_argument("--pixel-size-A", type=float, default=DEFAULT_PIXEL_SIZE_A,
                   help=f"pixel size in Å (default {DEFAULT_PIXEL_SIZE_A})")
    p.add_argument("--snr", type=float, default=0.05, help="signal-to-noise variance ratio; inf = noise-free "
                                                           "(default 0.05)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--wobble-sigma-deg", type=float, default=6.0, help="domain wobble angle std (default 6)")
    p.add_argument("--shift-sigma-A", type=float, default=3.0, help="origin std in Å (default 3)")
    p.add_argument("--defocus-min-A", type=float, default=8000.0, help="smallest mean defocus (default 8000)")
    p.add_argument("--defocus-max-A", type=float, default=25000.0, help="largest mean defocus (default 25000)")
    p.add_argument("--voltage-kV", type=float, default=300.0, help="acceleration voltage (default 300)")
    p.add_argument("--no-ctf", action="store_true", help="no CTF (and none in the STAR file)")
    p.add_argument("--no-micelle", action="store_true", help="protein only")
    p.add_argument("--model", default=DEFAULT_MODEL, help="PDB/mmCIF model (default: 3j5p TRPV1)")
    p.add_argument("--bfactor-A2", type=_bfactor, default=50.0,
                   help="B-factor given to every atom, or 'model' to keep the file's (default 50)")
    p.add_argument("--domain-last-residue", type=int, default=DEFAULT_DOMAIN_LAST_RESIDUE,
                   help=f"last residue of each wobbling domain; its CA is the hinge (default "
                        f"{DEFAULT_DOMAIN_LAST_RESIDUE})")
    p.add_argument("--blobs-min", type=int, default=150, help="fewest micelle blobs per particle (default 150)")
    p.add_argument("--blobs-max", type=int, default=300, help="most micelle blobs per particle (default 300)")
    p.add_argument("--blob-sigma-A", type=float, default=5.0, help="blob Gaussian width in Å (default 5)")
    p.add_argument("--micelle-density-fraction", type=float, default=0.35,
                   help="mean micelle density / mean protein density (default 0.35)")
    p.add_argument("--belt-width-A", type=float, default=15.0,
                   help="micelle reach beyond the outermost TM atom at mid-slab (default 15 Å)")
    p.add_argument("--keep-gemmi-blur", action="store_true",
                   help="leave gemmi's Refmac blur in the maps (as cryocv.models.map_from_model does)")
    p.add_argument("--lowpass-A", type=float, default=30.0, help="initial reference low-pass (default 30 Å)")
    p.add_argument("--batch-size", type=int, default=512, help="particles per batch (default 512)")
    p.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto",
                   help="where to compute (default: GPU when CuPy sees one)")
    p.add_argument("--montage", help="also write a PNG of the first 16 images")
    p.add_argument("--check", action="store_true", help="run the numerical self-checks (results in dataset.json)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.n <= 0 or args.batch_size <= 0 or args.box_size < 16:
        parser.error("--n and --batch-size must be positive and --box-size at least 16")
    if not (args.snr > 0 and args.pixel_size_A > 0 and 0 < args.defocus_min_A <= args.defocus_max_A):
        parser.error("--snr and --pixel-size-A must be positive and 0 < --defocus-min-A <= --defocus-max-A")
    if not 1 <= args.blobs_min <= args.blobs_max:
        parser.error("need 1 <= --blobs-min <= --blobs-max")
    xp = resolve_xp(args.device)
    truth_options = {"bfactor_A2": args.bfactor_A2, "domain_last_residue": args.domain_last_residue,
                     "blobs_min": args.blobs_min, "blobs_max": args.blobs_max, "blob_sigma_A": args.blob_sigma_A,
                     "micelle_density_fraction": args.micelle_density_fraction, "belt_width_A": args.belt_width_A,
                     "remove_blur": not args.keep_gemmi_blur}
    dataset = build_dataset(args.out, args.n, args.box_size, args.pixel_size_A, snr=args.snr, seed=args.seed,
                            wobble_sigma_deg=args.wobble_sigma_deg, shift_sigma_A=args.shift_sigma_A,
                            defocus_range_A=(args.defocus_min_A, args.defocus_max_A), voltage_kV=args.voltage_kV,
                            with_ctf=not args.no_ctf, with_micelle=not args.no_micelle, model_path=args.model,
                            batch_size=args.batch_size, xp=xp, progress=not args.quiet, checks=args.check,
                            lowpass_A=args.lowpass_A, truth_options=truth_options)
    if args.montage:
        from cryocv.io.mrc import StackCache
        cache = StackCache()
        save_montage(np.asarray(cache.stack(os.path.join(args.out, "particles.mrcs"))[:16]), args.montage)
        cache.close()
    extent = dataset["truth"]["extent"]
    print(f"wrote {args.n} particles to {args.out}/particles.star ({dataset['device']}, "
          f"{dataset['timings_s']['total_s']:.1f} s); particle radius: protein {extent['protein_max_radius_A']:.1f} Å, "
          f"micelle {extent['micelle_max_radius_A']:.1f} Å, window {extent['reconstruction_window_radius_A']:.1f} Å")
    if "checks" in dataset:
        print(json.dumps(dataset["checks"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
