"""The small-membrane-protein benchmark dataset, bench/small_membrane_dataset.py: the belt has the mass
asked for, its analytic projection agrees with a real-space projection of the same blobs in 3D, the
protein part of the images is cryocv's projection of truth_protein.mrc at the poses of the STAR file,
a seed gives the same dataset twice, and every particle gets its own belt."""
import json
import os

import numpy as np
import pytest

from cryocv.geometry import angular_distance_deg
from cryocv.io.mrc import read_map
from cryocv.io.particle_files import load_particles
from .conftest import bench_module

RATIO = 1.25


@pytest.fixture(scope="module")
def smd():
    return bench_module("small_membrane_dataset")


@pytest.fixture(scope="module")
def cxcr4(shared_data):
    return os.path.join(shared_data, "models", "8zpm_cxcr4.cif")


@pytest.fixture(scope="module")
def built(smd, cxcr4, tmp_path_factory):
    """64 particles of the CXCR4 receptor (chain R) in a micelle: box 48 at 2.4 Å, with the self-checks."""
    folder = str(tmp_path_factory.mktemp("smd"))
    dataset = smd.build_dataset(folder, 64, cxcr4, chains=["R"], box_size=48, pixel_size_A=2.4, snr=0.05, seed=3,
                                belt_mass_ratio=RATIO, checks=True)
    return folder, dataset


def test_belt_mass_ratio(built):
    folder, dataset = built
    checks, realised = dataset["checks"], dataset["belt_mass_ratio_realised"]
    assert abs(checks["belt_mass_ratio"] - RATIO) < 0.1 * RATIO
    assert all(abs(r - RATIO) < 0.1 * RATIO for r in checks["rendered_3d_mass_ratio"] + [realised["belt_mean_map"]])
    masses = dataset["mass_kDa"]
    assert 25 < masses["protein"] < 35 and masses["belt"] == pytest.approx(RATIO * masses["protein"])
    with open(os.path.join(folder, "dataset.json")) as handle:
        assert json.load(handle)["mass_kDa"] == masses
    # the belt mean sits around the protein, not in it
    belt_mean, protein = (read_map(os.path.join(folder, f"{k}.mrc"))[0] for k in ("belt_mean", "truth_protein"))
    mask = read_map(os.path.join(folder, "protein_mask.mrc"))[0]
    assert 0 <= mask.min() and mask.max() <= 1 and (protein * mask).sum() > 0.99 * protein.sum()
    assert (belt_mean * mask).sum() < 0.5 * belt_mean.sum()


def test_analytic_belt_projection_matches_realspace(built):
    errors = built[1]["checks"]["belt_rel_error_vs_realspace"]
    assert len(errors) == 2 and max(errors) < 2e-3


def test_protein_images_are_cryocv_projections_of_the_truth(built):
    assert built[1]["checks"]["protein_rel_error_vs_cryocv_projection"] < 1e-4


def test_star_file(built):
    folder, dataset = built
    particles = load_particles(os.path.join(folder, "particles.star"))
    assert len(particles) == 64 and particles.box_size == 48 and particles.pixel_size_A == 2.4
    counts = np.bincount(particles.half_set, minlength=3)
    assert counts[0] == 0 and abs(int(counts[1]) - int(counts[2])) <= 1
    assert np.abs(particles.origin_A).max() <= 2.0
    mean_defocus = (particles.ctf.defocus_u_A + particles.ctf.defocus_v_A) / 2
    assert mean_defocus.min() >= 8000 and mean_defocus.max() <= 25000 and (particles.ctf.voltage_kV == 300).all()
    assert read_map(os.path.join(folder, "particles.mrcs"))[0].shape == (64, 48, 48)
    for name in ("truth_protein", "protein_mask", "belt_mean", "initial_reference"):
        assert read_map(os.path.join(folder, f"{name}.mrc"))[0].shape == (48, 48, 48)


def test_seed_reproduces_the_dataset(smd, cxcr4, built, tmp_path):
    folder, _ = built
    smd.build_dataset(str(tmp_path), 64, cxcr4, chains=["R"], box_size=48, pixel_size_A=2.4, snr=0.05, seed=3,
                      belt_mass_ratio=RATIO)
    first, again = (read_map(os.path.join(f, "particles.mrcs"))[0] for f in (folder, str(tmp_path)))
    assert np.array_equal(first, again)
    a, b = (load_particles(os.path.join(f, "particles.star")) for f in (folder, str(tmp_path)))
    assert np.array_equal(a.euler_deg, b.euler_deg) and np.array_equal(a.origin_A, b.origin_A)


def test_each_particle_has_its_own_belt(smd, cxcr4):
    truth = smd.build_truth(cxcr4, ["R"], 48, 2.4, belt_mass_ratio=RATIO)
    belts = [truth.particle_belt(3, i) for i in range(3)]
    assert np.array_equal(belts[0][0][0], truth.particle_belt(3, 0)[0][0])      # (seed, index) fixes it
    assert len({len(b[0][1]) for b in belts}) > 1 or not np.allclose(belts[0][0][0], belts[1][0][0])
    pose, origin = np.eye(3)[None], np.zeros((1, 2))
    zero_ft = smd.prepare_volume(np.zeros((48,) * 3, np.float32))
    images = [smd.render(truth, zero_ft, pose, origin, [b])[0] for b in belts]
    for i, j in ((0, 1), (0, 2), (1, 2)):
        assert np.linalg.norm(images[i] - images[j]) > 0.2 * np.linalg.norm(images[i])


def test_normal_and_belt_geometry(smd, cxcr4, shared_data):
    truth = smd.build_truth(cxcr4, ["R"], 48, 2.4, belt="nanodisc", belt_mass_ratio=RATIO)
    note = truth.info["normal_estimate"]
    assert len(note["helix_tilts_deg"]) >= 7 and np.median(note["helix_tilts_deg"]) < 30
    lipids, scaffold = truth.components
    assert lipids.mass + scaffold.mass == pytest.approx(RATIO * truth.info["density"]["protein_voxel_sum"])
    assert scaffold.region.inner_radius_A.min() >= lipids.region.tm_radius_A + lipids.region.belt_width_A - 1e-6
    # a soluble protein: the normal is the axis of least extent
    globin = smd.build_truth(os.path.join(shared_data, "models", "5ni1_hemoglobin.cif"), ["A"], 48, 2.4,
                             belt_axis="principal")
    extents = globin.info["normal_estimate"]["rms_extents_A"]
    assert extents[0] == min(extents) and 12 < globin.info["mass_kDa"]["protein"] < 17
    with pytest.raises(ValueError):
        smd.build_truth(cxcr4, ["Q"], 48, 2.4)


def test_registered_pose_error_removes_each_half_sets_rigid_drift():
    """bench_small_membrane.registered_pose_error_deg: poses of each half-set turned by its own global
    rotation (a half-map's rigid drift) plus 1° of scatter give ~1° after registration, and the
    offsets' angles come back."""
    from cryocv.geometry import axis_angle_to_matrix, random_rotations
    bsm = bench_module("bench_small_membrane")
    rng = np.random.default_rng(0)
    true = random_rotations(400, rng)
    half = np.repeat([1, 2], 200)
    drift = {1: axis_angle_to_matrix(np.radians(9.0) * np.array([0, 0, 1.0])),
             2: axis_angle_to_matrix(np.radians(2.0) * np.array([0, 1.0, 0]))}
    scatter = axis_angle_to_matrix(rng.normal(0, np.radians(1.0) / np.sqrt(3), (400, 3)))
    refined = np.stack([true[i] @ drift[half[i]] @ scatter[i] for i in range(400)])
    errors, offsets = bsm.registered_pose_error_deg(refined, true, half)
    assert abs(offsets[0] - 9.0) < 0.3 and abs(offsets[1] - 2.0) < 0.3
    assert 0.6 < np.median(errors) < 1.4
    assert np.median(bsm.angular_distance_deg(refined, true)) > 5      # the raw error is mostly the drift


def test_judging_turns_a_map_back_by_the_poses_global_rotation(smd, cxcr4, tmp_path):
    """bench_small_membrane.judge_job: a reconstruction from poses that are the true ones turned by one
    global rotation G (a refinement settled in a frame 12° off the truth's) is far from the truth in
    the protein's mask, and at Nyquist once turned by the rotation found from the poses: the pose
    and map conventions agree (the transpose would give 17.6 Å)."""
    from cryocv.geometry import axis_angle_to_matrix, matrix_to_euler
    from cryocv.io.particle_files import save_particles
    from cryocv.jobs import reconstruct
    bsm = bench_module("bench_small_membrane")
    data = str(tmp_path / "data")
    smd.build_dataset(data, 300, cxcr4, chains=["R"], box_size=48, pixel_size_A=2.4, snr=float("inf"), seed=5)
    particles = load_particles(os.path.join(data, "particles.star"))
    g = axis_angle_to_matrix(np.radians(12.0) * np.array([0.6, 0.0, 0.8]))
    turned = particles.subset(np.arange(len(particles)))
    turned.euler_deg = matrix_to_euler(particles.rotations @ g)
    star = str(tmp_path / "turned.star")
    save_particles(turned, star)
    job = str(tmp_path / "job")
    reconstruct.run(star, job, progress=False)
    truth, px = read_map(os.path.join(data, "truth_protein.mrc"))
    mask, _ = read_map(os.path.join(data, "protein_mask.mrc"))
    result = bsm.judge_job(job, truth, mask, px, particles)
    assert result["pose_error_joint_registered_median_deg"] < 0.1 and result["pose_error_median_deg"] > 11
    assert result["fsc05_A"] > 8.0 and result["after_global_rotation"]["fsc05_A"] <= 1.05 * 2 * px   # Nyquist


def test_flexible_periphery(smd, cxcr4):
    """CXCR4 + its nanobody as a flexible periphery: the rigid and flexible maps add up to the whole,
    the belt's mass counts both, the wobble is the asked-for spread and fixed by (seed, index), and the
    rendered periphery is the projection of its map turned about the hinge in real space."""
    truth = smd.build_truth(cxcr4, ["R", "N"], 64, 2.4, belt_mass_ratio=RATIO, flexible_chains="N",
                            wobble_sigma_deg=10.0)
    whole = smd.build_truth(cxcr4, ["R", "N"], 64, 2.4, belt_mass_ratio=RATIO)
    assert np.allclose(truth.protein_map + truth.periphery_map, whole.protein_map, atol=1e-4 * whole.protein_map.max())
    masses = truth.info["mass_kDa"]
    assert 25 < masses["protein"] < 35 and 9 < masses["periphery"] < 15
    assert masses["belt"] == pytest.approx(RATIO * (masses["protein"] + masses["periphery"]))
    assert sum(c.mass for c in truth.components) == pytest.approx(sum(c.mass for c in whole.components))
    assert truth.info["periphery"]["hinge_contact_atoms"] > 0
    angles = angular_distance_deg(np.array([truth.particle_wobble(3, i) for i in range(300)]), np.eye(3))
    assert 4.5 < np.median(angles) < 9.0                       # |N(0, 10°)|: median 6.7°
    assert np.array_equal(truth.particle_wobble(3, 7), truth.particle_wobble(3, 7))
    rng = np.random.default_rng(0)
    rotations = smd.euler_to_matrix(smd.matrix_to_euler(smd.random_rotations(2, rng)))
    errors = smd.check_periphery_projection(truth, 3, rotations, rng.uniform(-2, 2, (2, 2)))
    assert max(errors["periphery_rel_error_vs_turned_map"]) < 0.1
    mean = truth.periphery_mean_map()
    assert mean.sum() == pytest.approx(truth.periphery_map.sum(), rel=0.02)
    for bad in ("Q", "R,N"):
        with pytest.raises(ValueError):
            smd.build_truth(cxcr4, ["R", "N"], 64, 2.4, flexible_chains=bad)


def test_belt_motion(smd, cxcr4):
    """Per-particle belt tilt and shift: each particle's blobs are the unmoved belt's turned about the
    belt's centre and moved in the membrane plane, by the asked-for spreads; the mean belt keeps its mass;
    without them the belt is as before."""
    still = smd.build_truth(cxcr4, ["R"], 48, 2.4, belt_mass_ratio=RATIO)
    moving = smd.build_truth(cxcr4, ["R"], 48, 2.4, belt_mass_ratio=RATIO, belt_tilt_sigma_deg=10.0,
                             belt_shift_sigma_A=3.0)
    origin, normal = moving.frame[0], moving.frame[1][:, 2]
    angles, shifts = [], []
    for i in range(200):
        w, t = moving.belt_motion(3, i)
        angles.append(angular_distance_deg(w, np.eye(3)))
        shifts.append(t)
    shifts = np.array(shifts)
    assert 4.5 < np.median(angles) < 9.0 and np.allclose(shifts @ normal, 0, atol=1e-9)
    assert 2.4 < np.std(shifts - np.outer(shifts @ normal, normal)) * np.sqrt(3 / 2) < 3.6
    for i in range(3):
        w, t = moving.belt_motion(3, i)
        for (c0, m0), (c1, m1) in zip(still.particle_belt(3, i), moving.particle_belt(3, i)):
            assert np.allclose(c1, origin + (c0 - origin) @ w.T + t) and np.array_equal(m0, m1)
        assert np.allclose(still.belt_motion(3, i)[0], np.eye(3))
    mean_still, mean_moving = still.belt_mean_map(), moving.belt_mean_map()
    assert mean_moving.sum() == pytest.approx(mean_still.sum(), rel=0.02)
    assert not np.allclose(mean_moving, mean_still)
