"""Symmetry relaxation on a pseudo-symmetric particle (issue 14): a C4 channel (TRPV1, 3j5p) with
one small partner (a single globin chain of 5ni1, ~16 kDa) bound to one subunit.

Particles are simulated from the full (C1) complex; the "consensus" poses are the true poses
turned by a random C4 mate each (what a C4 refinement leaves) and the consensus map is the C4
average of the complex. ``cryocv refine --sym C4 --relax maximize --break-symmetry`` runs from
there. Judged by: the fraction of particles whose final pose is their true C1 pose (within 10°,
up to one global operator), next to the oracle fraction (each image's four mates scored against
the true map); and the partner's FSC 0.5 against the truth inside its mask, next to a
reconstruction from the true poses.

    python bench/bench_relax.py --n 20000 --out /tmp/relax --results bench/results/relax_trpv1_globin
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from cryocv.backend import resolve_xp, to_device, to_numpy  # noqa: E402
from cryocv.fsc import fsc_curve, resolution_at  # noqa: E402
from cryocv.geometry import angular_distance_deg, matrix_to_euler  # noqa: E402
from cryocv.io.mrc import read_map, write_map  # noqa: E402
from cryocv.io.particle_files import load_particles, save_particles  # noqa: E402
from cryocv.jobs.reconstruct import run as run_reconstruct  # noqa: E402
from cryocv.jobs.refine import RefineParams, run as run_refine  # noqa: E402
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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20000)
    parser.add_argument("--box", type=int, default=128)
    parser.add_argument("--snr", type=float, default=0.1)
    parser.add_argument("--max-iterations", type=int, default=6)
    parser.add_argument("--channel", default=os.path.join(SHARED_MODELS, "3j5p_trpv1_c4.pdb"))
    parser.add_argument("--partner", default=os.path.join(SHARED_MODELS, "5ni1_hemoglobin.cif"))
    parser.add_argument("--out", required=True)
    parser.add_argument("--results", required=True, help="path without extension (.json)")
    args = parser.parse_args(argv)
    xp = resolve_xp("auto")
    os.makedirs(args.out, exist_ok=True)
    ops = symmetry_operators("C4")
    full, partner, px = complex_maps(args.channel, args.partner, args.box)
    write_map(os.path.join(args.out, "truth.mrc"), full, px)
    consensus_map = to_numpy(symmetrized(full, ops))
    write_map(os.path.join(args.out, "consensus_c4.mrc"), consensus_map, px)
    star = os.path.join(args.out, "sim", "particles.star")
    if not os.path.isfile(star):
        simulate(full, px, args.n, os.path.join(args.out, "sim"), snr=args.snr, seed=1, xp=xp, progress=False)
    truth = load_particles(star)
    consensus = load_particles(star)
    rng = np.random.default_rng(2)
    consensus.euler_deg = matrix_to_euler(np.einsum("bij,bjk->bik", truth.rotations,
                                                    np.transpose(ops[rng.integers(0, 4, len(truth))], (0, 2, 1))))
    consensus_star = os.path.join(args.out, "consensus.star")
    save_particles(consensus, consensus_star)
    results = {"n": args.n, "box": args.box, "pixel_size_A": px, "snr": args.snr}
    search = RefineParams().search_params(args.box, px)
    results["oracle_fraction_true_mate"] = oracle_fraction(full, star, ops, xp, search_schedule(args.box, args.box / 2,
                                                                                                search)[-3:], search)
    t0 = time.time()
    job = os.path.join(args.out, "relax")
    run_refine(consensus_star, os.path.join(args.out, "consensus_c4.mrc"), job,
               RefineParams(symmetry="C4", relax="maximize", break_symmetry=True, initial_lowpass_A=12.0,
                            max_iterations=args.max_iterations), progress=False, overwrite=True)
    results["relax_wall_s"] = round(time.time() - t0, 1)
    refined = load_particles(os.path.join(job, "particles.star"))
    modes = mode_of(refined.rotations, truth.rotations, ops)
    global_mode = int(np.bincount(modes, minlength=4).argmax())
    g = ops[global_mode]
    error = angular_distance_deg(refined.rotations, truth.rotations @ g.T)
    results["fraction_true_pose_within_10deg"] = float(np.mean(error < 10))
    results["global_operator"] = global_mode
    results["median_pose_error_deg"] = float(np.median(error))
    mask = to_numpy(threshold_mask(partner, 0.1 * float(partner.max()), 2.0, 4.0))
    relaxed_map, _ = read_map(os.path.join(job, "map.mrc"))
    # poses A·gᵀ (A the truth) reconstruct V'(x) = V(gᵀx): bring it back with V'(g·x)
    registered = to_numpy(transform_volume(relaxed_map, MapTransform(g, np.zeros(3))))
    results["partner_fsc05_relaxed_A"] = resolution_at(fsc_curve(registered * mask, full * mask), 0.5, args.box, px)
    run_reconstruct(star, os.path.join(args.out, "true_poses"), progress=False, overwrite=True)
    oracle_map, _ = read_map(os.path.join(args.out, "true_poses", "map.mrc"))
    results["partner_fsc05_true_poses_A"] = resolution_at(fsc_curve(oracle_map * mask, full * mask), 0.5, args.box, px)
    results["report"] = json.load(open(os.path.join(job, "fsc.json"))).get("relax")
    print(json.dumps(results, indent=1, default=str))
    with open(args.results + ".json", "w") as handle:
        json.dump(results, handle, indent=2, default=str)


if __name__ == "__main__":
    main()
