"""The two-body (hinged domain) benchmark dataset, bench/two_body_dataset.py: its image model agrees
with a real-space rotation of the domain about the hinge, the domain has the mass asked for, the
half-sets are balanced, and reconstructing from the true global poses blurs the domain but not the
body (the premise of a local-refinement benchmark)."""
import os
import subprocess

import numpy as np
import pytest

from cryocv.geometry import rotation_about_axis
from cryocv.io.mrc import read_map
from cryocv.io.particle_files import load_particles
from cryocv.projector import accumulators_to_map
from cryocv.reconstruct import backproject
from .conftest import bench_module, needs_relion



@pytest.fixture(scope="module")
def tb():
    return bench_module("two_body_dataset")


@pytest.fixture(scope="module")
def datasets(tb, shared_data, tmp_path_factory):
    """The same 40 noise-free particles (poses, CTFs) with a rigid (σ 0) and a hinged (σ 7°) domain."""
    model = os.path.join(shared_data, "models", "3j5p_trpv1_c4.pdb")
    out = {}
    for sigma in (0.0, 7.0):
        folder = str(tmp_path_factory.mktemp(f"twobody{sigma:g}"))
        out[sigma] = (folder, tb.build_dataset(folder, 40, model, domain_kDa=50, box_size=48, hinge_sigma_deg=sigma,
                                               snr=np.inf, seed=3, n_checks=3 if sigma else 0))
    return out


def _reconstruct(star):
    acc = backproject(load_particles(star), progress=False)
    (d1, w1), (d2, w2) = acc.half(1), acc.half(2)
    return accumulators_to_map(d1 + d2, w1 + w2, acc.box_size)


def _masked_corr(a, b, mask):
    a, b = a * mask, b * mask
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def test_fourier_slice_rendering_matches_real_space_rotation(tb, datasets):
    folder, dataset = datasets[7.0]
    check = dataset["brute_force_check"]
    assert min(check["corr_domain"]) > 0.99 and min(check["corr_composite"]) > 0.99
    # a large rotation plus a translation: without the shift the hinge implies, the images disagree
    truth = tb.build_truth(dataset["model"], 50, 48)
    rotation = rotation_about_axis([0.3, -0.5, 0.8], np.deg2rad(20))[None]
    pose = rotation_about_axis([1.0, 0.2, -0.4], 1.1)[None]
    strong = tb.brute_force_check(truth, pose, np.array([[2.0, -3.0]]), rotation, np.array([[1.5, 0.0, -2.0]]))
    assert strong["corr_domain"][0] > 0.99 and strong["corr_domain_no_hinge_shift"][0] < 0.97


@needs_relion
def test_relion_project_renders_the_same_particles(tb, shared_data, tmp_path):
    """RELION reads the STAR files as meant: relion_project of the body at the global poses plus the
    rest-state domain at the domain's poses (A·W, o_d, with a hinge translation) gives our images."""
    model = os.path.join(shared_data, "models", "3j5p_trpv1_c4.pdb")
    dataset = tb.build_dataset(str(tmp_path), 12, model, domain_kDa=25, box_size=48, hinge_sigma_deg=12,
                               hinge_shift_sigma_A=2, snr=np.inf, seed=5, n_checks=0)
    for part, star in (("body", "particles"), ("domain", "particles_domain")):
        r = subprocess.run(["relion_project", "--i", f"map_{part}.mrc", "--ang", f"{star}.star", "--o", part, "--ctf",
                            "--angpix", str(dataset["pixel_size_A"])], cwd=tmp_path, capture_output=True, text=True)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    ours, body, domain = (read_map(str(tmp_path / f"{name}.mrcs"))[0] for name in ("particles", "body", "domain"))
    for i in range(len(ours)):
        assert np.corrcoef(ours[i].ravel(), (body[i] + domain[i]).ravel())[0, 1] > 0.999


def test_masses_half_sets_and_files(tb, datasets, shared_data):
    folder, dataset = datasets[7.0]
    masses = dataset["mass_kDa"]
    assert abs(masses["domain"] - 50) < 0.15 * 50
    assert abs(masses["body"] + masses["domain"] - masses["full"]) < 1e-6
    particles = load_particles(os.path.join(folder, "particles.star"))
    counts = np.bincount(particles.half_set, minlength=3)
    assert counts[0] == 0 and abs(int(counts[1]) - int(counts[2])) <= 1
    full, body, domain = (read_map(os.path.join(folder, f"map_{k}.mrc"))[0] for k in ("full", "body", "domain"))
    np.testing.assert_allclose(full, body + domain, atol=1e-5 * np.abs(full).max())
    mask = read_map(os.path.join(folder, "mask_domain.mrc"))[0]
    assert (domain * mask).sum() > 0.99 * domain.sum() and 0 <= mask.min() and mask.max() <= 1
    # the truth judges itself: the domain's true poses score 0, the global poses |angle of W|
    truth = tb.load_truth(folder)
    domain_particles = load_particles(os.path.join(folder, "particles_domain.star"))
    assert tb.domain_pose_error_deg(domain_particles.euler_deg, truth).max() < 1e-3
    np.testing.assert_allclose(tb.domain_pose_error_deg(truth["rotations"], folder),
                               np.abs(truth["domain_angles_deg"]), atol=1e-6)
    assert tb.domain_origin_error_A(domain_particles.origin_A, truth).max() < 1e-3
    assert tb.masked_fsc_resolution(full, full, mask, dataset["pixel_size_A"]) == 2 * dataset["pixel_size_A"]
    # the selection is generic: another model, another mass
    hb = tb.load_model(os.path.join(shared_data, "models", "5ni1_hemoglobin.cif"))
    choice = tb.select_domain(hb, 14.0)
    mass = tb.residue_table(hb)[2][choice["selected"]].sum() / 1e3
    assert abs(mass - 14.0) < 0.15 * 14.0


def test_true_global_poses_blur_the_domain_not_the_body(datasets):
    corr = {}
    for sigma, (folder, _) in datasets.items():
        full = read_map(os.path.join(folder, "map_full.mrc"))[0]
        masks = {k: read_map(os.path.join(folder, f"mask_{k}.mrc"))[0] for k in ("domain", "body")}
        for poses in ("particles", "particles_domain"):
            recon = _reconstruct(os.path.join(folder, f"{poses}.star"))
            for region, mask in masks.items():
                corr[sigma, poses, region] = _masked_corr(recon, full, mask)
    domain_loss = corr[0.0, "particles", "domain"] - corr[7.0, "particles", "domain"]
    body_loss = corr[0.0, "particles", "body"] - corr[7.0, "particles", "body"]
    assert domain_loss > 0.01 and domain_loss > 3 * body_loss
    # with the domain's true poses instead, the domain sharpens and the body blurs
    assert corr[7.0, "particles_domain", "domain"] > corr[7.0, "particles", "domain"]
    assert corr[7.0, "particles_domain", "body"] < corr[7.0, "particles", "body"]
