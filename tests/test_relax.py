"""Symmetry relaxation (cryocv/relax.py): mates, maximization over mates, half-set registration."""
import numpy as np
import pytest

from cryocv.geometry import angular_distance_deg, random_rotations
from cryocv.projector import prepare_volume
from cryocv.register import MapTransform, transform_volume
from cryocv.relax import mates, mode_of, mode_spread, register_over_group, relaxed_poses, symmetrized
from cryocv.search import SearchParams, SearchResult, search_schedule
from cryocv.fourier import ft2_centered
from cryocv.simulate import clean_projections
from cryocv.symmetry import symmetry_operators
from .conftest import asymmetric_map


def pseudo_symmetric_map(n: int, group: str = "C4", partner_height: float = 0.6):
    """A G-symmetric map plus one off-axis partner blob (``partner_height`` × the core's maximum):
    the asymmetric feature."""
    ops = symmetry_operators(group)
    core = symmetrized(asymmetric_map(n, seed=8, n_atoms=40, sigma_px=1.2), ops) * len(ops)
    grid = np.indices((n,) * 3).astype(np.float32) - n // 2
    c = np.array([0.28 * n, 0.0, 0.1 * n])                       # x, y, z
    partner = np.exp(-((grid[2] - c[0]) ** 2 + (grid[1] - c[1]) ** 2 + (grid[0] - c[2]) ** 2) / (2 * 2.0 ** 2))
    return (core + partner_height * core.max() * partner).astype(np.float32), ops


def projections(vol, count: int, rng):
    """(prepared volume FT, true rotations (count, 3, 3), origins (count, 2) px, clean images) of
    ``count`` random views of ``vol``, origins drawn with σ 0.7 px."""
    truth = random_rotations(count, rng).astype(np.float32)
    origins = rng.normal(0, 0.7, (count, 2)).astype(np.float32)
    ft = prepare_volume(vol)
    return ft, truth, origins, clean_projections(ft, truth, origins, None, vol.shape[0])


def test_mates_are_the_poses_a_symmetric_map_cannot_tell_apart():
    """Every mate A·gᵀ projects a G-symmetric map exactly as A does, for cyclic, dihedral and
    polyhedral groups; the mates of A differ from A by the operators' angles."""
    n = 24
    rng = np.random.default_rng(0)
    rot = random_rotations(3, rng).astype(np.float32)
    for group in ("C4", "D3", "T"):
        ops = symmetry_operators(group)
        vol = symmetrized(asymmetric_map(n, seed=3), ops)
        related = mates(rot, ops)
        assert related.shape == (3, len(ops), 3, 3)
        ft = prepare_volume(vol)
        base = clean_projections(ft, rot, np.zeros((3, 2), np.float32), None, n)
        for g in range(len(ops)):
            other = clean_projections(ft, related[:, g].astype(np.float32), np.zeros((3, 2), np.float32), None, n)
            assert np.abs(other - base).max() < 0.03 * np.abs(base).max()
        angles = angular_distance_deg(related[:, 1], rot)
        assert np.all(angles > 30)


def test_maximization_restores_the_true_mate():
    """A C4 map with one partner: starting from the true poses composed with a random mate (what
    a C4 consensus leaves), maximization over the mates brings nearly every particle back to its
    true C1 pose (high SNR)."""
    n = 32
    vol, ops = pseudo_symmetric_map(n)
    rng = np.random.default_rng(1)
    ft, truth, origins, images = projections(vol, 80, rng)
    images = images + rng.normal(0, 0.3 * images.std(), images.shape).astype(np.float32)
    wrong = rng.integers(0, len(ops), 80)
    start = np.einsum("bij,bjk->bik", truth, np.transpose(ops[wrong], (0, 2, 1))).astype(np.float32)
    params = SearchParams(base_step_deg=15.0, fine_step_deg=1.0, max_shift_px=2.0)
    levels = search_schedule(n, n / 2, params)[-3:]
    best = SearchResult(start, origins, np.zeros(80, np.float32))
    found, choice = relaxed_poses(ft, ft2_centered(images).astype(np.complex64), None, np.ones(n // 2 + 1, np.float32),
                                  best, ops, levels, params)
    error = angular_distance_deg(found.rotations, truth)
    assert np.mean(error < 3.0) >= 0.95
    assert np.mean(mode_of(found.rotations, truth, ops) == 0) >= 0.95


def test_mate_choice_sees_a_weak_partner_with_coarse_cells():
    """T with a partner at 5 % of the core's height, noise-free images, coarse polishing cells
    (7.5°, as early iterations have): every image's true mate is chosen, because the mates are
    scored at the refined pose itself (a subdivision from cells around every mate chose 71 % of
    them: its children's misfit of the strong core outweighed the partner)."""
    n = 48
    vol, ops = pseudo_symmetric_map(n, "T", partner_height=0.05)
    rng = np.random.default_rng(0)
    truth = random_rotations(100, rng).astype(np.float32)
    ft = prepare_volume(vol)
    images = ft2_centered(clean_projections(ft, truth, np.zeros((100, 2), np.float32), None, n)).astype(np.complex64)
    start = np.einsum("bij,bjk->bik", truth, np.transpose(ops[rng.integers(0, len(ops), 100)], (0, 2, 1)))
    params = SearchParams(base_step_deg=15.0, fine_step_deg=0.5, max_shift_px=2.0)
    levels = search_schedule(n, 10, params)[-3:]
    assert np.degrees(levels[0].rotation_step_rad) >= 7.4                      # coarse cells
    best = SearchResult(start.astype(np.float32), np.zeros((100, 2), np.float32), np.zeros(100, np.float32))
    found, choice = relaxed_poses(ft, images, None, np.ones(n // 2 + 1, np.float32), best, ops, levels, params)
    assert np.all(mode_of(found.rotations, truth, ops) == 0)
    assert np.median(angular_distance_deg(found.rotations, truth)) < 0.5


def test_marginalization_weights_sum_to_one_inside_the_mode():
    """Marginalization spreads each image over poses around its chosen mate: the weights are
    positive and sum to one per image, every weighted pose lies in the chosen mate's mode (nearer
    to it than to any other mate), and the heaviest pose is the truth's neighbour at low noise;
    at higher noise the weight spreads (more poses carry weight)."""
    n = 32
    vol, ops = pseudo_symmetric_map(n)
    rng = np.random.default_rng(5)
    ft, truth, origins, clean = projections(vol, 40, rng)
    params = SearchParams(base_step_deg=15.0, fine_step_deg=1.0, max_shift_px=2.0)
    levels = search_schedule(n, n / 2, params)[-3:]
    spreads = []
    for noise in (0.3, 3.0):
        added = rng.normal(0, noise * clean.std(), clean.shape).astype(np.float32)
        images_ft = ft2_centered(clean + added).astype(np.complex64)
        # the noise model a job estimates: the per-point variance of the added noise's FT (white)
        flat = np.full(n // 2 + 1, np.mean(np.abs(ft2_centered(added)) ** 2), np.float32)
        start = SearchResult(truth, origins, np.zeros(40, np.float32))
        found, _ = relaxed_poses(ft, images_ft, None, flat, start, ops, levels, params)
        spread = mode_spread(ft, images_ft, None, flat, found, levels[-1])
        assert spread.weights.shape == (40, 16) and np.all(spread.weights >= 0)
        np.testing.assert_allclose(spread.weights.sum(axis=1), 1.0, atol=1e-5)
        for k in range(spread.weights.shape[1]):
            assert np.all(mode_of(spread.rotations[:, k], found.rotations, ops) == 0)
            assert np.all(angular_distance_deg(spread.rotations[:, k], found.rotations) < 3 * np.degrees(
                levels[-1].rotation_step_rad))
        spreads.append(np.mean(1 / np.sum(spread.weights ** 2, axis=1)))    # effective number of poses
    assert spreads[1] > spreads[0]


def test_registration_over_a_polyhedral_group_sees_a_weak_partner():
    """T (3-folds off the grid axes): half-map 2 is half-map 1 turned by each operator in turn,
    with a partner at 5 % of the core's height and independent noise: the registration, made on
    the asymmetric parts, finds every operator (a whole-map correlation is swayed by the
    interpolation error of turning the strong symmetric core)."""
    n = 32
    vol, ops = pseudo_symmetric_map(n, "T", partner_height=0.05)
    rng = np.random.default_rng(11)
    sigma = 0.02 * vol.max()
    for k in range(len(ops)):
        first = vol + rng.normal(0, sigma, vol.shape).astype(np.float32)
        second = transform_volume(vol, MapTransform(ops[k].T, np.zeros(3))) + rng.normal(0, sigma, vol.shape)
        index, _ = register_over_group(first, second.astype(np.float32), ops, pixel_size_A=2.0, resolution_A=6.0)
        assert index == k


def test_relaxed_convergence_waits_for_mode_switching_to_settle():
    """Relaxation converges only once the fraction of particles changing mode stops moving (or is
    below 1 %): not while it falls, nor while it rises again."""
    from cryocv.jobs.loop import convergence
    base = [{"resolution_A": 5.0, "pose_change_median_deg": 0.1}] * 2

    def history(before, last):
        return [base[0], {**base[1], "mode_switch_fraction": before}, {**base[1], "mode_switch_fraction": last}]
    assert not convergence(history(0.15, 0.07), 2, 0.5)[0]       # still falling
    assert not convergence(history(0.07, 0.185), 2, 0.5)[0]      # rising: half-sets drifting
    assert convergence(history(0.071, 0.07), 2, 0.5)[0]          # a plateau
    assert convergence(history(0.02, 0.004), 2, 0.5)[0]          # settled


def test_relaxed_convergence_waits_while_the_half_maps_break_the_symmetry_further():
    """The T benchmark on the H200 stalled with 13 % of the particles changing mode per iteration
    (a plateau) while the share at one mate still grew: convergence also waits while the
    agreement of the half-maps' asymmetric parts rises."""
    from cryocv.jobs.loop import convergence
    base = {"resolution_A": 5.0, "pose_change_median_deg": 0.1, "mode_switch_fraction": 0.13}

    def history(before, last):
        return [base, {**base, "asymmetric_agreement": before}, {**base, "asymmetric_agreement": last}]
    assert not convergence(history(0.20, 0.35), 2, 0.5)[0]       # symmetry still breaking
    assert convergence(history(0.61, 0.62), 2, 0.5)[0]           # stopped rising
    assert convergence(history(0.62, 0.55), 2, 0.5)[0]           # fell back (noise): nothing to wait for


def test_asymmetric_agreement_grows_as_the_symmetry_breaks():
    """Two noisy half-maps of a C4 channel with a partner on one subunit: the correlation of their
    asymmetric parts (inside the mask) rises from the symmetric state (the partner smeared over
    the four sites; what is left there is noise and the core's interpolation residue) through a
    partial break to a full one, also when half-map 2 broke at another site (found)."""
    from cryocv.masks import spherical_mask
    from cryocv.relax import asymmetric_agreement
    n = 32
    vol, ops = pseudo_symmetric_map(n, partner_height=0.3)
    core = symmetrized(vol, ops)
    mask = spherical_mask(n, 13, 3.0, np)
    rng = np.random.default_rng(5)

    def agreement(first, second):
        noisy = [(m + rng.normal(0, 0.05 * vol.max(), m.shape)).astype(np.float32) for m in (first, second)]
        return asymmetric_agreement(*noisy, ops, mask, pixel_size_A=2.0, resolution_A=6.0)
    smeared = agreement(core, core)[1]
    partial = agreement(core + 0.6 * (vol - core), core + 0.6 * (vol - core))[1]
    index, broken = agreement(vol, transform_volume(vol, MapTransform(ops[2].T, np.zeros(3))))
    assert index == 2
    assert smeared + 0.05 < partial and partial + 0.05 < broken


def test_half_set_registration_finds_the_operator():
    """Half-map 2 broke the symmetry at another site (its map is half-map 1 turned by a C4
    operator): the registration finds the operator that brings it back."""
    n = 32
    vol, ops = pseudo_symmetric_map(n)
    turned = transform_volume(vol, MapTransform(ops[3].T, np.zeros(3)))        # vol(gᵀx)
    index, g = register_over_group(vol, turned, ops)
    back = transform_volume(turned, MapTransform(g, np.zeros(3)))
    assert np.corrcoef(back.ravel(), vol.ravel())[0, 1] > 0.99
    assert index == 3


@pytest.mark.parametrize("mode", ["maximize", "marginalize"])
def test_refine_relax_puts_particles_back_in_their_true_mode(tmp_path, mode):
    """`refine --sym C4 --relax maximize|marginalize` on a C4 particle with one partner, from poses that a C4
    consensus leaves (true poses turned by random mates) and a C4-symmetric start: most particles
    end in their true mode (up to one global operator), the partner appears in the difference
    map, and the diagnostics are written."""
    import json
    import os
    from cryocv.io.mrc import read_map, write_map
    from cryocv.io.particle_files import load_particles, save_particles
    from cryocv.geometry import matrix_to_euler
    from cryocv.jobs.refine import RefineParams, run
    from cryocv.simulate import simulate
    n, px = 32, 3.0
    vol, ops = pseudo_symmetric_map(n)
    simulate(vol, px, 500, str(tmp_path / "sim"), snr=2.0, seed=3, progress=False)
    truth = load_particles(str(tmp_path / "sim" / "particles.star"))
    consensus = load_particles(str(tmp_path / "sim" / "particles.star"))
    rng = np.random.default_rng(4)
    wrong = rng.integers(0, len(ops), len(consensus))
    consensus.euler_deg = matrix_to_euler(np.einsum("bij,bjk->bik", truth.rotations,
                                                    np.transpose(ops[wrong], (0, 2, 1))))
    save_particles(consensus, str(tmp_path / "consensus.star"))
    write_map(str(tmp_path / "symmetric.mrc"), symmetrized(vol, ops), px)
    params = RefineParams(symmetry="C4", relax=mode, break_symmetry=True, regularizer="uniform",
                          initial_lowpass_A=12.0, max_iterations=4, base_step_deg=15.0)
    out = str(tmp_path / "job")
    report = run(str(tmp_path / "consensus.star"), str(tmp_path / "symmetric.mrc"), out, params, device="cpu",
                 progress=False)
    refined = load_particles(os.path.join(out, "particles.star"))
    modes = mode_of(refined.rotations, truth.rotations, ops)
    assert np.bincount(modes, minlength=4).max() / len(modes) >= 0.8     # one global operator for nearly all
    assert len(report["relax"]["mode_occupancy"]) == 4
    assert any("mode_switch_fraction" in h for h in report["iterations"])
    for h in report["iterations"]:                  # written every iteration, not only at the end
        assert len(h["mode_occupancy"]) == 4 and abs(sum(h["mode_occupancy"]) - 1) < 1e-3
    difference, _ = read_map(os.path.join(out, "difference_map.mrc"))
    assert np.abs(difference).max() > 0.05 * np.abs(read_map(os.path.join(out, "map.mrc"))[0]).max()
    assert os.path.getsize(os.path.join(out, "relax.png")) > 0
    assert json.load(open(os.path.join(out, "fsc.json")))["relax"]["group"] == "C4"


def test_local_refine_relax_follows_the_mode(tmp_path):
    """`local-refine --sym C4 --relax maximize --break-symmetry` from C4-consensus poses (true
    poses turned by random mates) and symmetric half-maps: the extents hold modulo C4, so
    particles move to their true mode (up to one global operator) while their change from the
    input, measured from the nearest mate, stays inside the extents; the relaxation outputs
    are written."""
    import os
    from cryocv.io.mrc import read_map, write_map
    from cryocv.io.particle_files import load_particles, save_particles
    from cryocv.geometry import matrix_to_euler
    from cryocv.jobs.local_refine import LocalRefineParams, run
    from cryocv.masks import spherical_mask
    from cryocv.simulate import simulate
    n, px = 32, 3.0
    vol, ops = pseudo_symmetric_map(n)
    simulate(vol, px, 400, str(tmp_path / "sim"), snr=2.0, seed=6, progress=False)
    truth = load_particles(str(tmp_path / "sim" / "particles.star"))
    consensus = load_particles(str(tmp_path / "sim" / "particles.star"))
    wrong = np.random.default_rng(7).integers(0, len(ops), len(consensus))
    consensus.euler_deg = matrix_to_euler(np.einsum("bij,bjk->bik", truth.rotations,
                                                    np.transpose(ops[wrong], (0, 2, 1))))
    save_particles(consensus, str(tmp_path / "consensus.star"))
    for half in (1, 2):
        write_map(str(tmp_path / f"half{half}.mrc"), symmetrized(vol, ops), px)
    write_map(str(tmp_path / "mask.mrc"), spherical_mask(n, n / 2 - 3, 2.0).astype(np.float32), px)
    params = LocalRefineParams(symmetry="C4", relax="maximize", break_symmetry=True, max_iterations=5,
                               rotation_extent_deg=8.0, shift_extent_A=6.0, fulcrum="box-center")
    out = str(tmp_path / "local")
    report = run(str(tmp_path / "consensus.star"), [str(tmp_path / "half1.mrc"), str(tmp_path / "half2.mrc")],
                 str(tmp_path / "mask.mrc"), out, params, device="cpu", progress=False)
    refined = load_particles(os.path.join(out, "particles.star"))
    modes = mode_of(refined.rotations, truth.rotations, ops)
    assert np.bincount(modes, minlength=4).max() / len(modes) >= 0.8
    assert report["map_symmetry"] == "C1" and len(report["relax"]["mode_occupancy"]) == 4
    assert report["local"]["rotation_change_median_deg"] < 8.0
    assert report["local"]["fraction_at_extent"]["rotation"] < 0.2
    difference, _ = read_map(os.path.join(out, "difference_map.mrc"))
    assert np.abs(difference).max() > 0.05 * np.abs(read_map(os.path.join(out, "map.mrc"))[0]).max()


@pytest.mark.parametrize("name", ["C4", "D3", "T", "O", "I"])
def test_mates_equal_relions_symmetry_operators_applied(name):
    """The mates of a pose under each group are the pose turned by RELION's own operators
    (`relion_refine --print_symmetry_ops`, the cross-check of tests/test_geometry.py): the same
    set of N poses, so a relaxed particle moves exactly where RELION's symmetry would put it."""
    import shutil
    if shutil.which("relion_refine") is None:
        pytest.skip("RELION not installed")
    from .test_geometry import _relion_symmetry_ops
    ops = symmetry_operators(name)
    pose = random_rotations(1, np.random.default_rng(12))[0]
    ours = mates(pose[None].astype(np.float64), ops)[0]
    theirs = np.array([pose @ r.T for r in _relion_symmetry_ops(name)])
    assert len(theirs) == len(ours)
    for m in theirs:
        assert np.min(np.abs(ours - m).reshape(len(ours), -1).max(axis=1)) < 1e-4
