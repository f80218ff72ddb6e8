"""Refinement: pose search, regularizers, the refine job and resuming — judged by angular
error against the true poses and FSC against the true map."""
import json
import os

import numpy as np
import pytest

from cryocv.backend import to_device, to_numpy
from cryocv.ctf import ctf_half_plane
from cryocv.fourier import ft2_centered
from cryocv.fsc import fsc_curve, resolution_at
from cryocv.geometry import angular_distance_deg, random_rotations
from cryocv.io.mrc import read_map, write_map
from cryocv.io.particle_files import load_particles
from cryocv.projector import prepare_volume
from cryocv.nonuniform import butterworth_lowpass, nu_candidate_cutoffs, nu_filter
from cryocv.regularize import wiener_regularization
from cryocv.search import (SearchParams, candidates_per_level, rotation_children, search_poses, search_schedule,
                           shift_children, shift_grid)
from cryocv.simulate import clean_projections, random_ctf, simulate
from .conftest import asymmetric_map, blob_volume, needs_gpu


def noisy_images(volume, n_images, snr, seed, xp, max_shift_px=2.0, pixel_size_A=2.0):
    rng = np.random.default_rng(seed)
    rot = random_rotations(n_images, rng).astype(np.float32)
    origin = rng.uniform(-max_shift_px, max_shift_px, (n_images, 2)).astype(np.float32)
    ctf = random_ctf(n_images, rng).as_matrix()
    n = volume.shape[0]
    vol_ft = prepare_volume(to_device(volume, xp))
    ctf = ctf_half_plane(to_device(ctf, xp), n, pixel_size_A)
    images = to_numpy(clean_projections(vol_ft, to_device(rot, xp), to_device(origin, xp), ctf, n))
    images += rng.normal(0, np.sqrt(images.var() / snr), images.shape).astype(np.float32)
    images_ft = ft2_centered(to_device(images, xp)).astype(xp.complex64)
    return vol_ft, images_ft, ctf, rot, origin


def test_search_schedule_halves_steps_and_raises_cutoff():
    levels = search_schedule(64, 20.0, SearchParams(base_step_deg=15, fine_step_deg=0.5))
    steps = [np.degrees(lv.rotation_step_rad) for lv in levels]
    assert steps[0] == pytest.approx(15) and all(b == pytest.approx(a / 2) for a, b in zip(steps, steps[1:]))
    assert np.degrees(levels[-1].rotation_step_rad) <= max(0.5, np.degrees(0.5 / 20)) + 1e-9
    cutoffs = [lv.cutoff_px for lv in levels]
    assert cutoffs == sorted(cutoffs) and cutoffs[-1] == pytest.approx(20.0)


def test_base_level_scores_further_out_and_keeps_more_candidates():
    """The base grid is scored to base_cutoff_times_step / step (beyond the subdivision rule),
    its shift grid follows the subdivision rule, and the candidates kept shrink 32 → 16 → 8 → 4."""
    params = SearchParams(base_step_deg=15, fine_step_deg=0.5, max_shift_px=12)
    levels = search_schedule(128, 40.0, params)
    step = np.radians(15)
    assert levels[0].cutoff_px == pytest.approx(params.base_cutoff_times_step / step)
    assert levels[0].cutoff_px > params.cutoff_times_step / step
    assert levels[0].shift_step_px == pytest.approx(128 / (4 * params.cutoff_times_step / step))
    assert levels[1].cutoff_px == pytest.approx(params.cutoff_times_step / (step / 2))
    assert candidates_per_level(6, params) == [32, 16, 8, 4, 4, 4]
    assert candidates_per_level(3, SearchParams(n_candidates=8, n_base_candidates=4)) == [8, 8, 8]


def test_children_subdivide_cells(xp):
    rot = to_device(random_rotations(3, np.random.default_rng(0)).astype(np.float32), xp)
    step = np.radians(8.0)
    children = to_numpy(rotation_children(rot, step))
    assert children.shape == (3, 8, 3, 3)
    dist = angular_distance_deg(children, to_numpy(rot)[:, None])
    np.testing.assert_allclose(dist, np.degrees(step / 4 * np.sqrt(3)), rtol=1e-3)
    shifts = to_numpy(shift_children(xp.zeros((2, 2), dtype=xp.float32), 2.0))
    np.testing.assert_allclose(np.abs(shifts), 0.5)
    grid = shift_grid(3.0, 1.5)
    assert [0.0, 0.0] in grid.tolist() and np.hypot(*grid.T).max() <= 3.0 + 0.75


def test_search_recovers_poses(xp):
    """Noisy CTF images (SNR 0.5) against the true map: sub-2° median error, shifts to 0.3 px."""
    n = 40
    vol_ft, images_ft, ctf, rot, origin = noisy_images(asymmetric_map(n), 48, 0.5, seed=1, xp=xp)
    params = SearchParams(max_shift_px=3.0)
    levels = search_schedule(n, n / 2, params)
    noise = xp.ones(n // 2 + 1, dtype=xp.float32)
    found = search_poses(vol_ft, images_ft, ctf, noise, levels, params)
    err = angular_distance_deg(to_numpy(found.rotations), rot)
    shift_err = np.linalg.norm(to_numpy(found.shifts_px) - origin, axis=1)
    assert np.median(err) < 2.0 and np.percentile(err, 90) < 4.0, np.sort(err)
    assert np.median(shift_err) < 0.3


@needs_gpu
def test_search_gpu_matches_numpy():
    import cupy as cp
    n = 32
    args_cpu = noisy_images(asymmetric_map(n), 24, 1.0, seed=3, xp=np)
    args_gpu = noisy_images(asymmetric_map(n), 24, 1.0, seed=3, xp=cp)
    params = SearchParams(max_shift_px=2.0)
    levels = search_schedule(n, n / 2, params)
    cpu = search_poses(*args_cpu[:3], np.ones(n // 2 + 1, np.float32), levels, params)
    gpu = search_poses(*args_gpu[:3], cp.ones(n // 2 + 1, dtype=cp.float32), levels, params)
    assert np.median(angular_distance_deg(to_numpy(gpu.rotations), cpu.rotations)) < 0.05
    np.testing.assert_allclose(to_numpy(gpu.scores), cpu.scores, rtol=2e-3)


def test_wiener_term_follows_fsc():
    n, pad = 16, 2
    weight = np.ones((pad * n, pad * n, pad * n // 2 + 1), np.float32)
    fsc = np.linspace(1.0, 0.0, n // 2 + 1)
    term = wiener_regularization(weight, fsc, n, pad)
    from cryocv.fourier import half_volume_radius
    radius = half_volume_radius(pad * n)
    low, high = term[np.abs(radius - 4) < 0.5].mean(), term[np.abs(radius - 12) < 0.5].mean()
    # image shell 2 has FSC 0.75 → (1 − FSC)/FSC = 1/3; shell 6 has 0.25 → 3 (mean weight 1)
    assert low == pytest.approx(1 / 3, rel=0.1) and high == pytest.approx(3.0, rel=0.1)
    assert term[radius > pad * n / 2 + 1].min() > 1e20  # beyond Nyquist: zeroed


def test_butterworth_and_candidates():
    f = nu_candidate_cutoffs(50)
    assert f.size == 50 and f[-1] == pytest.approx(0.5) and np.allclose(np.diff(f), 0.01)
    values = butterworth_lowpass(np.array([0.0, 0.1, 0.2]), 0.1, 8)
    np.testing.assert_allclose(values, [1.0, 1 / np.sqrt(2), 1 / np.sqrt(1 + 2 ** 16)], rtol=1e-6)


def test_nu_filter_adapts_to_local_signal(xp):
    """A slab of fine detail in the middle of the box, noise elsewhere: the CV picks
    high cutoffs in the slab, low ones far from it, and the filtered half-map is
    much closer to the truth than the unfiltered one."""
    n = 48
    rng = np.random.default_rng(0)
    from scipy import ndimage
    truth = np.zeros((n,) * 3, np.float32)
    truth[:, :, 18:30] = rng.normal(size=(n, n, 12))
    truth = ndimage.gaussian_filter(truth, 0.8).astype(np.float32)
    truth[:, :, :16] = 0
    truth[:, :, 32:] = 0
    noise = 0.3 * truth[:, :, 18:30].std()
    qa, qb = (to_device(truth + rng.normal(0, noise, truth.shape).astype(np.float32), xp) for _ in range(2))
    half = (qa + qb) / 2
    filtered, cutoff = nu_filter(half, qa, qb, n_cutoffs=20)
    cutoff = to_numpy(cutoff)
    assert np.median(cutoff[:, :, 20:28]) > 2 * np.median(cutoff[:, :, :4])
    err_filtered = np.mean((to_numpy(filtered) - truth) ** 2)
    err_raw = np.mean((to_numpy(half) - truth) ** 2)
    assert err_filtered < 0.4 * err_raw


def test_joined_half_maps_share_only_their_low_resolution():
    """join_low_resolution: below the join resolution both half-maps hold the mean of the two, above
    it each keeps its own components (the FSC there stays gold-standard)."""
    from cryocv.fourier import rfft_radius_cycles
    from cryocv.regularize import join_low_resolution
    rng = np.random.default_rng(3)
    maps = [rng.normal(size=(32,) * 3).astype(np.float32) for _ in range(2)]
    joined = join_low_resolution(maps, 2.0, 16.0)
    low = rfft_radius_cycles(32, np) <= 2.0 / 16.0
    before, after = [np.fft.rfftn(m) for m in maps], [np.fft.rfftn(m) for m in joined]
    np.testing.assert_allclose(after[0][low], after[1][low], atol=1e-3)
    np.testing.assert_allclose(after[0][low], (before[0][low] + before[1][low]) / 2, atol=1e-3)
    for h in (0, 1):
        np.testing.assert_allclose(after[h][~low], before[h][~low], atol=1e-3)


def test_nu_filter_window_cap_keeps_a_small_particle_sharp():
    """A particle small against its box (fine detail within 8 px of the centre of a 64 px box, noise
    elsewhere): the uncapped windows of the coarse candidates (3 wavelengths: larger than the box)
    average the CV loss over mostly solvent, where leaving out the particle's signal costs nothing,
    so the plain filter low-passes the particle and keeps the noise around it; windows capped at
    an eighth of the box pick high cutoffs in the particle, low ones outside (issue 15)."""
    from scipy import ndimage
    n, rng = 64, np.random.default_rng(0)
    c = np.arange(n) - n // 2
    r = np.sqrt(c[:, None, None] ** 2 + c[None, :, None] ** 2 + c[None, None, :] ** 2)
    truth = (ndimage.gaussian_filter(rng.normal(size=(n,) * 3), 0.8) * (r < 8)).astype(np.float32)
    noise = 0.3 * truth[r < 8].std()
    qa, qb = (truth + rng.normal(0, noise, truth.shape).astype(np.float32) for _ in range(2))
    half = (qa + qb) / 2
    error = lambda m: np.mean((m - truth)[r < 8] ** 2) / np.mean((half - truth)[r < 8] ** 2)  # noqa: E731
    plain, plain_cutoff = nu_filter(half, qa, qb, max_window_fraction=None)   # the paper's windows
    capped, cutoff = nu_filter(half, qa, qb, max_window_fraction=0.125)
    assert np.median(plain_cutoff[r < 6]) < np.median(plain_cutoff[r > 16])   # the failure the cap removes
    assert np.median(cutoff[r < 6]) > 4 * np.median(cutoff[r > 16])
    assert error(capped) < 1 < error(plain)


@needs_gpu
def test_nu_filter_gpu_matches_numpy():
    import cupy as cp
    rng = np.random.default_rng(1)
    maps = [blob_volume(24, seed=2) + rng.normal(0, 0.05, (24,) * 3).astype(np.float32) for _ in range(3)]
    for cap in (None, 0.125):           # the paper's windows, and the default cap
        cpu = nu_filter(*maps, n_cutoffs=10, max_window_fraction=cap)
        gpu = nu_filter(*[cp.asarray(m) for m in maps], n_cutoffs=10, max_window_fraction=cap)
        np.testing.assert_allclose(to_numpy(gpu[0]), cpu[0], atol=1e-4 * np.abs(cpu[0]).max())
        assert np.mean(np.abs(to_numpy(gpu[1]) - cpu[1]) < 1e-4) > 0.99


# ---------------------------------------------------------------------------------------- the job
@pytest.fixture(scope="module")
def refine_case(tmp_path_factory):
    """400 particles (box 32, 2 Å) of an asymmetric map at SNR 0.3 with CTF and a 20 Å start."""
    root = tmp_path_factory.mktemp("refine")
    truth = asymmetric_map(32, seed=8)
    write_map(str(root / "truth.mrc"), truth, 2.0)
    simulate(truth, 2.0, 400, str(root / "sim"), snr=0.3, seed=2, progress=False, shift_sigma_A=2.0)
    return root, truth


@pytest.mark.parametrize("regularizer", ["uniform", "nu"])
def test_refine_recovers_poses_and_map(refine_case, regularizer):
    from cryocv.jobs.refine import RefineParams, run as run_refine
    root, truth = refine_case
    out = str(root / regularizer)
    params = RefineParams(regularizer=regularizer, initial_lowpass_A=20.0, max_iterations=3, nu_cutoffs=20,
                          keep_checkpoints=0)  # all iteration folders stay: their content is checked below
    report = run_refine(str(root / "sim" / "particles.star"), str(root / "truth.mrc"), out, params,
                        device="cpu", progress=False)
    truth_particles = load_particles(str(root / "sim" / "particles.star"))
    refined = load_particles(os.path.join(out, "particles.star"))
    err = angular_distance_deg(refined.rotations, truth_particles.rotations)
    # a search of these images against the true map itself reaches ~4° median (the data's limit)
    assert np.median(err) < 5.5 and np.percentile(err, 90) < 15, np.percentile(err, [50, 90])
    assert np.median(np.linalg.norm(refined.origin_A - truth_particles.origin_A, axis=1)) < 1.0
    np.testing.assert_array_equal(refined.half_set, truth_particles.half_set)
    full, px = read_map(os.path.join(out, "map.mrc"))
    vs_truth = resolution_at(fsc_curve(full, truth), 0.5, 32, 2.0)
    assert vs_truth < 8.0, vs_truth                           # from a 20 Å start
    assert 4.0 <= report["resolution_A"] < 9.0
    with open(os.path.join(out, "fsc.json")) as handle:
        saved = json.load(handle)
    assert saved["resolution_A"] == pytest.approx(report["resolution_A"])
    assert saved["iterations"][-1]["final"] and len(saved["iterations"]) <= 4
    # half-set registration (on by default): recorded after every iteration but the final pass
    from cryocv.jobs.registration import HALF_SET_REGISTRATION
    assert [HALF_SET_REGISTRATION in h for h in saved["iterations"]] == [not h["final"] for h in saved["iterations"]]
    from cryocv.jobs.refine import refine_pose_diagnostics          # ... and the pose plot shows it
    shown = refine_pose_diagnostics(out)["registration"]
    assert [i for i, _, _ in shown] == [h["iteration"] for h in saved["iterations"] if not h["final"]]
    assert os.path.isfile(os.path.join(out, "iterations", "iter_001", "half_map_1.mrc"))
    assert (regularizer == "nu") == os.path.isfile(os.path.join(out, "nu_cutoff_A.mrc"))
    # the job's maps are the final pass's checkpointed maps, linked rather than written twice
    final = os.path.join(out, "iterations", f"iter_{len(saved['iterations']):03d}")
    for name in ("map.mrc", "half_map_1.mrc", "half_map_2.mrc", "mask.mrc"):
        np.testing.assert_array_equal(read_map(os.path.join(out, name))[0], read_map(os.path.join(final, name))[0])
    assert os.path.samefile(os.path.join(out, "map.mrc"), os.path.join(final, "map.mrc"))
    if regularizer == "nu":  # cutoffs between Nyquist and the lowest candidate (1/50 of Nyquist... here 1/20)
        cutoff, _ = read_map(os.path.join(out, "nu_cutoff_A.mrc"))
        assert cutoff.min() >= 4.0 - 1e-3 and cutoff.max() <= 80.0 + 1e-3 and cutoff.std() > 0


def test_marginalized_refine_recovers_poses_and_map(refine_case):
    """--marginalize-step-deg in a global refinement: each particle is inserted at the likelihood-weighted
    poses around its best one; poses as good as with the best pose alone and the map within 10 % of
    its resolution vs truth (the map differs: the option is used); the CLI flag reaches the params;
    it excludes symmetry relaxation."""
    from cryocv.cli import build_parser
    from cryocv.jobs.common import params_from_args
    from cryocv.errors import CryocvError
    from cryocv.jobs.refine import RefineParams, run as run_refine
    root, truth = refine_case
    truth_particles = load_particles(str(root / "sim" / "particles.star"))
    maps, vs_truth = {}, {}
    for name, step in (("best", None), ("spread", 3.0)):
        out = str(root / f"marginalize_{name}")
        run_refine(str(root / "sim" / "particles.star"), str(root / "truth.mrc"), out,
                   RefineParams(regularizer="uniform", initial_lowpass_A=20.0, max_iterations=2,
                                marginalize_step_deg=step), device="cpu", progress=False)
        err = angular_distance_deg(load_particles(os.path.join(out, "particles.star")).rotations,
                                   truth_particles.rotations)
        maps[name], _ = read_map(os.path.join(out, "map.mrc"))
        vs_truth[name] = resolution_at(fsc_curve(maps[name], truth), 0.5, 32, 2.0)
        print(f"{name}: median pose error {np.median(err):.2f}°, {vs_truth[name]:.2f} Å vs truth")
        assert np.median(err) < 5.5, (name, np.median(err))
    assert vs_truth["spread"] < 1.1 * vs_truth["best"] and vs_truth["spread"] < 8.0
    assert not np.allclose(maps["spread"], maps["best"])
    parsed = params_from_args(RefineParams, build_parser().parse_args(
        ["refine", "--particles", "p.star", "--ref", "r.mrc", "--out", "o", "--marginalize-step-deg", "1.5"]))
    assert parsed.marginalize_step_deg == 1.5 and RefineParams().marginalize_step_deg is None
    with pytest.raises(CryocvError, match="exclude each other"):
        RefineParams(marginalize_step_deg=1.0, relax="marginalize", symmetry="C2").validate()


def test_staged_start_caps_then_restarts_each_half_from_its_own_map(refine_case):
    """--staged-start-res-A: the first stage aligns no finer than the cap; when it stops, each half-set's
    next reference is its own (regularized) half-map low-passed to the cap (the two stay different; no
    power beyond it), the second stage aligns finer and has its own iteration budget, the poses and map
    are recovered as well as without the stage, and a job continued from the restart's checkpoint goes
    on as the whole job did."""
    from cryocv.cli import build_parser
    from cryocv.jobs import jobdir
    from cryocv.jobs.checkpoints import CheckpointStore
    from cryocv.jobs.common import params_from_args
    import shutil
    from cryocv.errors import CryocvError
    from cryocv.jobs.loop import STAGE_RESTART
    from cryocv.jobs.refine import RefineParams, run as run_refine
    root, truth = refine_case
    out = str(root / "staged")
    cap_A = 10.0
    report = run_refine(str(root / "sim" / "particles.star"), str(root / "truth.mrc"), out,
                        RefineParams(regularizer="uniform", initial_lowpass_A=20.0, max_iterations=3,
                                     staged_start_res_A=cap_A, keep_checkpoints=0), device="cpu", progress=False)
    history = report["iterations"]
    restarts = [i for i, h in enumerate(history) if STAGE_RESTART in h]
    assert len(restarts) == 1 and history[restarts[0]][STAGE_RESTART] == cap_A
    first, second = history[:restarts[0] + 1], history[restarts[0] + 1:]
    assert 1 <= len(first) <= 3 and 1 <= len([h for h in second if not h["final"]]) <= 3
    assert all(h["alignment_resolution_A"] >= cap_A - 1e-6 for h in first)
    assert second[0]["alignment_resolution_A"] < cap_A and second[-1]["final"]
    folder = CheckpointStore(out).folder(restarts[0] + 1)
    references, half_maps = ([read_map(os.path.join(folder, name))[0] for name in names]
                             for names in (jobdir.REFERENCES, jobdir.HALF_MAPS))
    assert not np.allclose(references[0], references[1])
    k = np.fft.fftfreq(32, d=2.0)                     # cycles/Å
    beyond = np.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2) > 1.25 / cap_A
    beyond_power = lambda volume: (np.abs(np.fft.fftn(volume)) ** 2)[beyond].sum()  # noqa: E731
    for reference, half_map in zip(references, half_maps):     # what is left there: the clipping of negatives
        assert beyond_power(reference) < 0.05 * beyond_power(half_map)
    truth_particles = load_particles(str(root / "sim" / "particles.star"))
    err = angular_distance_deg(load_particles(os.path.join(out, "particles.star")).rotations,
                               truth_particles.rotations)
    assert np.median(err) < 5.5, np.median(err)
    assert resolution_at(fsc_curve(read_map(os.path.join(out, "map.mrc"))[0], truth), 0.5, 32, 2.0) < 8.0
    # a job killed right after the restart's checkpoint continues in the second stage, as the whole job did
    resumed = str(root / "staged_resumed")
    shutil.copytree(out, resumed)
    for folder in CheckpointStore(resumed).folders():
        if int(folder[-3:]) > restarts[0] + 1:
            shutil.rmtree(folder)
    with open(os.path.join(resumed, jobdir.CHECKPOINT), "w") as handle:
        json.dump({"iteration": restarts[0] + 1,
                   "folder": os.path.relpath(CheckpointStore(resumed).folder(restarts[0] + 1), resumed)}, handle)
    again = run_refine(None, None, resumed, resume=True, progress=False)["iterations"]
    summary = lambda h: [(r["iteration"], r["final"], round(r["alignment_resolution_A"], 3), STAGE_RESTART in r)  # noqa: E731
                         for r in h]
    assert summary(again) == summary(history)
    parsed = params_from_args(RefineParams, build_parser().parse_args(
        ["refine", "--particles", "p.star", "--ref", "r.mrc", "--out", "o", "--staged-start-res-A", "8"]))
    assert parsed.staged_start_res_A == 8.0 and RefineParams().staged_start_res_A is None
    with pytest.raises(CryocvError, match="Nyquist"):          # 4 Å here: no cap
        run_refine(str(root / "sim" / "particles.star"), str(root / "truth.mrc"), str(root / "staged_bad"),
                   RefineParams(staged_start_res_A=3.0), device="cpu", progress=False)


def test_resume_of_a_run_from_before_the_base_candidate_schedule_keeps_its_search():
    from dataclasses import asdict
    from cryocv.jobs.refine import RefineParams, refine_params_from_config
    old = asdict(RefineParams(n_candidates=8))
    del old["n_base_candidates"]
    params = refine_params_from_config(old)
    assert params.n_candidates == 8 and params.n_base_candidates == 8
    assert refine_params_from_config(asdict(RefineParams())) == RefineParams()


def test_continued_job_keeps_the_nu_window_it_started_with(tmp_path):
    """The NU window cap became a default (0.125) on 2026-12-04: a job whose refine_config.json
    predates the setting continues uncapped, as it started; a recorded value (null or a number) is kept."""
    import json
    from dataclasses import asdict
    from cryocv.jobs import jobdir
    from cryocv.jobs.local_refine import LocalRefineParams
    from cryocv.jobs.loop import open_refinement
    from cryocv.jobs.refine import RefineParams, refine_params_from_config
    for params_class, make in ((RefineParams, refine_params_from_config), (LocalRefineParams, None)):
        for recorded, expected in (("absent", None), (None, None), (0.25, 0.25)):
            parameters = asdict(params_class())
            if recorded == "absent":
                del parameters["nu_max_window_fraction"]
            else:
                parameters["nu_max_window_fraction"] = recorded
            job = tmp_path / f"{params_class.__name__}_{recorded}"
            job.mkdir()
            config = {"particles": "p.star", "reference": "r.mrc", "datadir": None, "device": "cpu", "gpu": None,
                      "parameters": parameters}
            (job / jobdir.REFINE_CONFIG).write_text(json.dumps(config))
            _, params, _ = open_refinement(str(job), True, None, params_class, ("particles",), make)
            assert params.nu_max_window_fraction == expected, (params_class, recorded)
    assert RefineParams().nu_max_window_fraction == 0.125


def test_refine_resumes_after_kill(refine_case, monkeypatch):
    from cryocv.jobs import checkpoints as refine_module
    from cryocv.jobs.refine import RefineParams, run as run_refine
    root, truth = refine_case
    out = str(root / "resume")
    original = refine_module.CheckpointStore.save
    calls = []

    def save_then_die(self, state, *args, **kwargs):
        original(self, state, *args, **kwargs)
        calls.append(state.iteration)
        if state.iteration == 1:
            raise KeyboardInterrupt  # killed right after the first checkpoint

    monkeypatch.setattr(refine_module.CheckpointStore, "save", save_then_die)
    params = RefineParams(regularizer="uniform", initial_lowpass_A=20.0, max_iterations=2)
    with pytest.raises(KeyboardInterrupt):
        run_refine(str(root / "sim" / "particles.star"), str(root / "truth.mrc"), out, params, device="cpu",
                   progress=False)
    assert not os.path.exists(os.path.join(out, "map.mrc"))
    from cryocv.errors import CryocvError
    with pytest.raises(CryocvError, match="--continue"):
        run_refine(str(root / "sim" / "particles.star"), str(root / "truth.mrc"), out, params, device="cpu",
                   progress=False)
    monkeypatch.setattr(refine_module.CheckpointStore, "save", original)
    report = run_refine(None, None, out, resume=True, progress=False)
    iterations = [h["iteration"] for h in report["iterations"]]
    assert iterations == [1, 2, 3] and report["iterations"][-1]["final"]
    from cryocv.jobs.registration import HALF_SET_REGISTRATION      # registered once per iteration, resumed or not
    assert [HALF_SET_REGISTRATION in h for h in report["iterations"]] == [True, True, False]
    with open(os.path.join(out, "run.log")) as handle:
        assert "continuing from the checkpoint of iteration 1" in handle.read()
    full, _ = read_map(os.path.join(out, "map.mrc"))
    assert resolution_at(fsc_curve(full, truth), 0.5, 32, 2.0) < 8.0
