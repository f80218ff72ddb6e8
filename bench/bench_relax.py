"""Symmetry relaxation on pseudo-symmetric particles (issue 14).

``--assembly channel``: a C4 channel (TRPV1, 3j5p) with one small partner (a single globin chain
of 5ni1, ~16 kDa) bound to one subunit. ``--assembly globin --group D4|T|...``: copies of one
globin chain (5ni1 chain A) under a dihedral or polyhedral group (cryocv's operators) with one
partner (chain B) bound to copy 0: the groups RELION cannot relax.

Particles are simulated from the full (C1) complex; the "consensus" poses are the true poses
turned by a random mate each (what a symmetric refinement leaves) and the consensus map is the
group average of the complex. ``cryocv refine --sym G --relax maximize|marginalize
--break-symmetry`` runs from there. Judged by: the fraction of particles whose final pose is
their true C1 pose (within 10°, up to one global operator), next to the oracle fraction (each
image's mates scored against the true map from its true pose); and the partner's FSC 0.5 against
the truth inside its mask, next to a reconstruction from the true poses. ``--compare-unrelaxed``
also runs the symmetric refinement without relaxation for the per-iteration cost ratio.

    python bench/bench_relax.py --n 20000 --out /tmp/relax --results bench/results/relax_trpv1_globin
    python bench/bench_relax.py --assembly globin --group T --n 20000 --out /tmp/relax_t --results ...
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from cryocv.backend import resolve_xp, to_device, to_numpy  # noqa: E402
from cryocv.fsc import fsc_curve, resolution_at  # noqa: E402
from cryocv.geometry import angular_distance_deg, euler_to_matrix, matrix_to_euler  # noqa: E402
from cryocv.io.mrc import read_map, write_map  # noqa: E402
from cryocv.io.particle_files import load_particles, save_particles  # noqa: E402
from cryocv.jobs.reconstruct import run as run_reconstruct  # noqa: E402
from cryocv.jobs.refine import RefineParams, run as run_refine  # noqa: E402
from cryocv.jobs.relaxation import RELAX_LEVELS  # noqa: E402
from cryocv.masks import threshold_mask  # noqa: E402
from cryocv.projector import prepare_volume  # noqa: E402
from cryocv.register import MapTransform, transform_volume  # noqa: E402
from cryocv.relax import mode_of, relaxed_poses, symmetrized  # noqa: E402
from cryocv.search import SearchResult, search_schedule  # noqa: E402
from cryocv.simulate import simulate  # noqa: E402
from cryocv.source import ParticleSource  # noqa: E402
from cryocv.symmetry import symmetry_operators  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED_MODELS = os.path.join(HERE, "..", "..", "shared", "data", "models")


def complex_maps(channel_path: str, partner_path: str, box_size: int, gap_A: float = 4.0):
    """(full map, partner map, pixel size): the channel centred on its C4 axis (z, through its
    centre of mass), the partner's first chain placed beside the subunit of chain A at mid-height,
    just outside the channel's radius; the pixel size fits the complex in 80 % of the box."""
    import gemmi
    from cryocv.models import map_from_model
    channel = gemmi.read_structure(channel_path)
    channel.setup_entities()
    channel.remove_ligands_and_waters()
    channel.remove_hydrogens()
    partner = gemmi.read_structure(partner_path)
    partner.setup_entities()
    partner.remove_ligands_and_waters()
    partner.remove_hydrogens()
    com = channel[0].calculate_center_of_mass()
    xyz = np.array([[a.pos.x - com.x, a.pos.y - com.y, a.pos.z - com.z] for r in channel[0][0] for a in r])
    radius = np.hypot(xyz[:, 0], xyz[:, 1])
    far = xyz[np.argmax(radius)]
    direction = np.array([far[0], far[1], 0.0]) / np.hypot(far[0], far[1])
    chain = partner[0][0]
    p_xyz = np.array([[a.pos.x, a.pos.y, a.pos.z] for r in chain for a in r])
    p_centre = p_xyz.mean(axis=0)
    p_radius = np.linalg.norm(p_xyz - p_centre, axis=1).max()
    target = direction * (radius.max() + p_radius + gap_A) + np.array([0, 0, far[2] * 0.5])
    extent = max(np.abs(xyz).max(), np.linalg.norm(target) + p_radius)
    pixel_size_A = float(np.ceil(2 * extent / (0.8 * box_size) * 20) / 20)
    centre = (box_size // 2) * pixel_size_A
    shift_channel = gemmi.Vec3(centre - com.x, centre - com.y, centre - com.z)
    channel[0].transform_pos_and_adp(gemmi.Transform(gemmi.Mat33(), shift_channel))
    move = target - p_centre + centre
    only = gemmi.Structure()
    only.cell = channel.cell
    model = gemmi.Model("1")
    model.add_chain(chain)
    only.add_model(model)
    only[0].transform_pos_and_adp(gemmi.Transform(gemmi.Mat33(), gemmi.Vec3(*move)))
    tmp = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"relax_models_{os.getpid()}")
    os.makedirs(tmp, exist_ok=True)
    channel.write_pdb(os.path.join(tmp, "channel.pdb"))
    only.write_pdb(os.path.join(tmp, "partner.pdb"))
    body = map_from_model(os.path.join(tmp, "channel.pdb"), box_size, pixel_size_A, center=False)
    part = map_from_model(os.path.join(tmp, "partner.pdb"), box_size, pixel_size_A, center=False)
    return body + part, part, pixel_size_A


def globin_assembly_maps(group: str, subunit_path: str, box_size: int, gap_A: float = 4.0):
    """(full map, partner map, pixel size) of a ``group``-symmetric assembly of one globin chain
    (chain A of ``subunit_path``: its copies ``V_A(g·x)`` for g in the group, so the core is
    symmetric under cryocv's own operators) with one partner (chain B) bound outside copy 0: a
    dihedral or polyhedral pseudo-symmetric particle built from a real model. The subunit sits off
    every symmetry axis, as far out as keeps neighbouring copies in contact, not overlapping."""
    import gemmi
    from cryocv.models import map_from_model
    ops = symmetry_operators(group)
    st = gemmi.read_structure(subunit_path)
    st.setup_entities()
    st.remove_ligands_and_waters()
    st.remove_hydrogens()
    chains = {c.name: np.array([[a.pos.x, a.pos.y, a.pos.z] for r in c for a in r]) for c in st[0]}
    sub, par = chains["A"], chains["B"]
    r_sub = float(np.percentile(np.linalg.norm(sub - sub.mean(0), axis=1), 90))
    r_par = float(np.percentile(np.linalg.norm(par - par.mean(0), axis=1), 90))
    u = np.array([0.31, 0.52, 0.80])
    u /= np.linalg.norm(u)
    nearest = min(np.linalg.norm(g @ u - u) for g in ops[1:])           # copy-to-copy distance at radius 1
    d = 1.8 * r_sub / nearest
    partner_centre = u * (d + r_sub + r_par + gap_A)
    extent = np.linalg.norm(partner_centre) + r_par + 6
    pixel_size_A = float(np.ceil(2 * extent / (0.85 * box_size) * 20) / 20)
    centre = (box_size // 2) * pixel_size_A
    tmp = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"relax_models_{os.getpid()}")
    os.makedirs(tmp, exist_ok=True)
    maps = {}
    for name, xyz, target in (("A", sub, u * d), ("B", par, partner_centre)):
        one = gemmi.read_structure(subunit_path)
        one.remove_ligands_and_waters()
        one.remove_hydrogens()
        for chain_name in [c.name for c in one[0]]:
            if chain_name != name:
                one[0].remove_chain(chain_name)
        move = target - xyz.mean(0) + centre
        one[0].transform_pos_and_adp(gemmi.Transform(gemmi.Mat33(), gemmi.Vec3(*move)))
        path = os.path.join(tmp, f"chain_{name}.pdb")
        one.write_pdb(path)
        maps[name] = map_from_model(path, box_size, pixel_size_A, center=False)
    core = symmetrized(maps["A"], ops) * len(ops)
    return (core + maps["B"]).astype(np.float32), maps["B"].astype(np.float32), pixel_size_A


def oracle_fraction(truth_map, star: str, operators, xp, levels, params) -> float:
    """Fraction of images whose best mate, scored against the true map from the true pose, is the
    true one: the most any relaxation can reach on these images."""
    particles = load_particles(star)
    source = ParticleSource(particles, xp, 0)
    volume_ft = prepare_volume(to_device(truth_map, xp))
    right = 0
    for start in range(0, len(particles), 512):
        index = np.arange(start, min(start + 512, len(particles)))
        batch = source.load(index)
        best = SearchResult(batch.rotations, batch.origin_px, xp.zeros(len(index), dtype=xp.float32))
        noise = xp.ones(particles.box_size // 2 + 1, dtype=xp.float32)
        _, choice = relaxed_poses(volume_ft, batch.images_ft, batch.ctf, noise, best, operators, levels, params)
        right += int((to_numpy(choice) == 0).sum())
    return right / len(particles)


def partner_mask(partner) -> np.ndarray:
    """The partner's soft mask for the FSC: its map above 10 % of its maximum, dilated 2 px, 4 px soft edge."""
    return to_numpy(threshold_mask(partner, 0.1 * float(partner.max()), 2.0, 4.0))


def masked_fsc05(volume, truth_map, mask, px: float) -> float:
    """Resolution (Å) at FSC 0.5 of ``volume`` against ``truth_map``, both multiplied by ``mask``."""
    return resolution_at(fsc_curve(volume * mask, truth_map * mask), 0.5, truth_map.shape[0], px)


def judge(rotations, true_rotations, operators, refined_map, truth_map, mask, px: float) -> dict:
    """A relaxed refinement against the truth: the global operator g (the mate most particles
    landed on, :func:`cryocv.relax.mode_of`), the fraction of particles within 10° of their true
    pose turned by g and the median error (°), and the partner's masked FSC 0.5 (Å) of
    ``refined_map`` brought back into the truth's frame. ``rotations`` and ``true_rotations`` are
    matched row by row."""
    modes = mode_of(rotations, true_rotations, operators)
    global_mode = int(np.bincount(modes, minlength=len(operators)).argmax())
    g = operators[global_mode]
    error = angular_distance_deg(rotations, true_rotations @ g.T)
    # poses A·gᵀ (A the truth) reconstruct V'(x) = V(gᵀx): bring it back with V'(g·x)
    registered = to_numpy(transform_volume(refined_map, MapTransform(g, np.zeros(3))))
    return {"fraction_true_pose_within_10deg": float(np.mean(error < 10)), "global_operator": global_mode,
            "median_pose_error_deg": float(np.median(error)),
            "partner_fsc05_A": masked_fsc05(registered, truth_map, mask, px)}


def at_operator(rotations, true_rotations, operators, global_mode: int, half_set=None) -> dict:
    """One set of poses against the truth: the fraction within 10° of true pose·gᵀ (g the
    operator ``global_mode``), the occupancy of each mate, and with ``half_set`` (n,) the operator
    most of each half-set's particles sit at and its share."""
    modes = mode_of(rotations, true_rotations, operators)
    error = angular_distance_deg(rotations, true_rotations @ operators[global_mode].T)
    found = {"fraction": round(float(np.mean(error < 10)), 4),
             "occupancy": [round(float(v), 4) for v in np.bincount(modes, minlength=len(operators)) / len(modes)]}
    for h in ((1, 2) if half_set is not None else ()):
        counts = np.bincount(modes[half_set == h], minlength=len(operators))
        found[f"half{h}_operator"] = int(counts.argmax())
        found[f"half{h}_share"] = round(float(counts.max() / max(counts.sum(), 1)), 4)
    return found


def per_iteration(job: str, truth, operators, global_mode: int) -> list:
    """Per checkpoint of ``job`` (all kept): :func:`at_operator` of its poses: how the symmetry
    broke, and in which half-set. Checkpoints hold the poses after the half-set registration at
    the end of their iteration (since commit f122b93): half-set 2's operator is then the one it
    was turned onto, not the one it broke at."""
    rows = []
    for folder in sorted(glob.glob(os.path.join(job, "iterations", "iter_*"))):
        path = os.path.join(folder, "poses.npz")
        if not os.path.exists(path):
            continue
        saved = np.load(path)
        found = at_operator(euler_to_matrix(saved["euler_deg"]), truth.rotations, operators, global_mode,
                            saved["half_set"])
        rows.append({"iteration": int(folder.rsplit("_", 1)[1]), "fraction_at_final_operator": found["fraction"],
                     **{k: v for k, v in found.items() if k.startswith("half")}})
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20000)
    parser.add_argument("--box", type=int, default=128)
    parser.add_argument("--snr", type=float, default=0.1)
    parser.add_argument("--max-iterations", type=int, default=6)
    parser.add_argument("--channel", default=os.path.join(SHARED_MODELS, "3j5p_trpv1_c4.pdb"))
    parser.add_argument("--partner", default=os.path.join(SHARED_MODELS, "5ni1_hemoglobin.cif"))
    parser.add_argument("--assembly", choices=["channel", "globin"], default="channel",
                        help="channel: TRPV1 (C4) + one globin chain; globin: --group copies of a globin chain + one")
    parser.add_argument("--group", default="C4", help="point group (channel: C4 only)")
    parser.add_argument("--relax-mode", default="maximize", choices=["maximize", "marginalize"])
    parser.add_argument("--out", required=True)
    parser.add_argument("--results", required=True, help="path without extension (.json)")
    parser.add_argument("--compare-unrelaxed", action="store_true",
                        help="also run the same refinement in --group without relaxation: per-iteration pass time ratio")
    args = parser.parse_args(argv)
    xp = resolve_xp("auto")
    os.makedirs(args.out, exist_ok=True)
    group = args.group.upper()
    ops = symmetry_operators(group)
    if args.assembly == "channel":
        if group != "C4":
            parser.error("--assembly channel is C4")
        full, partner, px = complex_maps(args.channel, args.partner, args.box)
    else:
        full, partner, px = globin_assembly_maps(group, args.partner, args.box)
    write_map(os.path.join(args.out, "truth.mrc"), full, px)
    write_map(os.path.join(args.out, "partner.mrc"), partner, px)
    consensus_map = to_numpy(symmetrized(full, ops))
    consensus_path = os.path.join(args.out, "consensus_sym.mrc")
    write_map(consensus_path, consensus_map, px)
    star = os.path.join(args.out, "sim", "particles.star")
    if not os.path.isfile(star):
        simulate(full, px, args.n, os.path.join(args.out, "sim"), snr=args.snr, seed=1, xp=xp, progress=False)
    truth = load_particles(star)
    consensus = load_particles(star)
    rng = np.random.default_rng(2)
    consensus.euler_deg = matrix_to_euler(np.einsum("bij,bjk->bik", truth.rotations,
                                                    np.transpose(ops[rng.integers(0, len(ops), len(truth))], (0, 2, 1))))
    consensus_star = os.path.join(args.out, "consensus.star")
    save_particles(consensus, consensus_star)
    results = {"assembly": args.assembly, "group": group, "relax_mode": args.relax_mode, "n": args.n,
               "box": args.box, "pixel_size_A": px, "snr": args.snr}
    search = RefineParams().search_params(args.box, px)
    results["oracle_fraction_true_mate"] = oracle_fraction(full, star, ops, xp, search_schedule(args.box, args.box / 2,
                                                                                                search)[-RELAX_LEVELS:], search)
    t0 = time.time()
    job = os.path.join(args.out, "relax")
    run_refine(consensus_star, consensus_path, job,
               RefineParams(symmetry=group, relax=args.relax_mode, break_symmetry=True, initial_lowpass_A=12.0,
                            max_iterations=args.max_iterations, keep_checkpoints=0), progress=False, overwrite=True)
    results["relax_wall_s"] = round(time.time() - t0, 1)
    refined = load_particles(os.path.join(job, "particles.star"))
    mask = partner_mask(partner)
    write_map(os.path.join(args.out, "partner_mask.mrc"), mask.astype(np.float32), px)
    relaxed_map, _ = read_map(os.path.join(job, "map.mrc"))
    judged = judge(refined.rotations, truth.rotations, ops, relaxed_map, full, mask, px)
    results.update({k: judged[k] for k in ("fraction_true_pose_within_10deg", "global_operator",
                                           "median_pose_error_deg")})
    results["partner_fsc05_relaxed_A"] = judged["partner_fsc05_A"]
    run_reconstruct(star, os.path.join(args.out, "true_poses"), progress=False, overwrite=True)
    oracle_map, _ = read_map(os.path.join(args.out, "true_poses", "map.mrc"))
    results["partner_fsc05_true_poses_A"] = masked_fsc05(oracle_map, full, mask, px)
    report = json.load(open(os.path.join(job, "fsc.json")))
    results["report"] = report.get("relax")
    results["relax_pass_seconds"] = [h["pass_seconds"] for h in report["iterations"]]
    results["per_iteration"] = per_iteration(job, truth, ops, judged["global_operator"])
    if args.compare_unrelaxed:
        plain = os.path.join(args.out, "unrelaxed")
        t0 = time.time()
        run_refine(consensus_star, consensus_path, plain,
                   RefineParams(symmetry=group, initial_lowpass_A=12.0, max_iterations=args.max_iterations),
                   progress=False, overwrite=True)
        results["unrelaxed_wall_s"] = round(time.time() - t0, 1)
        plain_report = json.load(open(os.path.join(plain, "fsc.json")))
        results["unrelaxed_pass_seconds"] = [h["pass_seconds"] for h in plain_report["iterations"]]
        # same iteration count on both sides: compare the median pass of the non-final iterations
        relaxed_steps = [h["pass_seconds"] for h in report["iterations"] if not h["final"]]
        plain_steps = [h["pass_seconds"] for h in plain_report["iterations"] if not h["final"]]
        results["relaxed_over_unrelaxed_pass_time"] = round(float(np.median(relaxed_steps) / np.median(plain_steps)), 2)
    print(json.dumps(results, indent=1, default=str))
    with open(args.results + ".json", "w") as handle:
        json.dump(results, handle, indent=2, default=str)


if __name__ == "__main__":
    main()
