"""CuPy kernels against their numpy twins (skipped without a GPU)."""
import os

import numpy as np
import pytest

from cryocv.backend import to_numpy
from cryocv.ctf import ctf_half_plane
from cryocv.fourier import ft2_centered
from cryocv.geometry import random_rotations
from cryocv.projector import (accumulators_to_map, empty_accumulators, extract_slices, frequency_points,
                              insert_slices, prepare_volume)
from .conftest import blob_volume, needs_gpu

pytestmark = needs_gpu


@pytest.fixture
def memory_sampling(monkeypatch):
    """The search samples the reference in software (the exact twin of the CPU's arithmetic)."""
    from cryocv import kernels
    monkeypatch.setattr(kernels, "SAMPLING", "memory")


@pytest.mark.parametrize("n", [32, 33, 64])
def test_extract_kernel_matches_numpy(n):
    import cupy as cp
    vol = blob_volume(n, seed=1)
    rot = random_rotations(40, np.random.default_rng(0)).astype(np.float32)
    cpu = extract_slices(prepare_volume(vol), rot, frequency_points(n))
    gpu = extract_slices(prepare_volume(cp.asarray(vol)), cp.asarray(rot), frequency_points(n, xp=cp))
    np.testing.assert_allclose(to_numpy(gpu), cpu, rtol=1e-4, atol=1e-4 * np.abs(cpu).max())


@pytest.mark.parametrize("n", [32, 33, 64])
def test_texture_extraction_matches_numpy(n):
    """Slices for scores (``for_scores``: the texture units' trilinear filter) agree with numpy's
    to 0.5 % of the largest value; without ``for_scores`` they are the exact twin."""
    import cupy as cp
    from cryocv import kernels
    vol = blob_volume(n, seed=2)
    rot = random_rotations(40, np.random.default_rng(1)).astype(np.float32)
    cpu = extract_slices(prepare_volume(vol), rot, frequency_points(n))
    volume = prepare_volume(cp.asarray(vol))
    textured = to_numpy(extract_slices(volume, cp.asarray(rot), frequency_points(n, xp=cp), for_scores=True))
    exact = to_numpy(extract_slices(volume, cp.asarray(rot), frequency_points(n, xp=cp)))
    np.testing.assert_allclose(textured, cpu, atol=5e-3 * np.abs(cpu).max())
    np.testing.assert_allclose(exact, cpu, rtol=1e-4, atol=1e-4 * np.abs(cpu).max())
    assert kernels.SAMPLING == "memory" or np.abs(textured - exact).max() > 0      # the texture path ran
    kernels.release_texture()


@pytest.mark.parametrize("n", [32, 33])
def test_insert_kernel_matches_numpy(n):
    import cupy as cp
    rng = np.random.default_rng(2)
    pts = frequency_points(n)
    rot = random_rotations(60, rng).astype(np.float32)
    vals = (rng.normal(size=(60, pts.kx.size)) + 1j * rng.normal(size=(60, pts.kx.size))).astype(np.complex64)
    wts = rng.uniform(0.1, 1, size=(60, pts.kx.size)).astype(np.float32)
    d_cpu, w_cpu = empty_accumulators(n)
    insert_slices(d_cpu, w_cpu, rot, pts, vals, wts)
    d_gpu, w_gpu = empty_accumulators(n, xp=cp)
    insert_slices(d_gpu, w_gpu, cp.asarray(rot), frequency_points(n, xp=cp), cp.asarray(vals), cp.asarray(wts))
    np.testing.assert_allclose(to_numpy(w_gpu), w_cpu, atol=1e-4 * w_cpu.max())
    np.testing.assert_allclose(to_numpy(d_gpu), d_cpu, atol=1e-4 * np.abs(d_cpu).max())


@pytest.mark.parametrize("n", [32, 33, 64])
def test_fused_subdivision_scores_match_numpy(n, memory_sampling):
    """The fused kernel (slices sampled and scored in one pass) gives numpy's extract-then-score
    children scores, with CTF and whitening, at a cutoff below Nyquist and at Nyquist."""
    import cupy as cp
    from cryocv.search import image_terms, point_weights, rotation_children, shift_children, subdivision_scores
    rng = np.random.default_rng(3)
    vol = blob_volume(n, seed=4)
    b, k = 5, 6
    parents = random_rotations(b * k, rng).astype(np.float32).reshape(b, k, 3, 3)
    shifts = rng.normal(0, 2, (b, k, 2)).astype(np.float32)
    images = (rng.normal(size=(b, n, n // 2 + 1)) + 1j * rng.normal(size=(b, n, n // 2 + 1))).astype(np.complex64)
    ctf = rng.uniform(-1, 1, (b, n, n // 2 + 1)).astype(np.float32)
    noise = rng.uniform(0.5, 2, n // 2 + 1).astype(np.float32)
    for cutoff in (n / 5, n / 2):
        scores = []
        for xp, fused in ((np, False), (cp, True), (cp, False)):
            dev = (lambda a: a) if xp is np else cp.asarray
            points = frequency_points(n, cutoff, xp)
            terms = image_terms(dev(images), dev(ctf), points, point_weights(points, dev(noise)))
            rot = rotation_children(dev(parents), np.radians(3.0))
            sh = shift_children(dev(shifts), 0.5)
            scores.append(to_numpy(subdivision_scores(prepare_volume(dev(vol)), terms, points, rot, sh, fused=fused)))
        cpu, fused_gpu, unfused_gpu = scores
        assert cpu.shape == fused_gpu.shape == (b, k, 4, 8)
        np.testing.assert_allclose(fused_gpu, cpu, rtol=2e-4, atol=2e-4 * np.abs(cpu).max())
        np.testing.assert_allclose(fused_gpu, unfused_gpu, rtol=2e-4, atol=2e-4 * np.abs(cpu).max())


@pytest.mark.parametrize("n", [32, 33, 64])
def test_texture_sampled_scores_match_numpy(n):
    """The fused scores with the reference sampled by the texture units' trilinear filter (8-bit
    weights) give numpy's extract-then-score children scores to 0.5 % of the largest; a second
    volume gets a texture of its own (the cached one is not reused)."""
    import cupy as cp
    from cryocv import kernels
    from cryocv.search import image_terms, point_weights, rotation_children, shift_children, subdivision_scores
    rng = np.random.default_rng(5)
    b, k = 6, 5
    parents = random_rotations(b * k, rng).astype(np.float32).reshape(b, k, 3, 3)
    shifts = rng.normal(0, 2, (b, k, 2)).astype(np.float32)
    images = (rng.normal(size=(b, n, n // 2 + 1)) + 1j * rng.normal(size=(b, n, n // 2 + 1))).astype(np.complex64)
    ctf = rng.uniform(-1, 1, (b, n, n // 2 + 1)).astype(np.float32)
    noise = rng.uniform(0.5, 2, n // 2 + 1).astype(np.float32)
    for seed in (6, 7):
        vol = blob_volume(n, seed=seed)
        for cutoff in (n / 5, n / 2):
            points_cpu, points_gpu = frequency_points(n, cutoff), frequency_points(n, cutoff, cp)
            cpu = subdivision_scores(prepare_volume(vol), image_terms(images, ctf, points_cpu, point_weights(points_cpu, noise)),
                                     points_cpu, rotation_children(parents, np.radians(3.0)),
                                     shift_children(shifts, 0.5), fused=False)
            terms = image_terms(cp.asarray(images), cp.asarray(ctf), points_gpu, point_weights(points_gpu, cp.asarray(noise)))
            rot = rotation_children(cp.asarray(parents), np.radians(3.0)).reshape(b, k, 8, 3, 3)
            gpu = to_numpy(kernels.score_groups_gpu(prepare_volume(cp.asarray(vol)), rot,
                                                    shift_children(cp.asarray(shifts), 0.5), points_gpu.kx,
                                                    points_gpu.ky, terms.data, terms.ctf2, 2, n, sampling="texture"))
            np.testing.assert_allclose(gpu, cpu, atol=5e-3 * np.abs(cpu).max())
    kernels.release_texture()


@pytest.mark.parametrize("sampling", ["memory", "texture"])
@pytest.mark.parametrize("n_shifts", [1, 13, 16, 30])
def test_fused_pose_scores_match_numpy(n_shifts, sampling, monkeypatch):
    """score_poses (per-image rotations × shifts, e.g. a narrowed local start) on the GPU — fused up
    to 16 shifts, extract-then-score beyond — gives numpy's scores, rotations not a multiple of 4
    (to float rounding sampling memory, to 0.5 % of the largest score through the texture units)."""
    import cupy as cp
    from cryocv import kernels
    from cryocv.search import score_poses
    monkeypatch.setattr(kernels, "SAMPLING", sampling)
    n, b, r = 40, 3, 33
    rng = np.random.default_rng(8)
    vol = blob_volume(n, seed=9)
    rotations = random_rotations(b * r, rng).astype(np.float32).reshape(b, r, 3, 3)
    shifts = rng.normal(0, 2, (b, n_shifts, 2)).astype(np.float32)
    images = (rng.normal(size=(b, n, n // 2 + 1)) + 1j * rng.normal(size=(b, n, n // 2 + 1))).astype(np.complex64)
    ctf = rng.uniform(-1, 1, (b, n, n // 2 + 1)).astype(np.float32)
    noise = rng.uniform(0.5, 2, n // 2 + 1).astype(np.float32)
    cpu = score_poses(prepare_volume(vol), images, ctf, noise, rotations, shifts, 13.0)
    gpu = to_numpy(score_poses(prepare_volume(cp.asarray(vol)), cp.asarray(images), cp.asarray(ctf),
                               cp.asarray(noise), cp.asarray(rotations), cp.asarray(shifts), 13.0))
    assert cpu.shape == gpu.shape == (b, n_shifts, r)
    if sampling == "memory":
        np.testing.assert_allclose(gpu, cpu, rtol=2e-4, atol=2e-4 * np.abs(cpu).max())
    else:
        np.testing.assert_allclose(gpu, cpu, atol=5e-3 * np.abs(cpu).max())
    kernels.release_texture()


def test_reconstruction_gpu_equals_cpu():
    import cupy as cp
    n = 32
    vol = blob_volume(n, seed=3)
    rng = np.random.default_rng(4)
    rot = random_rotations(500, rng).astype(np.float32)
    params = np.tile([15000, 14000, 30, 300, 2.7, 0.1, 0, 0, 1], (500, 1)).astype(np.float64)
    maps = []
    for xp in (np, cp):
        pts = frequency_points(n, xp=xp)
        rot_x = xp.asarray(rot)
        ctf = pts.gather(ctf_half_plane(xp.asarray(params), n, 2.0))
        slices = extract_slices(prepare_volume(xp.asarray(vol)), rot_x, pts) * ctf
        data, weight = empty_accumulators(n, xp=xp)
        insert_slices(data, weight, rot_x, pts, slices * ctf, ctf * ctf)
        maps.append(to_numpy(accumulators_to_map(data, weight, n)))
    np.testing.assert_allclose(maps[1], maps[0], atol=1e-4 * np.abs(maps[0]).max())


def test_ctf_and_fft_match_numpy():
    import cupy as cp
    rng = np.random.default_rng(5)
    params = np.column_stack([rng.uniform(8000, 20000, 8), rng.uniform(8000, 20000, 8), rng.uniform(-90, 90, 8),
                              np.full(8, 300), np.full(8, 2.7), np.full(8, 0.07), rng.uniform(0, 90, 8),
                              rng.uniform(0, 50, 8), np.ones(8)])
    np.testing.assert_allclose(to_numpy(ctf_half_plane(cp.asarray(params), 48, 1.3)), ctf_half_plane(params, 48, 1.3),
                               atol=1e-5)
    imgs = rng.normal(size=(4, 48, 48)).astype(np.float32)
    np.testing.assert_allclose(to_numpy(ft2_centered(cp.asarray(imgs))), ft2_centered(imgs), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("n", [40, 41])
def test_threshold_mask_and_fsc_on_gpu_match_numpy(n):
    """The dynamic mask's distance transform (cupyx on the GPU, scipy on the CPU) and the
    phase-randomized FSC (noise phases kept between calls) agree between devices."""
    import cupy as cp
    from cryocv.fsc import gold_standard_fsc
    from cryocv.masks import auto_threshold_mask
    vol = blob_volume(n, seed=5)
    cpu = auto_threshold_mask(vol, 1.5)
    gpu = auto_threshold_mask(cp.asarray(vol), 1.5)
    assert isinstance(gpu, cp.ndarray)
    np.testing.assert_allclose(to_numpy(gpu), cpu, atol=1e-5)
    noisy = [vol + 0.3 * np.random.default_rng(s).normal(size=vol.shape).astype(np.float32) for s in (1, 2)]
    for _ in range(2):  # the second call reuses the cached noise phases
        a = gold_standard_fsc(*noisy, 1.5, mask=cpu, seed=3)
        b = gold_standard_fsc(*[cp.asarray(m) for m in noisy], 1.5, mask=gpu, seed=3)
        np.testing.assert_allclose(b["fsc_corrected"], a["fsc_corrected"], atol=1e-5)
        assert b["resolution_A"] == pytest.approx(a["resolution_A"], rel=1e-4)


@pytest.mark.parametrize("n", [32, 33])
def test_subtraction_on_gpu_matches_numpy(n):
    """Signal model, scale fit, subtraction, re-centring and cropping (cryocv/subtraction.py) give
    the same on CuPy as on numpy."""
    import cupy as cp
    from cryocv.masks import spherical_mask
    from cryocv.simulate import clean_projections
    from cryocv.subtraction import center_of_mass, output_images, recentring_shifts, subtract_batch, subtraction_volumes
    vol = blob_volume(n, seed=6)
    keep = np.roll(spherical_mask(n, n / 5, 2.0), (2, -3, 4), axis=(0, 1, 2))
    rng = np.random.default_rng(7)
    b = 24
    rot = random_rotations(b, rng).astype(np.float32)
    origin = rng.normal(0, 2, (b, 2)).astype(np.float32)
    params = np.tile([15000, 14000, 30, 300, 2.7, 0.1, 0, 0, 1], (b, 1)).astype(np.float64)
    params[:, :2] += rng.uniform(-5000, 5000, (b, 1))
    clean = clean_projections(prepare_volume(vol), rot, origin, ctf_half_plane(params, n, 2.0), n)
    images = (clean * rng.uniform(0.7, 1.4, (b, 1, 1)) + 0.3 * rng.normal(size=clean.shape) * clean.std())
    results = []
    for xp in (np, cp):
        full_ft, subtract_ft = subtraction_volumes(xp.asarray(vol), xp.asarray(keep))
        images_ft = ft2_centered(xp.asarray(images.astype(np.float32))).astype(xp.complex64)
        subtracted, scales = subtract_batch(images_ft, ctf_half_plane(xp.asarray(params), n, 2.0), xp.asarray(rot),
                                            xp.asarray(origin), full_ft, subtract_ft, r_max_px=n / 3)
        shifts, new_origin = recentring_shifts(xp.asarray(rot), xp.asarray(origin), center_of_mass(xp.asarray(keep)))
        out = output_images(subtracted, shifts, new_box=16)
        results.append([to_numpy(a) for a in (scales, shifts, new_origin, out)])
    (scales, shifts, new_origin, out), gpu = results
    np.testing.assert_allclose(gpu[0], scales, rtol=1e-4)
    np.testing.assert_array_equal(gpu[1], shifts)
    np.testing.assert_allclose(gpu[2], new_origin, atol=1e-4)
    np.testing.assert_allclose(gpu[3], out, atol=1e-4 * np.abs(out).max())
    assert out.shape == (b, 16, 16) and 0.6 < np.median(scales) < 1.5


def test_subtract_job_on_gpu_writes_what_the_cpu_writes(tmp_path):
    """`cryocv subtract --device gpu` (ParticleSource batches on the GPU) against --device cpu."""
    from cryocv.io.mrc import write_map
    from cryocv.io.particle_files import load_particles
    from cryocv.jobs.subtract import SubtractParams, run
    from cryocv.masks import spherical_mask
    from cryocv.simulate import simulate
    n = 32
    vol = blob_volume(n, seed=8)
    write_map(str(tmp_path / "map.mrc"), vol, 2.0)
    write_map(str(tmp_path / "keep.mrc"), np.roll(spherical_mask(n, 5.0, 2.0), (3, 0, -4), axis=(0, 1, 2)), 2.0)
    simulate(vol, 2.0, 200, str(tmp_path / "sim"), snr=1.0, seed=2, progress=False)
    outputs = []
    for device in ("cpu", "gpu"):
        out = str(tmp_path / device)
        run(str(tmp_path / "sim" / "particles.star"), [str(tmp_path / "map.mrc")] * 2, str(tmp_path / "keep.mrc"), out,
            SubtractParams(recenter=True, new_box=24, batch_size=64), device=device, progress=False)
        outputs.append(load_particles(os.path.join(out, "particles.star")))
    cpu, gpu = outputs
    np.testing.assert_allclose(gpu.origin_A, cpu.origin_A, atol=1e-3)
    images = cpu.read_images()
    np.testing.assert_allclose(gpu.read_images(), images, atol=1e-4 * np.abs(images).max())


@pytest.mark.parametrize("shape", [(300, 4608, 32), (257, 256, 16), (64, 33, 32), (5, 7, 3), (3, 12000, 8)])
def test_top_k_kernel_matches_numpy(shape):
    """top_k_kernel.top_k_gpu picks the same indices as numpy's argpartition + argsort (distinct values),
    best first; with −∞ and NaN in the rows it picks the same values, ties to the lower index."""
    import cupy as cp
    from cryocv.top_k_kernel import top_k_gpu
    from cryocv.search import _top_k
    b, length, k = shape
    rng = np.random.default_rng(length)
    scores = rng.permutation(b * length).reshape(b, length).astype(np.float32) / (b * length)
    np.testing.assert_array_equal(to_numpy(top_k_gpu(cp.asarray(scores), k)), _top_k(scores, k))
    np.testing.assert_array_equal(to_numpy(_top_k(cp.asarray(scores), k)), _top_k(scores, k))
    scores[:, ::3] = -np.inf                       # outside a local search's extents: ties
    scores[:, 1::7] = np.nan
    picked = to_numpy(top_k_gpu(cp.asarray(scores), k))
    ranked = np.where(np.isnan(scores), -np.inf, scores)
    expected = np.argsort(-ranked, axis=1, kind="stable")[:, :k]       # stable: ties to the lower index
    np.testing.assert_array_equal(picked, expected)


def test_local_search_on_gpu_matches_numpy():
    """local_start + subdivide with extents (cryocv/local_search.py) choose the same poses on both devices."""
    import cupy as cp
    from cryocv.geometry import angular_distance_deg
    from cryocv.local_search import LocalPrior, local_start, rotation_offsets
    from cryocv.search import SearchParams, search_schedule, subdivide
    from cryocv.simulate import clean_projections
    n = 40
    vol = blob_volume(n, seed=5)
    rng = np.random.default_rng(6)
    truth = random_rotations(24, rng).astype(np.float32)
    from cryocv.geometry import axis_angle_to_matrix
    delta = axis_angle_to_matrix(rng.normal(0, 0.06, (24, 3))).astype(np.float32)
    prior_rot = truth @ delta
    origins = rng.normal(0, 1, (24, 2)).astype(np.float32)
    images = ft2_centered(clean_projections(prepare_volume(vol), truth, origins, None, n)).astype(np.complex64)
    params = SearchParams(base_step_deg=4.0, fine_step_deg=1.0, max_shift_px=2.0)
    levels = search_schedule(n, n / 2, params)
    noise = np.ones(n // 2 + 1, np.float32)
    results = []
    for xp in (np, cp):
        dev = (lambda a: a) if xp is np else cp.asarray
        prior = LocalPrior(dev(prior_rot), dev(origins), np.radians(12), 2.0)
        volume = prepare_volume(dev(vol))
        offsets = dev(rotation_offsets(np.radians(12), levels[0].rotation_step_rad))
        start = local_start(volume, dev(images), None, dev(noise), levels[0], prior, offsets, 8)
        results.append(subdivide(volume, dev(images), None, dev(noise), levels, params, start, prior=prior))
    cpu, gpu = results
    assert np.median(angular_distance_deg(to_numpy(gpu.rotations), cpu.rotations)) < 0.05
    assert np.median(angular_distance_deg(cpu.rotations, truth)) < 1.5
    np.testing.assert_allclose(to_numpy(gpu.shifts_px), cpu.shifts_px, atol=0.05)


def test_one_half_on_device_on_gpu_matches_numpy():
    """Large-box mode on the GPU: half-set grids moved to page-locked host buffers and back give
    the half-maps the numpy twin gives, also when a second run takes the first run's buffers."""
    import gc
    import cupy as cp
    from cryocv.accumulate import Accumulators, quarter_split
    from cryocv.symmetry import symmetry_operators
    n = 24
    rng = np.random.default_rng(1)
    half_set = np.repeat([1, 2], 30)
    quarters = quarter_split(half_set, seed=2)
    rot = random_rotations(60, rng).astype(np.float32)
    vals = (rng.normal(size=(60, frequency_points(n).kx.size))
            + 1j * rng.normal(size=(60, frequency_points(n).kx.size))).astype(np.complex64)
    wts = rng.uniform(0.1, 1, size=vals.shape).astype(np.float32)
    maps = []
    for xp, one_half in ((np, False), (cp, True), (cp, True)):       # the second GPU run reuses the host buffers
        acc = None
        gc.collect()
        acc = Accumulators(n, symmetry_operators("C1"), xp, quarters, one_half_on_device=one_half)
        pts = frequency_points(n, xp=xp)
        for h in (1, 2):
            idx = np.nonzero(half_set == h)[0]
            acc.insert(h, idx, xp.asarray(rot[idx]), pts, xp.asarray(vals[idx]), xp.asarray(wts[idx]))
        maps.append([to_numpy(m) for m in acc.half_maps()] + [to_numpy(acc.quarter(1, 0)[0])])
        assert isinstance(acc._host.get((1, 0), (None,))[0], (np.ndarray, type(None)))
    for other in maps[1:]:
        for a, b in zip(maps[0], other):
            np.testing.assert_allclose(b, a, atol=1e-4 * np.abs(a).max())


def test_map_alignment_and_sgd_step_on_gpu_match_numpy():
    """cryocv.register (trilinear sampling of 3D maps, alignment) and cryocv.sgd (preconditioned
    step, sampled start) give on the GPU what they give with numpy."""
    import cupy as cp
    from cryocv.geometry import axis_angle_to_matrix
    from cryocv.register import MIRROR, MapTransform, align_maps, transform_volume
    from cryocv.search import Candidates
    from cryocv.sgd import HalfSetSGD, sample_start, sgd_update
    from .conftest import asymmetric_map
    n = 32
    vol = asymmetric_map(n, seed=2)
    T = MapTransform(MIRROR @ axis_angle_to_matrix(np.array([0.3, 1.1, -0.4])), np.array([1.0, -0.5, 2.0]))
    moved = transform_volume(vol, T)
    np.testing.assert_allclose(to_numpy(transform_volume(cp.asarray(vol), T)), moved, atol=1e-4 * np.abs(moved).max())
    cpu, gpu = align_maps(vol, moved, 2.0, 8.0), align_maps(cp.asarray(vol), cp.asarray(moved), 2.0, 8.0)
    assert cpu.flips_hand and gpu.flips_hand
    np.testing.assert_allclose(gpu.matrix, cpu.matrix, atol=2e-3)
    np.testing.assert_allclose(gpu.shift_px, cpu.shift_px, atol=0.05)
    # the refinement's half-set registration: Fourier crop and the local search from the identity
    from cryocv.fourier import fourier_crop
    from cryocv.register import align_maps_locally
    np.testing.assert_allclose(to_numpy(fourier_crop(cp.asarray(vol), 24)), fourier_crop(vol, 24),
                               atol=1e-5 * np.abs(vol).max())
    drift = MapTransform(axis_angle_to_matrix(np.radians(3.0) * np.array([0.6, 0.0, 0.8])), np.array([0.5, 0, -1.0]))
    drifted = transform_volume(vol, drift)
    for max_box in (96, 24):                     # whole box, and Fourier-cropped
        cpu, gpu = (align_maps_locally(vol, drifted, 2.0, 6.0, max_box=max_box),
                    align_maps_locally(cp.asarray(vol), cp.asarray(drifted), 2.0, 6.0, max_box=max_box))
        assert angular_distance_deg(gpu.matrix, cpu.matrix) < 0.1         # the polish ends at one optimum whichever cell won
        np.testing.assert_allclose(gpu.shift_px, cpu.shift_px, atol=0.05)
    rng = np.random.default_rng(3)
    rot = random_rotations(50, rng).astype(np.float32)
    pts = frequency_points(n)
    vals = (rng.normal(size=(50, pts.kx.size)) + 1j * rng.normal(size=(50, pts.kx.size))).astype(np.complex64)
    wts = rng.uniform(0.1, 1, size=vals.shape).astype(np.float32)
    volumes = []
    for xp in (np, cp):
        data, weight = empty_accumulators(n, xp=xp)
        insert_slices(data, weight, xp.asarray(rot), frequency_points(n, xp=xp), xp.asarray(vals), xp.asarray(wts))
        state = HalfSetSGD.start(xp.asarray(vol), 10.0)
        sgd_update(state, data, weight, 50, 8.0, 0.4, 0.5, xp.ones((n,) * 3, dtype=xp.float32), 0.95)
        volumes.append(to_numpy(state.volume))
    np.testing.assert_allclose(volumes[1], volumes[0], atol=1e-4 * np.abs(volumes[0]).max())
    scores = rng.normal(0, 3, (20, 6)).astype(np.float32)
    cands = Candidates(random_rotations(120, rng).reshape(20, 6, 3, 3).astype(np.float32),
                       rng.normal(0, 1, (20, 6, 2)).astype(np.float32), scores)
    u = rng.random(20)
    picked = [sample_start(Candidates(*(xp.asarray(a) for a in (cands.rotations, cands.shifts_px, cands.scores))),
                           xp.asarray(u), 1.0) for xp in (np, cp)]
    np.testing.assert_array_equal(to_numpy(picked[1].scores), picked[0].scores)


def test_relaxed_poses_on_gpu_match_numpy():
    """cryocv.relax.relaxed_poses (maximization over the symmetry mates) picks the same mates and
    poses on both devices."""
    import cupy as cp
    from cryocv.relax import relaxed_poses, symmetrized
    from cryocv.search import SearchParams, SearchResult, search_schedule
    from cryocv.simulate import clean_projections
    from cryocv.symmetry import symmetry_operators
    from .conftest import asymmetric_map
    n = 32
    ops = symmetry_operators("C4")
    vol = symmetrized(asymmetric_map(n, seed=8), ops) * 4 + asymmetric_map(n, seed=9, n_atoms=6)
    rng = np.random.default_rng(2)
    truth = random_rotations(30, rng).astype(np.float32)
    images = ft2_centered(clean_projections(prepare_volume(vol), truth, np.zeros((30, 2), np.float32), None, n))
    start = np.einsum("bij,bjk->bik", truth, np.transpose(ops[rng.integers(0, 4, 30)], (0, 2, 1))).astype(np.float32)
    params = SearchParams(base_step_deg=15.0, fine_step_deg=1.0, max_shift_px=2.0)
    levels = search_schedule(n, n / 2, params)[-3:]
    out = []
    for xp in (np, cp):
        best = SearchResult(xp.asarray(start), xp.zeros((30, 2), dtype=xp.float32), xp.zeros(30, dtype=xp.float32))
        found, choice = relaxed_poses(prepare_volume(xp.asarray(vol)), xp.asarray(images.astype(np.complex64)), None,
                                      xp.ones(n // 2 + 1, dtype=xp.float32), best, ops, levels, params)
        out.append((to_numpy(found.rotations), to_numpy(choice)))
    assert np.mean(out[0][1] == out[1][1]) >= 0.95
    from cryocv.geometry import angular_distance_deg
    assert np.median(angular_distance_deg(out[1][0], out[0][0])) < 0.1


def test_mode_spread_on_gpu_matches_numpy(memory_sampling):
    """cryocv.relax.mode_spread (marginalization inside the chosen mode) gives the same weighted
    poses on both devices."""
    import cupy as cp
    from cryocv.geometry import angular_distance_deg
    from cryocv.relax import mode_spread
    from cryocv.search import SearchLevel, SearchResult
    from cryocv.simulate import clean_projections
    from .conftest import asymmetric_map
    n = 32
    vol = asymmetric_map(n, seed=4)
    rng = np.random.default_rng(3)
    truth = random_rotations(20, rng).astype(np.float32)
    clean = clean_projections(prepare_volume(vol), truth, np.zeros((20, 2), np.float32), None, n)
    added = rng.normal(0, 2 * clean.std(), clean.shape).astype(np.float32)
    images = ft2_centered(clean + added).astype(np.complex64)
    noise = np.full(n // 2 + 1, np.mean(np.abs(ft2_centered(added)) ** 2), np.float32)
    level = SearchLevel(np.radians(1.0), 0.5, n / 2)
    out = []
    for xp in (np, cp):
        best = SearchResult(xp.asarray(truth), xp.zeros((20, 2), dtype=xp.float32), xp.zeros(20, dtype=xp.float32))
        spread = mode_spread(prepare_volume(xp.asarray(vol)), xp.asarray(images), None, xp.asarray(noise), best, level)
        out.append([to_numpy(a) for a in (spread.rotations, spread.shifts_px, spread.weights)])
    (rot_c, sh_c, w_c), (rot_g, sh_g, w_g) = out
    np.testing.assert_allclose(w_g.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(w_g[:, 0], w_c[:, 0], atol=2e-3)          # the heaviest pose's weight
    assert np.median(angular_distance_deg(rot_g[:, 0], rot_c[:, 0])) < 0.01
    np.testing.assert_allclose(sh_g[:, 0], sh_c[:, 0], atol=1e-4)


def test_register_over_group_on_gpu_matches_numpy():
    """cryocv.relax.register_over_group (half-set registration on the asymmetric parts) finds the
    same operator on both devices for every operator of T, with the same agreement value."""
    import cupy as cp
    from cryocv.register import MapTransform, transform_volume
    from cryocv.relax import asymmetric_agreement, register_over_group
    from .test_relax import pseudo_symmetric_map
    vol, ops = pseudo_symmetric_map(32, "T", partner_height=0.05)
    for k in (1, 5, 10):
        turned = transform_volume(vol, MapTransform(ops[k].T, np.zeros(3)))
        found = [register_over_group(xp.asarray(vol), xp.asarray(turned), ops, pixel_size_A=2.0, resolution_A=6.0)[0]
                 for xp in (np, cp)]
        assert found == [k, k]
        agreement = [asymmetric_agreement(xp.asarray(vol), xp.asarray(turned), ops, pixel_size_A=2.0,
                                          resolution_A=6.0)[1] for xp in (np, cp)]
        assert agreement[1] == pytest.approx(agreement[0], abs=1e-4)


def test_nu_filter_on_gpu_matches_numpy():
    """cryocv.nonuniform.nu_filter (quarter-map cross-validation, windowed loss, blended filters)
    gives on the GPU the filtered map and the cutoff field the numpy twin gives."""
    import cupy as cp
    from cryocv.nonuniform import nu_filter
    n = 32
    vol = blob_volume(n)
    rng = np.random.default_rng(3)
    quarters = [(vol + rng.normal(0, 0.3 * vol.std(), vol.shape)).astype(np.float32) for _ in range(2)]
    half = ((quarters[0] + quarters[1]) / 2).astype(np.float32)
    out = [[to_numpy(a) for a in nu_filter(xp.asarray(half), xp.asarray(quarters[0]), xp.asarray(quarters[1]),
                                           n_cutoffs=12)] for xp in (np, cp)]
    (filtered_cpu, cutoff_cpu), (filtered_gpu, cutoff_gpu) = out
    np.testing.assert_allclose(filtered_gpu, filtered_cpu, atol=1e-3 * np.abs(filtered_cpu).max())
    assert np.mean(np.abs(cutoff_gpu - cutoff_cpu) < 1e-3) > 0.99       # ties may break either way


@pytest.mark.parametrize("box_size, pixel_size_A", [(128, 1.2), (65, 2.1)])
def test_ctf_kernel_matches_numpy(box_size, pixel_size_A):
    """ctf_kernel.ctf_half_plane_gpu (one kernel) against evaluate_ctf's array expression on the CPU:
    astigmatic, phase-plate, B-factor and scaled CTFs agree to float32 rounding."""
    import cupy as cp
    from cryocv.ctf import CTFParams, ctf_half_plane
    from cryocv.ctf_kernel import ctf_half_plane_gpu
    rng = np.random.default_rng(box_size)
    b = 37
    params = CTFParams(defocus_u_A=rng.uniform(5e3, 3e4, b), defocus_v_A=rng.uniform(5e3, 3e4, b),
                       defocus_angle_deg=rng.uniform(-180, 180, b), voltage_kV=rng.choice([200.0, 300.0], b),
                       cs_mm=rng.uniform(0, 2.7, b), amplitude_contrast=rng.uniform(0.0, 0.2, b),
                       phase_shift_deg=rng.uniform(0, 90, b), bfactor_A2=rng.uniform(-50, 100, b),
                       scale=rng.uniform(0.5, 1.0, b)).as_matrix()
    expected = ctf_half_plane(params, box_size, pixel_size_A)
    got = ctf_half_plane_gpu(cp.asarray(params), box_size, pixel_size_A)
    assert got.dtype == cp.float32 and got.shape == expected.shape
    np.testing.assert_allclose(to_numpy(got), expected, rtol=0, atol=2e-6)
    np.testing.assert_array_equal(to_numpy(ctf_half_plane(cp.asarray(params), box_size, pixel_size_A)), to_numpy(got))


def test_tf32_score_products_match_numpy(monkeypatch):
    """With CRYOCV_GPU_PRODUCTS=tf32 the base level's image × slice products run on the tensor
    cores: scores within 1 % of the largest of numpy's float32 ones and different from the float32
    GPU run (the switch takes effect), the same again once it is undone."""
    import cupy as cp
    from cryocv import backend
    from cryocv.search import ImageTerms, score_base
    b, r, t, m = 64, 300, 9, 400
    rng = np.random.default_rng(18)
    data = (rng.normal(size=(b, m)) + 1j * rng.normal(size=(b, m))).astype(np.complex64)
    ctf2 = rng.uniform(0.1, 1, (b, m)).astype(np.float32)
    slices = (rng.normal(size=(r, m)) + 1j * rng.normal(size=(r, m))).astype(np.complex64)
    phases = np.exp(1j * rng.uniform(-np.pi, np.pi, (t, m))).astype(np.complex64)
    cpu = score_base(ImageTerms(data, ctf2), slices, phases)
    args = (ImageTerms(cp.asarray(data), cp.asarray(ctf2)), cp.asarray(slices), cp.asarray(phases))
    fp32 = to_numpy(score_base(*args))
    monkeypatch.setattr(backend, "SCORE_PRODUCTS", "tf32")
    tf32 = to_numpy(score_base(*args))
    monkeypatch.setattr(backend, "SCORE_PRODUCTS", "fp32")
    np.testing.assert_allclose(fp32, cpu, rtol=1e-4, atol=1e-4 * np.abs(cpu).max())
    np.testing.assert_allclose(tf32, cpu, atol=1e-2 * np.abs(cpu).max())
    assert np.abs(tf32 - fp32).max() > 1e-5 * np.abs(cpu).max()
    np.testing.assert_array_equal(to_numpy(score_base(*args)), fp32)
