"""Local refinement (cryocv/local_search.py, cryocv/jobs/local_refine.py): fulcrum geometry,
extents, recovery of perturbed poses, and bad input."""
import math
import os

import numpy as np
import pytest
from scipy.ndimage import affine_transform

from cryocv.backend import to_device, to_numpy
from cryocv.errors import CryocvError
from cryocv.fourier import shift_volume
from cryocv.geometry import axis_angle_to_matrix, euler_to_matrix, random_rotations
from cryocv.local_search import from_fulcrum_frame, to_fulcrum_frame
from cryocv.projector import prepare_volume
from cryocv.simulate import clean_projections

from .conftest import asymmetric_map, blob_volume


def _project(volume, rotations, origin_px):
    return clean_projections(prepare_volume(volume), rotations, origin_px, None, volume.shape[0])


def _corr(a, b):
    a, b = to_numpy(a).ravel() - to_numpy(a).mean(), to_numpy(b).ravel() - to_numpy(b).mean()
    return float(a @ b / np.sqrt((a @ a) * (b @ b)))


def test_fulcrum_frame_is_the_reference_moved_to_the_fulcrum(xp):
    """A particle of V at (R, o) is the particle of V moved by −f at (R, o − (R f)_xy)."""
    n = 32
    volume = to_device(blob_volume(n, seed=2), xp)
    fulcrum = np.array([5.0, -3.0, 4.0])
    rotations = to_device(random_rotations(4, np.random.default_rng(1)).astype(np.float32), xp)
    origins = to_device(np.random.default_rng(2).normal(0, 1.5, (4, 2)).astype(np.float32), xp)
    direct = _project(volume, rotations, origins)
    moved = _project(shift_volume(volume, -fulcrum), rotations, to_fulcrum_frame(rotations, origins, fulcrum))
    assert _corr(direct, moved) > 0.999
    back = from_fulcrum_frame(rotations, to_fulcrum_frame(rotations, origins, fulcrum), fulcrum)
    assert np.allclose(to_numpy(back), to_numpy(origins), atol=1e-5)


def test_rotation_about_an_off_centre_fulcrum_matches_real_space_rotation():
    """A map rotated in real space by W about a point f off the box centre, imaged at (A, o), is the
    unrotated map at pose A·W with the origin that keeps the fulcrum's image fixed."""
    n = 40
    volume = asymmetric_map(n, seed=3, sigma_px=1.2)
    fulcrum = np.array([9.0, -6.0, 4.0])                     # x, y, z px from the box centre
    w = axis_angle_to_matrix(np.array([0.10, -0.15, 0.12]))  # ~12°
    reverse = np.eye(3)[::-1]                                 # (x, y, z) <-> array index (z, y, x)
    centre = np.full(3, n // 2, dtype=float)
    matrix = reverse @ w.T @ reverse
    offset = centre - matrix @ centre + reverse @ (fulcrum - w.T @ fulcrum)
    rotated = affine_transform(volume, matrix, offset=offset, order=3, mode="constant")
    a = random_rotations(3, np.random.default_rng(4)).astype(np.float32)
    o = np.random.default_rng(5).normal(0, 1.0, (3, 2)).astype(np.float32)
    expected = _project(rotated, a, o)
    pose = (a @ w).astype(np.float32)
    origin = from_fulcrum_frame(pose, to_fulcrum_frame(a, o, fulcrum), fulcrum)
    right = _corr(_project(volume, pose, origin), expected)
    wrong = _corr(_project(volume, pose, o), expected)      # the rotation about the box centre instead
    assert right > 0.99 and (1 - right) < 0.1 * (1 - wrong)


@pytest.fixture(scope="module")
def consensus(tmp_path_factory):
    """A rigid particle: simulated images (true poses kept aside), consensus half-maps from the true
    poses, a soft mask around the particle, and particles whose poses are perturbed by up to 10°
    and 1.5 Å (box 48, 2 Å/px)."""
    from cryocv.io.mrc import write_map
    from cryocv.io.particle_files import load_particles, save_particles
    from cryocv.jobs import reconstruct
    from cryocv.masks import threshold_mask
    from cryocv.simulate import simulate
    root = tmp_path_factory.mktemp("local")
    n, px = 48, 2.0
    volume = asymmetric_map(n, seed=11, n_atoms=80, sigma_px=1.1)
    simulate(volume, px, 240, str(root / "sim"), snr=2.0, seed=4, progress=False)
    star = str(root / "sim" / "particles.star")
    rec = reconstruct.run(star, str(root / "consensus"), progress=False)
    assert rec["resolution_A"] < 8
    mask = threshold_mask(volume, 0.1 * float(volume.max()), dilation_px=2.0, edge_px=4.0)
    write_map(str(root / "mask.mrc"), mask.astype(np.float32), px)
    truth = load_particles(star)
    rng = np.random.default_rng(9)
    axes = rng.normal(size=(len(truth), 3))
    angles = np.radians(rng.uniform(2, 10, len(truth)))
    delta = axis_angle_to_matrix(axes / np.linalg.norm(axes, axis=1, keepdims=True) * angles[:, None])
    from cryocv.geometry import matrix_to_euler
    perturbed = truth.subset(np.arange(len(truth)))
    perturbed.euler_deg = matrix_to_euler(truth.rotations @ delta)
    perturbed.origin_A = truth.origin_A + rng.uniform(-1.5, 1.5, truth.origin_A.shape)
    save_particles(perturbed, str(root / "perturbed.star"))
    halves = [str(root / "consensus" / name) for name in ("half_map_1.mrc", "half_map_2.mrc")]
    return {"root": root, "truth": truth, "perturbed": str(root / "perturbed.star"), "half_maps": halves,
            "mask": str(root / "mask.mrc"), "delta_deg": np.degrees(angles)}


def _pose_error(job, truth):
    from cryocv.io.particle_files import load_particles
    from cryocv.symmetry import pose_distance_deg
    refined = load_particles(os.path.join(job, "particles.star"))
    return pose_distance_deg(refined.rotations, truth.rotations, "C1"), refined


def test_local_refine_brings_perturbed_poses_back(consensus):
    """From poses perturbed by 2–10°, a rigid particle's poses return within 1° of the truth,
    and no pose leaves the extents."""
    from cryocv.jobs.local_refine import LocalRefineParams, run
    job = str(consensus["root"] / "local")
    params = LocalRefineParams(rotation_extent_deg=12.0, shift_extent_A=4.0, max_iterations=2, nu_cutoffs=12,
                               initial_lowpass_A=8.0)
    report = run(consensus["perturbed"], consensus["half_maps"], consensus["mask"], job, params, device="cpu",
                 progress=False)
    error, refined = _pose_error(job, consensus["truth"])
    assert np.median(consensus["delta_deg"]) > 5
    print(f"median pose error {np.median(error):.3f}° (start {np.median(consensus['delta_deg']):.2f}°)")
    assert np.median(error) < 1.0, np.median(error)
    assert report["local"]["fraction_at_extent"]["rotation"] < 0.02
    from cryocv.io.particle_files import load_particles
    from cryocv.symmetry import pose_distance_deg
    start = load_particles(consensus["perturbed"])
    change = pose_distance_deg(refined.rotations, start.rotations, "C1")
    assert change.max() <= 12.0 + 1e-3
    assert os.path.isfile(os.path.join(job, "pose_change.png")) and report["local"]["mask_mass_kDa"] > 0
    # --continue on a finished job rewrites its outputs from the last checkpoint: the same result
    again = run(None, None, None, job, resume=True, progress=False)
    assert again["resolution_A"] == report["resolution_A"]
    assert np.array_equal(_pose_error(job, consensus["truth"])[0], error)


def test_marginalized_local_refine_brings_perturbed_poses_back(consensus):
    """--marginalize-step-deg: each particle is inserted at likelihood-weighted poses around its best
    one (shifts taken back from the fulcrum frame); poses still return within 1° and the map is as
    good as with the best pose alone (within 10 %)."""
    from cryocv.jobs.local_refine import LocalRefineParams, run
    common = dict(rotation_extent_deg=12.0, shift_extent_A=4.0, max_iterations=2, nu_cutoffs=12, initial_lowpass_A=8.0)
    reports = {}
    for name, step in (("best", None), ("spread", 1.0)):
        job = str(consensus["root"] / f"local_{name}")
        reports[name] = run(consensus["perturbed"], consensus["half_maps"], consensus["mask"], job,
                            LocalRefineParams(marginalize_step_deg=step, **common), device="cpu", progress=False)
        error, _ = _pose_error(job, consensus["truth"])
        print(f"{name}: median pose error {np.median(error):.3f}°, {reports[name]['resolution_A']:.2f} Å")
        assert np.median(error) < 1.0, (name, np.median(error))
    assert reports["spread"]["resolution_A"] < 1.1 * reports["best"]["resolution_A"]
    with pytest.raises(CryocvError, match="exclude each other"):
        LocalRefineParams(marginalize_step_deg=1.0, relax="marginalize", symmetry="C2").validate()


def test_narrowed_local_refine_brings_perturbed_poses_back(consensus):
    """--narrow-steps: after the first iteration each particle is searched in a small window at
    the second level around its last pose; a rigid particle still returns within 1°."""
    from cryocv.jobs.local_refine import LocalRefineParams, run
    job = str(consensus["root"] / "local_narrow")
    params = LocalRefineParams(rotation_extent_deg=12.0, shift_extent_A=4.0, max_iterations=2, nu_cutoffs=12,
                               initial_lowpass_A=8.0, narrow_steps=2)
    run(consensus["perturbed"], consensus["half_maps"], consensus["mask"], job, params, device="cpu", progress=False)
    error, _ = _pose_error(job, consensus["truth"])
    assert np.median(error) < 1.0, np.median(error)


def test_narrowed_local_search_stays_inside_the_extents(consensus):
    """A narrowed window around last poses near the edge of the extents never crosses them."""
    from cryocv.em_pass import HalfReferences
    from cryocv.geometry import matrix_to_euler
    from cryocv.io.particle_files import load_particles
    from cryocv.io.mrc import read_map
    from cryocv.jobs.checkpoints import RefineState
    from cryocv.jobs.local_refine import LocalRefineParams, local_search
    from cryocv.source import ParticleSource
    from cryocv.symmetry import pose_distance_deg
    particles = load_particles(consensus["perturbed"]).subset(np.arange(40))
    rng = np.random.default_rng(5)
    source = ParticleSource(particles, np)
    index = np.arange(40)[particles.half_set[:40] == 1]
    batch = source.load(index, 1)
    batch.images_ft = batch.images_ft * 0 + (rng.normal(size=batch.images_ft.shape)
                                               + 1j * rng.normal(size=batch.images_ft.shape)).astype(np.complex64)
    maps = {h: read_map(consensus["half_maps"][h - 1])[0] for h in (1, 2)}
    params = LocalRefineParams(rotation_extent_deg=6.0, shift_extent_A=2.0, narrow_steps=3)
    axes = rng.normal(size=(40, 3))
    edge = axis_angle_to_matrix(axes / np.linalg.norm(axes, axis=1, keepdims=True) * np.radians(5.5))
    last = RefineState(1, [], None, 10.0, matrix_to_euler(particles.rotations @ edge), particles.origin_A, None)
    search = local_search(params, 48, 2.0, np, np.zeros(3))(HalfReferences(maps, lambda m: m), np.ones(25), 24.0, last)
    found = search.find_poses(batch)
    angle = pose_distance_deg(found.rotations, batch.rotations, "C1")
    assert angle.max() <= 6.0 + 1e-3
    assert np.median(pose_distance_deg(found.rotations, particles.rotations[index] @ edge[index], "C1")) < 3.0
    assert np.linalg.norm(found.shifts_px - batch.origin_px, axis=1).max() * 2.0 <= 2.0 + 1e-3


def test_local_search_never_leaves_its_extents(consensus):
    """On images of pure noise the best poses wander, but never outside the extents."""
    from cryocv.em_pass import HalfReferences
    from cryocv.io.particle_files import load_particles
    from cryocv.io.mrc import read_map
    from cryocv.jobs.checkpoints import RefineState
    from cryocv.jobs.local_refine import LocalRefineParams, local_search
    from cryocv.source import ParticleSource
    from cryocv.symmetry import pose_distance_deg
    particles = load_particles(consensus["perturbed"]).subset(np.arange(40))
    rng = np.random.default_rng(3)
    source = ParticleSource(particles, np)
    batch = source.load(np.arange(40)[particles.half_set[:40] == 1], 1)
    batch.images_ft = batch.images_ft * 0 + (rng.normal(size=batch.images_ft.shape)
                                               + 1j * rng.normal(size=batch.images_ft.shape)).astype(np.complex64)
    maps = {h: read_map(consensus["half_maps"][h - 1])[0] for h in (1, 2)}
    params = LocalRefineParams(rotation_extent_deg=6.0, shift_extent_A=2.0)
    fulcrum = np.array([3.0, -2.0, 1.0])
    search = local_search(params, 48, 2.0, np, fulcrum)(HalfReferences(maps, lambda m: m), np.ones(25), 24.0,
                                                         RefineState(0, [], None, 10.0, None, None, None))
    found = search.find_poses(batch)
    angle = pose_distance_deg(found.rotations, batch.rotations, "C1")
    assert angle.max() <= 6.0 + 1e-3 and angle.max() > 1.0
    before = to_fulcrum_frame(batch.rotations, batch.origin_px, fulcrum)
    after = to_fulcrum_frame(found.rotations, found.shifts_px, fulcrum)
    assert np.linalg.norm(after - before, axis=1).max() * 2.0 <= 2.0 + 1e-3


@pytest.mark.parametrize("case", ["no_half_sets", "mask_box", "empty_mask", "maps_differ"])
def test_local_refine_bad_input_is_one_line_and_writes_nothing(consensus, tmp_path, case):
    from cryocv.io.mrc import read_map, write_map
    from cryocv.io.particle_files import load_particles, save_particles
    from cryocv.jobs.local_refine import run
    particles, halves, mask = consensus["perturbed"], list(consensus["half_maps"]), consensus["mask"]
    if case == "no_half_sets":
        p = load_particles(particles)
        p.half_set[:] = 0
        particles = str(tmp_path / "p.star")
        save_particles(p, particles)
    elif case == "mask_box":
        mask = str(tmp_path / "m.mrc")
        write_map(mask, np.ones((40, 40, 40), np.float32), 2.0)
    elif case == "empty_mask":
        mask = str(tmp_path / "m.mrc")
        write_map(mask, np.zeros((48, 48, 48), np.float32), 2.0)
    else:
        halves[1] = str(tmp_path / "h.mrc")
        write_map(halves[1], read_map(consensus["half_maps"][1])[0][:40, :40, :40].copy(), 2.0)
    out = tmp_path / "out"
    with pytest.raises(CryocvError) as error:
        run(particles, halves, mask, str(out), device="cpu", progress=False)
    assert "\n" not in str(error.value)
    assert not out.exists() or not any(out.iterdir())
