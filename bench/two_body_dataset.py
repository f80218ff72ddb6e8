"""Benchmark dataset for local refinement: a rigid body plus one domain that rotates about a hinge.

From an atomic model (default TRPV1, 3j5p) a compact peripheral **domain** of a requested mass is
split off (:func:`select_domain`); the rest is the **body**. Each particle has its own global pose
``A`` (Haar-uniform), origin ``o`` (Å), CTF (:func:`cryocv.simulate.random_ctf`) and domain motion:
a rotation ``W`` about the **hinge** ``h`` (uniform axis, angle ~ N(0, ``hinge_sigma_deg``)) and an
optional translation ``t`` (~ N(0, ``hinge_shift_sigma_A``) per axis): domain atoms ``x -> W(x - h) + h + t``.

Conventions (README "Conventions"): maps ``[z, y, x]``, index ``N//2`` = the whole model's centre of
mass; points ``(x, y, z)`` Å from it; a map point ``c`` is imaged at ``(A c)_xy - o``. The moved
domain ``D'(x) = D(Wᵀ(x - h - t) + h)`` projects at ``A`` as the rest-state domain ``D`` at pose
``A·W`` with RELION origin ``o_d = o - (A (h - W h + t))_xy`` (:func:`brute_force_check` compares
with a real-space rotation), so the plain projector renders each particle (white noise of variance
``mean per-image signal variance / snr``, as :mod:`cryocv.simulate`)::

    image = IFT( CTF · [ shift_{-o} P_A(body) + shift_{-o_d} P_{A·W}(domain) ] ) + noise

``python bench/two_body_dataset.py --out DIR --n 2000 --domain-kDa 50 [--hinge-sigma-deg 7]`` writes
``particles.star``/``.mrcs`` (global poses ``A``, origins ``o``, CTF, half-sets),
``particles_domain.star`` (same images, the domain's true poses ``A·W`` and origins ``o_d``),
``map_full.mrc``, ``map_body.mrc``, ``map_domain.mrc`` (rest state, one frame), ``mask_domain.mrc``
(soft keep mask around the domain at rest), ``mask_body.mrc``, ``truth.npz`` and ``dataset.json``.
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
from scipy.spatial import cKDTree

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(1, os.path.dirname(HERE))

from cryocv.backend import resolve_xp, to_device, to_numpy  # noqa: E402
from cryocv.ctf import ctf_half_plane  # noqa: E402
from cryocv.fsc import fsc_curve, resolution_at  # noqa: E402
from cryocv.geometry import (angular_distance_deg, axis_angle_to_matrix, euler_to_matrix,  # noqa: E402
                             matrix_to_euler, random_rotations)
from cryocv.io.mrc import write_map, write_stack  # noqa: E402
from cryocv.io.particle_files import save_particles  # noqa: E402
from cryocv.particles import Particles, random_half_sets  # noqa: E402
from cryocv.projector import prepare_volume  # noqa: E402
from cryocv.simulate import DEFAULT_DEFOCUS_RANGE_A, clean_projections, random_ctf  # noqa: E402
from membrane_dataset import core_mask, density_map, load_model, refmac_blur_A2, select_residues  # noqa: E402

SHARED_DATA = os.environ.get("CRYOCV_SHARED_DATA", os.path.join(HERE, os.pardir, os.pardir, "shared", "data"))
DEFAULT_MODEL = os.path.abspath(os.path.join(SHARED_DATA, "models", "3j5p_trpv1_c4.pdb"))
PROTEIN_A3_PER_DALTON = 1.21
CONTACT_A = 4.5


def residue_table(structure):
    """Residues of model 0 in file order → (keys [(chain, number)], chain index (R,), mass Da (R,),
    mass-weighted centroid (R, 3) Å, model frame)."""
    rows = [((ch.name, res.seqid.num), c, np.array([a.element.weight for a in res]),
             np.array([a.pos.tolist() for a in res])) for c, ch in enumerate(structure[0]) for res in ch]
    return ([r[0] for r in rows], np.array([r[1] for r in rows]), np.array([w.sum() for _, _, w, _ in rows]),
            np.array([w @ xyz / w.sum() for _, _, w, xyz in rows]))


def _runs(values):
    """(start, stop, value) of each run of equal values in a 1D bool array."""
    edges = np.flatnonzero(np.diff(values.astype(np.int8))) + 1
    starts = np.r_[0, edges]
    return list(zip(starts, np.r_[edges, values.size], values[starts]))


def smooth_along_chains(selected, chain_idx, max_gap: int = 4, min_segment: int = 5):
    """Fill unselected gaps of <= ``max_gap`` residues between selected ones of a chain, then drop
    selected segments shorter than ``min_segment`` residues (fewer fragments)."""
    out = selected.copy()
    for c in np.unique(chain_idx):
        s = out[chain_idx == c]
        for a, b, value in _runs(s):
            if not value and 0 < a and b < s.size and b - a <= max_gap:
                s[a:b] = True
        for a, b, value in _runs(s):
            if value and b - a < min_segment:
                s[a:b] = False
        out[chain_idx == c] = s
    return out


def select_domain(structure, domain_kDa: float, max_gap: int = 4, min_segment: int = 5) -> dict:
    """A compact peripheral domain of ~``domain_kDa`` (modelled atoms' mass), chosen geometrically.

    Seed: the residue whose centroid is farthest from the model's centre of mass. Centre: one sphere
    radius ``r = (3 V / 4π)^(1/3)`` (``V`` = 1.21 Å³/Da × mass) inward from the seed along the radius.
    Residues are taken by distance from that centre (ties: file order) and smoothed along the chains
    (:func:`smooth_along_chains`); the count taken is the one whose smoothed mass is nearest the target
    (bisection). Returns ``selected`` (R,) bool, ``keys``, seed, centre and segments (``"A:199-355"``)."""
    keys, chain_idx, mass, centroid = residue_table(structure)
    target = domain_kDa * 1000.0
    com = mass @ centroid / mass.sum()
    dist = np.linalg.norm(centroid - com, axis=1)
    seed = int(np.argmax(dist))
    radius = (3 * target * PROTEIN_A3_PER_DALTON / (4 * np.pi)) ** (1 / 3)
    centre = centroid[seed] - radius * (centroid[seed] - com) / dist[seed]
    order = np.argsort(np.linalg.norm(centroid - centre, axis=1), kind="stable")

    def take(k):
        sel = smooth_along_chains(np.isin(np.arange(len(keys)), order[:k]), chain_idx, max_gap, min_segment)
        return sel, float(mass[sel].sum())
    low, high = 1, len(keys) - 1
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if take(mid)[1] < target else (low, mid)
    selected = min((take(k) for k in (low, high)), key=lambda c: abs(c[1] - target))[0]
    segments = [f"{keys[idx[a]][0]}:{keys[idx[a]][1]}-{keys[idx[b - 1]][1]}"
                for idx in (np.flatnonzero(chain_idx == c) for c in np.unique(chain_idx))
                for a, b, value in _runs(selected[idx]) if value]
    return {"selected": selected, "keys": keys, "seed_residue": "{}:{}".format(*keys[seed]),
            "seed_distance_A": float(dist[seed]), "centre_model_A": centre.tolist(), "sphere_radius_A": radius,
            "segments": segments, "method": "residues nearest a centre one sphere radius inward from the residue "
            f"farthest from the centre of mass; gaps <= {max_gap} filled, segments < {min_segment} dropped"}


def atoms_of(structure):
    """(xyz (n, 3) Å, element mass (n,) Da) of model 0's atoms."""
    atoms = [a for ch in structure[0] for res in ch for a in res]
    return np.array([a.pos.tolist() for a in atoms]), np.array([a.element.weight for a in atoms])


def hinge_point(domain_xyz, body_xyz, body_com, contact_A: float = CONTACT_A):
    """Centroid of the domain atoms within ``contact_A`` of a body atom (the interface), and their
    count; without contacts, the domain atom nearest the body's centre of mass."""
    near = cKDTree(body_xyz).query(domain_xyz, distance_upper_bound=contact_A)[0] < contact_A
    if near.any():
        return domain_xyz[near].mean(axis=0), int(near.sum())
    return domain_xyz[np.argmin(np.linalg.norm(domain_xyz - body_com, axis=1))], 0


def fit_pixel_size(radius_A: float, box_size: int, margin_A: float = 12.0) -> float:
    """Smallest pixel (multiple of 0.05 Å) whose reconstruction window ((N/2 − 3) px) holds radius + margin."""
    return round(math.ceil((radius_A + margin_A) / (box_size / 2 - 3) / 0.05 - 1e-9) * 0.05, 4)


@dataclass
class TwoBodyTruth:
    """Rest-state maps (N, N, N) float32 ``[z, y, x]`` on one grid, hinge (x, y, z) Å from the box centre."""
    box_size: int
    pixel_size_A: float
    body_map: np.ndarray
    domain_map: np.ndarray
    hinge_A: np.ndarray
    info: dict  # JSON-ready description


def build_truth(model_path: str = DEFAULT_MODEL, domain_kDa: float = 50.0, box_size: int = 128,
                pixel_size_A: float | None = None, bfactor_A2: float | None = 50.0,
                oversampling: int = 2) -> TwoBodyTruth:
    """Split the model; both parts on one grid centred on the whole model's centre of mass
    (:func:`membrane_dataset.density_map`, gemmi blur removed, so body + domain = full map)."""
    structure = load_model(model_path, bfactor_A2)
    choice = select_domain(structure, domain_kDa)
    in_domain = {k for k, s in zip(choice["keys"], choice["selected"]) if s}
    domain = select_residues(structure, lambda c, r: (c, r) in in_domain)
    body = select_residues(structure, lambda c, r: (c, r) not in in_domain)
    (xyz, w), (dxyz, dw), (bxyz, bw) = atoms_of(structure), atoms_of(domain), atoms_of(body)
    com = w @ xyz / w.sum()
    radius = float(np.linalg.norm(xyz - com, axis=1).max())
    pixel_size_A = pixel_size_A or fit_pixel_size(radius, box_size)
    blur = refmac_blur_A2(structure, pixel_size_A, oversampling)
    maps = [density_map(s, box_size, pixel_size_A, com, blur, oversampling) for s in (body, domain)]
    hinge, n_contact = hinge_point(dxyz, bxyz, bw @ bxyz / bw.sum())
    hinge_A = hinge - com
    info = {"model": os.path.abspath(model_path), "center_of_mass_A": com.tolist(),
            "mass_kDa": {"full": w.sum() / 1e3, "body": bw.sum() / 1e3, "domain": dw.sum() / 1e3,
                         "domain_requested": domain_kDa, "note": "element masses of the modelled atoms"},
            "n_atoms": {"body": len(bw), "domain": len(dw)}, "n_residues_domain": len(in_domain),
            "selection": {k: v for k, v in choice.items() if k not in ("selected", "keys")},
            "hinge": {"definition": f"centroid of the {n_contact} domain atoms within {CONTACT_A} Å of a body atom",
                      "A_xyz_from_box_centre": hinge_A.round(3).tolist(),
                      "voxel_zyx": (box_size // 2 + hinge_A[::-1] / pixel_size_A).round(3).tolist()},
            "domain_centroid_A_xyz": (dw @ dxyz / dw.sum() - com).round(3).tolist(), "particle_radius_A": radius,
            "reconstruction_window_radius_A": (box_size / 2 - 3) * pixel_size_A, "bfactor_A2": bfactor_A2,
            "density": {"oversampling": oversampling, "gemmi_blur_A2_removed": blur}}
    return TwoBodyTruth(box_size, float(pixel_size_A), maps[0], maps[1], hinge_A, info)


def domain_motions(rng, n: int, sigma_deg: float, shift_sigma_A: float = 0.0):
    """Per particle: rotations ``W`` (n, 3, 3) about uniform axes by angles (n,) ~ N(0, sigma) degrees,
    translations (n, 3) Å ~ N(0, shift_sigma_A). The same random numbers are drawn whatever the
    sigmas, so datasets that differ only in them share poses, CTFs and noise."""
    axes = rng.normal(size=(n, 3))
    angles = rng.normal(size=n) * sigma_deg
    translations = rng.normal(size=(n, 3)) * shift_sigma_A
    axes *= np.deg2rad(angles)[:, None] / np.linalg.norm(axes, axis=1, keepdims=True)
    return axis_angle_to_matrix(axes), angles, translations


def domain_poses(rotations, origin_A, domain_rotations, translations_A, hinge_A):
    """Pose and origin of the rest-state domain that render the moved one: (``A·W`` (n, 3, 3),
    RELION origins ``o_d = o − (A (h − W h + t))_xy`` (n, 2) Å)."""
    a, w = np.asarray(rotations, dtype=np.float64), np.asarray(domain_rotations, dtype=np.float64)
    lever = hinge_A[None] - w @ hinge_A + translations_A           # h − W h + t, (n, 3)
    return a @ w, np.asarray(origin_A) - np.einsum("nij,nj->ni", a[:, :2], lever)


def render(body_ft, domain_ft, rotations, origin_A, poses, origin_domain_A, ctf_matrix, box_size: int,
           pixel_size_A: float, xp=np):
    """Noise-free images (B, N, N) float32 (numpy): body at (A, o) + domain at (A·W, o_d) (no domain
    if ``domain_ft`` is None), times the CTF of ``ctf_matrix`` (B, 9) unless None."""
    dev = lambda a: to_device(np.ascontiguousarray(a, dtype=np.float32), xp)  # noqa: E731
    ctf = None if ctf_matrix is None else ctf_half_plane(to_device(ctf_matrix, xp), box_size, pixel_size_A)
    images = clean_projections(body_ft, dev(rotations), dev(np.asarray(origin_A) / pixel_size_A), ctf, box_size)
    if domain_ft is not None:
        images += clean_projections(domain_ft, dev(poses), dev(np.asarray(origin_domain_A) / pixel_size_A), ctf,
                                    box_size)
    return to_numpy(images).astype(np.float32)


def rotate_map_about_point(volume, rotation, point_A, pixel_size_A: float, translation_A=(0.0, 0.0, 0.0),
                           order: int = 3):
    """Real-space ``V'(x) = V(Wᵀ(x − h − t) + h)`` of a ``[z, y, x]`` map (spline of ``order``; cubic)."""
    n = volume.shape[0]
    flip = np.eye(3)[::-1]                                   # (x, y, z) <-> (z, y, x)
    matrix = flip @ rotation.T @ flip
    c = np.full(3, n // 2, dtype=np.float64)
    h = np.asarray(point_A) / pixel_size_A
    offset = c - matrix @ c + flip @ (h - rotation.T @ (h + np.asarray(translation_A) / pixel_size_A))
    return ndimage.affine_transform(volume.astype(np.float64), matrix, offset=offset, order=order, mode="constant")


def brute_force_check(truth: TwoBodyTruth, rotations, origin_A, domain_rotations, translations_A) -> dict:
    """Per particle, the correlation of the Fourier-slice rendering (no CTF) with the projection at
    ``A`` of the domain map moved in real space (:func:`rotate_map_about_point`): domain alone, and
    body + domain as one map; ``corr_domain_no_hinge_shift`` (pose A·W, origin o) for contrast."""
    n, p = truth.box_size, truth.pixel_size_A
    poses, o_d = domain_poses(rotations, origin_A, domain_rotations, translations_A, truth.hinge_A)
    body_ft, domain_ft = prepare_volume(truth.body_map), prepare_volume(truth.domain_map)
    corr = lambda a, b: round(float(np.corrcoef(a.ravel(), b.ravel())[0, 1]), 6)  # noqa: E731
    out = {"corr_domain": [], "corr_composite": [], "corr_domain_no_hinge_shift": []}
    for i in range(len(rotations)):
        moved = rotate_map_about_point(truth.domain_map, domain_rotations[i], truth.hinge_A, p, translations_A[i])
        one = lambda v, r, o: render(v, None, r[i:i + 1], o[i:i + 1], None, None, None, n, p)  # noqa: E731
        brute = one(prepare_volume(moved.astype(np.float32)), rotations, origin_A)
        out["corr_domain"].append(corr(brute, one(domain_ft, poses, o_d)))
        out["corr_domain_no_hinge_shift"].append(corr(brute, one(domain_ft, poses, origin_A)))
        composite = render(body_ft, domain_ft, *(a[i:i + 1] for a in (rotations, origin_A, poses, o_d)), None, n, p)
        brute = one(prepare_volume((truth.body_map + moved).astype(np.float32)), rotations, origin_A)
        out["corr_composite"].append(corr(brute, composite))
    return out


def build_dataset(out_dir: str, n: int, model_path: str = DEFAULT_MODEL, domain_kDa: float = 50.0,
                  box_size: int = 128, pixel_size_A: float | None = None, hinge_sigma_deg: float = 7.0,
                  hinge_shift_sigma_A: float = 0.0, snr: float = 0.1, seed: int = 0, shift_sigma_A: float = 3.0,
                  defocus_range_A=DEFAULT_DEFOCUS_RANGE_A, with_ctf: bool = True, bfactor_A2: float | None = 50.0,
                  mask_dilation_A: float = 4.0, mask_edge_A: float = 8.0, n_checks: int = 3, batch_size: int = 500,
                  xp=np) -> dict:
    """Simulate ``n`` particles into ``out_dir`` (files in the module docstring); returns dataset.json."""
    if n <= 0 or not snr > 0:
        raise ValueError("need n > 0 and snr > 0 (inf: noise-free)")
    started = time.perf_counter()
    truth = build_truth(model_path, domain_kDa, box_size, pixel_size_A, bfactor_A2)
    times = {"truth_maps_s": time.perf_counter() - started}
    p = truth.pixel_size_A
    rng = np.random.default_rng(seed)
    euler = matrix_to_euler(random_rotations(n, rng))
    rotations = euler_to_matrix(euler)                          # as the STAR file's angles give them
    origin_A = rng.normal(0, 1, size=(n, 2)) * shift_sigma_A
    ctf = random_ctf(n, rng, defocus_range_A)                   # drawn with or without CTF: same stream
    w, angles, translations = domain_motions(rng, n, hinge_sigma_deg, hinge_shift_sigma_A)
    poses, origin_domain = domain_poses(rotations, origin_A, w, translations, truth.hinge_A)
    t0 = time.perf_counter()
    body_ft, domain_ft = (prepare_volume(to_device(m, xp)) for m in (truth.body_map, truth.domain_map))
    ctf_matrix = ctf.as_matrix() if with_ctf else None
    images = np.concatenate([render(body_ft, domain_ft, rotations[sl], origin_A[sl], poses[sl], origin_domain[sl],
                                    None if ctf_matrix is None else ctf_matrix[sl], box_size, p, xp)
                             for sl in (slice(s, s + batch_size) for s in range(0, n, batch_size))])
    times["particles_s"] = time.perf_counter() - t0
    signal_var = float(images.var(axis=(1, 2)).mean())
    noise_sigma = math.sqrt(signal_var / snr) if np.isfinite(snr) else 0.0
    for s in range(0, n, batch_size):
        images[s:s + batch_size] += (rng.normal(size=images[s:s + batch_size].shape) * noise_sigma).astype(np.float32)
    os.makedirs(out_dir, exist_ok=True)
    stack = os.path.abspath(os.path.join(out_dir, "particles.mrcs"))
    write_stack(stack, images, p)
    particles = Particles(stack_paths=np.array([stack] * n, dtype=object), stack_indices=np.arange(n),
                          box_size=box_size, pixel_size_A=p, euler_deg=euler, origin_A=origin_A,
                          ctf=ctf if with_ctf else None, half_set=random_half_sets(n, seed),
                          optics_group=np.ones(n, dtype=int), source=stack)
    save_particles(particles, os.path.join(out_dir, "particles.star"))
    domain_euler = matrix_to_euler(poses)
    save_particles(replace(particles, euler_deg=domain_euler, origin_A=origin_domain),
                   os.path.join(out_dir, "particles_domain.star"))
    (mask_domain, thr_d), (mask_body, thr_b) = (     # threshold enclosing the molecular volume
        core_mask(m, truth.info["mass_kDa"][k] * 1e3 * PROTEIN_A3_PER_DALTON, p, mask_dilation_A, mask_edge_A)
        for m, k in ((truth.domain_map, "domain"), (truth.body_map, "body")))
    maps = {"map_full.mrc": truth.body_map + truth.domain_map, "map_body.mrc": truth.body_map,
            "map_domain.mrc": truth.domain_map, "mask_domain.mrc": mask_domain, "mask_body.mrc": mask_body}
    for name, volume in maps.items():
        write_map(os.path.join(out_dir, name), volume, p)
    np.savez_compressed(os.path.join(out_dir, "truth.npz"), rotations=rotations, euler_deg=euler, origin_A=origin_A,
                        domain_rotations=w, domain_angles_deg=angles, domain_translations_A=translations,
                        domain_poses=poses, domain_euler_deg=domain_euler, domain_origin_A=origin_domain,
                        hinge_A=truth.hinge_A, half_set=particles.half_set, pixel_size_A=p)
    dataset = {"n": n, "box_size": box_size, "pixel_size_A": p, "nyquist_A": 2 * p, "snr": snr, "seed": seed,
               "hinge_sigma_deg": hinge_sigma_deg, "hinge_shift_sigma_A": hinge_shift_sigma_A,
               "shift_sigma_A": shift_sigma_A, "signal_variance": signal_var, "noise_sigma": noise_sigma,
               "ctf": {"defocus_range_A": list(defocus_range_A), "voltage_kV": 300.0, "cs_mm": 2.7,
                       "amplitude_contrast": 0.1} if with_ctf else None,
               "domain_angle_abs_deg": {"median": float(np.median(np.abs(angles))),
                                        "p90": float(np.percentile(np.abs(angles), 90))},
               "half_sets": {h: int((particles.half_set == int(h)).sum()) for h in ("1", "2")}, **truth.info,
               "masks": {"threshold_domain": thr_d, "threshold_body": thr_b, "dilation_A": mask_dilation_A,
                         "edge_A": mask_edge_A, "threshold_encloses": "molecular volume (1.21 Å³/Da)"},
               "files": {"particles": "particles.star", "particles_domain_truth": "particles_domain.star",
                         "stack": "particles.mrcs", **{k[:-4]: k for k in maps}, "per_particle": "truth.npz"}}
    if n_checks:
        t0, k = time.perf_counter(), min(n_checks, n)
        dataset["brute_force_check"] = brute_force_check(truth, rotations[:k], origin_A[:k], w[:k], translations[:k])
        times["check_s"] = time.perf_counter() - t0
    times["total_s"] = time.perf_counter() - started
    dataset["timings_s"] = {k: round(v, 2) for k, v in times.items()}
    with open(os.path.join(out_dir, "dataset.json"), "w") as handle:
        json.dump(dataset, handle, indent=2, default=float)
    return dataset


def load_truth(path: str) -> dict:
    """``truth.npz`` (or the dataset folder holding it) → dict of arrays."""
    with np.load(os.path.join(path, "truth.npz") if os.path.isdir(path) else path) as data:
        return dict(data)


def domain_pose_error_deg(est_rotations, truth, index=None) -> np.ndarray:
    """Angle (n,) between estimated domain poses and the truth ``A·W``.

    What a local refinement of the domain estimates: particle ``i``'s domain image is the rest-state
    domain map projected at pose ``A·W`` with RELION origin ``o_d = o − (A (h − W h + t))_xy``
    (``truth["domain_poses"]``, ``truth["domain_origin_A"]``). Refining with the rest-state map as
    reference and a mask around the domain, from the global pose ``A`` and origin ``o``, a rotation
    ``ΔR`` about a fulcrum ``f`` gives pose ``A·ΔR`` and origin ``o − (A (f − ΔR f))_xy`` (the
    fulcrum's image stays put); with ``f = h`` (and ``t = 0``) the truth is ``ΔR = W`` exactly, with
    another fulcrum the same pose ``A·W`` needs a different shift. The angle returned is the geodesic
    ``∠(B_est, A·W)`` = ``∠(ΔR_est, W)``; doing nothing (``B = A``) scores ``|angle of W|``
    (``truth["domain_angles_deg"]``). ``est_rotations``: (n, 3, 3) matrices or (n, 3) RELION Euler
    angles (degrees); ``truth``: :func:`load_truth`'s dict or a path; ``index`` selects particles."""
    truth = load_truth(truth) if isinstance(truth, str) else truth
    est = np.asarray(est_rotations, dtype=np.float64)
    est = euler_to_matrix(est) if est.ndim == 2 and est.shape[-1] == 3 else est
    return angular_distance_deg(est, truth["domain_poses"] if index is None else truth["domain_poses"][index])


def domain_origin_error_A(est_origin_A, truth, index=None) -> np.ndarray:
    """|o_est − o_d| (n,) Å against the domain's true RELION origins (see :func:`domain_pose_error_deg`)."""
    truth = load_truth(truth) if isinstance(truth, str) else truth
    true = truth["domain_origin_A"] if index is None else truth["domain_origin_A"][index]
    return np.linalg.norm(np.asarray(est_origin_A) - true, axis=1)


def masked_fsc_resolution(volume, truth_map, mask, pixel_size_A: float, threshold: float = 0.5) -> float:
    """Resolution (Å) where the FSC of ``volume`` and ``truth_map``, both times ``mask``, first drops
    below ``threshold`` (:func:`cryocv.fsc.fsc_curve`, :func:`cryocv.fsc.resolution_at`)."""
    return resolution_at(fsc_curve(volume, truth_map, mask), threshold, volume.shape[0], pixel_size_A)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--model", dest="model_path", default=DEFAULT_MODEL, help="PDB/mmCIF model (default TRPV1 3j5p)")
    for flag, kind, default, text in (
            ("--n", int, 2000, "particles"), ("--domain-kDa", float, 50.0, "domain mass to approach"),
            ("--box-size", int, 128, "box"), ("--pixel-size-A", float, None, "pixel (None: the smallest multiple "
                                              "of 0.05 Å fitting the particle + 12 Å in the reconstruction window)"),
            ("--hinge-sigma-deg", float, 7.0, "std of the domain's rotation angle"),
            ("--hinge-shift-sigma-A", float, 0.0, "std of the domain's translation per axis"),
            ("--snr", float, 0.1, "signal/noise variance, inf = noise-free"), ("--seed", int, 0, "random seed"),
            ("--shift-sigma-A", float, 3.0, "std of the particle origins"),
            ("--bfactor-A2", float, 50.0, "B-factor of every atom"),
            ("--mask-dilation-A", float, 4.0, "mask dilation"), ("--mask-edge-A", float, 8.0, "mask soft edge"),
            ("--n-checks", int, 3, "particles checked against a real-space rotation of the domain")):
        p.add_argument(flag, type=kind, default=default, help=f"{text} (default {default})")
    p.add_argument("--no-ctf", action="store_true")
    p.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto")
    return p


def main(argv=None) -> int:
    args = vars(build_parser().parse_args(argv))
    xp, with_ctf = resolve_xp(args.pop("device")), not args.pop("no_ctf")
    dataset = build_dataset(args.pop("out"), **args, with_ctf=with_ctf, xp=xp)
    m = dataset["mass_kDa"]
    print(f"{dataset['n']} particles: body {m['body']:.1f} kDa, domain {m['domain']:.1f} kDa "
          f"(asked {m['domain_requested']:g}), box {dataset['box_size']} at {dataset['pixel_size_A']:.2f} Å, "
          f"{dataset['timings_s']['total_s']:.1f} s\n" + json.dumps(dataset.get("brute_force_check", {})))
    return 0


if __name__ == "__main__":
    sys.exit(main())
