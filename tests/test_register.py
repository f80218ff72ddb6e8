"""3D map alignment and the pose transform it implies (cryocv/register.py)."""
import numpy as np
import pytest

from cryocv.fsc import fsc_curve
from cryocv.geometry import angular_distance_deg, axis_angle_to_matrix, random_rotations
from cryocv.projector import prepare_volume
from cryocv.register import (MIRROR, MapTransform, align_maps, center_of_mass_px, transform_poses,
                             transform_volume)
from cryocv.simulate import clean_projections
from .conftest import asymmetric_map


def _correlation(a, b):
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def test_transform_volume_moves_the_centre_of_mass_and_rotates():
    """V'(x) = V(L(x − t)): a blob at c moves to L^T c + t."""
    n = 32
    grid = np.indices((n,) * 3).astype(np.float32) - n // 2
    c = np.array([5.0, -3.0, 2.0])                       # x, y, z
    blob = np.exp(-((grid[2] - c[0]) ** 2 + (grid[1] - c[1]) ** 2 + (grid[0] - c[2]) ** 2) / 4.0)
    L = axis_angle_to_matrix(np.array([0.3, -0.5, 0.8]))
    t = np.array([1.5, 0.5, -2.0])
    moved = transform_volume(blob, MapTransform(L, t))
    np.testing.assert_allclose(center_of_mass_px(moved), L.T @ c + t, atol=0.15)
    mirrored = transform_volume(blob, MapTransform(MIRROR, np.zeros(3)))
    np.testing.assert_allclose(center_of_mass_px(mirrored), MIRROR @ c, atol=0.15)


def test_transformed_poses_keep_every_image():
    """Projections of the transformed map at the transformed poses and origins are the
    original images, for a rotation and for a hand flip (the convention that lets ab-initio
    move half-set 2 and its particles together)."""
    n = 40
    vol = asymmetric_map(n, seed=3)
    rng = np.random.default_rng(1)
    rot = random_rotations(12, rng).astype(np.float32)
    origins = rng.normal(0, 1.5, (12, 2)).astype(np.float32)
    images = clean_projections(prepare_volume(vol), rot, origins, None, n)
    for L in (axis_angle_to_matrix(np.array([0.4, 0.2, -0.7])),
              MIRROR @ axis_angle_to_matrix(np.array([-0.2, 0.9, 0.1]))):
        T = MapTransform(L, np.array([1.0, -2.0, 0.5]))
        new_rot, new_origins = transform_poses(rot, origins, T)
        assert np.allclose(np.linalg.det(new_rot), 1)
        again = clean_projections(prepare_volume(transform_volume(vol, T)), new_rot.astype(np.float32),
                                  new_origins.astype(np.float32), None, n)
        inner = np.s_[:, 8:-8, 8:-8]
        assert min(_correlation(a, b) for a, b in zip(images[inner], again[inner])) > 0.98


def test_align_maps_recovers_a_rotated_shifted_mirrored_copy():
    """A known rotated, shifted and mirrored copy (plus noise) is brought back: rotation within
    1.5°, shift within 0.5 px, hand found; the aligned copy matches the reference."""
    n = 40
    vol = asymmetric_map(n, seed=7)
    rng = np.random.default_rng(2)
    for flip in (False, True):
        Q = axis_angle_to_matrix(rng.normal(0, 1.0, 3))
        truth = MapTransform(MIRROR @ Q if flip else Q, rng.normal(0, 2.0, 3))
        copy = transform_volume(vol, truth) + rng.normal(0, 0.02 * vol.max(), vol.shape).astype(np.float32)
        found = align_maps(vol, copy, pixel_size_A=2.0, resolution_A=10.0)
        assert found.flips_hand == flip
        # the exact inverse: V(x) = copy(Lᵀ(x + L t))
        exact = MapTransform(truth.matrix.T, -truth.matrix @ truth.shift_px)
        assert angular_distance_deg(truth.matrix @ found.matrix, np.eye(3)) < 1.0
        assert np.linalg.norm(found.shift_px - exact.shift_px) < 0.3
        aligned = transform_volume(copy, found)
        assert _correlation(aligned, vol) > _correlation(transform_volume(copy, exact), vol) - 0.005
        assert fsc_curve(aligned, vol)[: n // 4].min() > 0.9


def test_maps_in_register_stay_put_under_symmetry():
    """A C4 map matches itself equally well at 0°, 90°, 180° and 270°: with
    ``keep_identity_within`` a second copy that is already in register is left where it is
    (ab-initio would otherwise turn half-set 2 by 90° at every check)."""
    from cryocv.symmetry import symmetry_operators
    n = 32
    base = asymmetric_map(n, seed=4)
    vol = sum(transform_volume(base, MapTransform(g, np.zeros(3))) for g in symmetry_operators("C4"))
    rng = np.random.default_rng(5)
    copy = vol + rng.normal(0, 0.01 * vol.max(), vol.shape).astype(np.float32)
    found = align_maps(vol, copy, 2.0, 8.0, keep_identity_within=0.005)
    assert found.rotation_deg < 1.0 and not found.flips_hand
    assert np.linalg.norm(found.shift_px) < 0.3


def test_fourier_crop_is_the_same_map_on_a_coarser_grid():
    """A map band-limited below the smaller box's Nyquist, cut down to it, is the original sampled
    at every (N/size)-th voxel (here 2), values on the same scale."""
    from cryocv.fourier import fourier_crop, lowpass_map
    n = 32
    vol = lowpass_map(asymmetric_map(n, seed=5), 1.0, 5.0)          # nothing finer than 5 px: under 16's Nyquist
    coarse = fourier_crop(vol, 16)
    assert coarse.shape == (16, 16, 16) and coarse.dtype == np.float32
    np.testing.assert_allclose(coarse, vol[::2, ::2, ::2], atol=2e-3 * np.abs(vol).max())
    # any ratio, odd boxes too, with the box centre N//2 kept at size//2: where the two grids meet
    # (80 -> 48: every 5th voxel is every 3rd; 81 -> 48: voxels 13, 40, 67 are 8, 24, 40) the values agree
    for big, small, at_big, at_small in ((80, 48, np.arange(0, 80, 5), np.arange(0, 48, 3)),
                                         (81, 48, np.array([13, 40, 67]), np.array([8, 24, 40]))):
        vol = lowpass_map(asymmetric_map(big, seed=6), 1.0, 6.0)
        coarse = fourier_crop(vol, small)
        np.testing.assert_allclose(coarse[np.ix_(at_small, at_small, at_small)], vol[np.ix_(at_big, at_big, at_big)],
                                   atol=1e-4 * np.abs(vol).max())
    for bad in (33, 40, 0):
        with pytest.raises(ValueError):
            fourier_crop(np.zeros((32, 32, 32), np.float32), bad)


def test_align_maps_locally_recovers_a_small_drift():
    """Half-maps a few degrees and a pixel apart (plus noise): the local search from the identity
    brings the copy back within 0.5° and 0.3 px, as well as the global search does."""
    from cryocv.register import align_maps_locally
    n = 40
    vol = asymmetric_map(n, seed=8)
    rng = np.random.default_rng(6)
    for angle_deg in (1.0, 3.5, 6.0):
        axis = rng.normal(size=3)
        truth = MapTransform(axis_angle_to_matrix(np.radians(angle_deg) * axis / np.linalg.norm(axis)),
                             rng.normal(0, 1.0, 3))
        copy = transform_volume(vol, truth) + rng.normal(0, 0.02 * vol.max(), vol.shape).astype(np.float32)
        exact = MapTransform(truth.matrix.T, -truth.matrix @ truth.shift_px)
        for max_box in (96, 24):                 # the whole box, and a Fourier crop to 24 (shift scaled back)
            found = align_maps_locally(vol, copy, 2.0, 8.0, max_box=max_box)
            assert angular_distance_deg(truth.matrix @ found.matrix, np.eye(3)) < 0.5
            assert np.linalg.norm(found.shift_px - exact.shift_px) < 0.3, max_box
            assert not found.flips_hand
    for n_odd in (45, 47):                       # odd boxes: a map against itself stays put
        odd = asymmetric_map(n_odd, seed=1)
        found = align_maps_locally(odd, odd.copy(), 2.0, 6.0)
        assert found.rotation_deg < 0.2 and np.linalg.norm(found.shift_px) < 0.1


def test_align_maps_locally_is_unbiased_on_noisy_half_maps():
    """Two noisy copies of one map (as half-maps are), in register or 0.4° apart: the polished
    estimate lands within 0.1° of the truth. The grid search alone came out 0.15–0.27° off here
    (its normalized score prefers interpolated samples, whose noise is smoothed), 0.45° on real
    half-maps (bench/results/small_membrane.md)."""
    from cryocv.register import align_maps_locally
    n = 48
    vol = asymmetric_map(n, seed=3)
    rng = np.random.default_rng(2)
    for angle_deg in (0.0, 0.4):
        axis = rng.normal(size=3)
        turn = axis_angle_to_matrix(np.radians(angle_deg) * axis / np.linalg.norm(axis))
        noisy = [v + rng.normal(0, 0.5 * vol.std(), vol.shape).astype(np.float32)
                 for v in (vol, transform_volume(vol, MapTransform(turn, np.zeros(3))))]
        found = align_maps_locally(*noisy, 2.0, 6.0)
        assert angular_distance_deg(turn @ found.matrix, np.eye(3)) < 0.1, angle_deg
        assert np.linalg.norm(found.shift_px) < 0.1


def test_align_maps_is_polished_on_noisy_maps_with_a_support():
    """Ab-initio's half-set check: two noisy, non-negative copies of one map inside a spherical
    support (as the SGD maps are), in register or 0.4° apart. The global search's polished
    estimate lands within 0.1° of the truth (0.05–0.06° here); its 0.5° grid alone came out
    0.19–0.43° off on these maps (bench/results/abinitio_polish/)."""
    from cryocv.masks import spherical_mask
    n = 40
    vol = asymmetric_map(n, seed=3)
    support = spherical_mask(n, 0.4 * n, 3.0, np)
    rng = np.random.default_rng(2)
    for angle_deg in (0.0, 0.4):
        axis = rng.normal(size=3)
        turn = axis_angle_to_matrix(np.radians(angle_deg) * axis / np.linalg.norm(axis))
        noisy = [np.clip(v + rng.normal(0, 0.5 * vol.std(), vol.shape).astype(np.float32), 0, None) * support
                 for v in (vol, transform_volume(vol, MapTransform(turn, np.zeros(3))))]
        found = align_maps(*noisy, 2.0, 6.0, keep_identity_within=0.005)
        assert angular_distance_deg(turn @ found.matrix, np.eye(3)) < 0.1, angle_deg
        assert np.linalg.norm(found.shift_px) < 0.1


def test_polish_converges_from_near_and_leaves_a_far_start_alone():
    """The Gauss–Newton polish (register._polish_rigid) of a start 0.6° and 0.3 px from the exact
    transform of a copy lands within 0.01° and 0.01 px; from a start 3 px off in shift (far outside
    its linear range at this resolution) its steps do not settle and the start is returned."""
    from cryocv.register import LOCAL_PADDING, _rotation_scorer
    n = 40
    vol = asymmetric_map(n, seed=4)
    truth = MapTransform(axis_angle_to_matrix(np.radians(1.5) * np.array([0.6, 0.0, 0.8])), np.array([0.4, -0.3, 0.2]))
    moving = transform_volume(vol, MapTransform(truth.matrix.T, -truth.matrix @ truth.shift_px), padding=4)
    polish = _rotation_scorer(vol, moving, 2.0, 5.0, LOCAL_PADDING)[2]
    near = MapTransform(truth.matrix @ axis_angle_to_matrix(np.radians(0.6) * np.array([0.0, 1.0, 0.0])),
                        truth.shift_px + np.array([0.3, 0.0, 0.0]))
    found = polish(near)
    assert angular_distance_deg(found.matrix, truth.matrix) < 0.01
    assert np.linalg.norm(found.shift_px - truth.shift_px) < 0.01
    far = MapTransform(near.matrix, truth.shift_px + np.array([3.0, 0.0, 0.0]))
    assert polish(far) is far


def test_registration_keeps_only_the_motion_the_symmetry_leaves_free():
    """C1 half-maps may drift every way; Cn ones only about and along the axis z (the rest of an
    estimate is noise that would tilt the next reconstruction's axis); D, T, O, I not at all."""
    from cryocv.jobs.registration import can_drift, symmetry_allowed
    assert can_drift("C1") and can_drift("c4") and not any(can_drift(g) for g in ("D2", "T", "O", "I"))
    turn = axis_angle_to_matrix(np.radians(2.0) * np.array([0.0, 0.0, 1.0]))
    tilt = axis_angle_to_matrix(np.radians(1.0) * np.array([1.0, 0.0, 0.0]))
    estimate = MapTransform(tilt @ turn, np.array([0.4, -0.3, 0.7]), 0.9)
    assert symmetry_allowed(estimate, "C1") is estimate
    kept = symmetry_allowed(estimate, "C4")
    np.testing.assert_allclose(kept.matrix @ np.array([0, 0, 1.0]), [0, 0, 1.0], atol=1e-12)   # the axis stays
    assert abs(kept.rotation_deg - 2.0) < 0.05 and np.allclose(kept.shift_px, [0, 0, 0.7])


def test_drift_registration_moves_half_set_2_reference_and_poses_together():
    """--register-halves' hook: half-set 2's reference, turned 4° and shifted off half-set 1's,
    comes back onto it; its particles' poses move with it (their projections of the moved
    reference are their images), half-set 1 is untouched, and the history records the angle."""
    from cryocv.jobs.checkpoints import RefineState
    from cryocv.jobs.registration import HALF_SET_REGISTRATION, drift_registration
    from cryocv.geometry import euler_to_matrix, matrix_to_euler
    n, px = 40, 2.0
    vol = asymmetric_map(n, seed=9)
    rng = np.random.default_rng(3)
    drift = MapTransform(axis_angle_to_matrix(np.radians(4.0) * np.array([0.0, 0.6, 0.8])), np.array([1.0, 0, -0.5]))
    second = transform_volume(vol, drift)
    rot = random_rotations(10, rng)
    origin_px = rng.normal(0, 1.0, (10, 2))
    half_set = np.array([1, 2] * 5)
    # half-set 2's particles as they are in the drifted frame: poses that project `second` onto their images
    drifted_rot, drifted_origin = transform_poses(rot, origin_px, drift)    # the particles of `second`
    euler = matrix_to_euler(np.where((half_set == 2)[:, None, None], drifted_rot, rot))
    origin = np.where((half_set == 2)[:, None], drifted_origin, origin_px)
    images = clean_projections(prepare_volume(second), euler_to_matrix(euler).astype(np.float32),
                               origin.astype(np.float32), None, n)
    state = RefineState(iteration=1, references=[vol.copy(), second.copy()], mask=None, resolution_A=5.0,
                        euler_deg=euler.copy(), origin_A=origin * px, noise_var_shell=None, history=[{"iteration": 1}])
    state = drift_registration(half_set, px, np, lambda *_: None)(state)
    assert abs(state.history[-1][HALF_SET_REGISTRATION]["rotation_deg"] - 4.0) < 0.5
    assert _correlation(state.references[1], vol) > 0.99 > _correlation(second, vol)
    np.testing.assert_array_equal(state.euler_deg[half_set == 1], euler[half_set == 1])
    assert angular_distance_deg(euler_to_matrix(state.euler_deg[half_set == 2]), rot[half_set == 2]).max() < 0.5
    again = clean_projections(prepare_volume(state.references[1]), euler_to_matrix(state.euler_deg).astype(np.float32),
                              (state.origin_A / px).astype(np.float32), None, n)
    inner = np.s_[8:-8, 8:-8]
    assert min(_correlation(a[inner], b[inner]) for a, b in zip(images[half_set == 2], again[half_set == 2])) > 0.97
    # already in register: left as it is
    moved_reference, moved_euler = state.references[1].copy(), state.euler_deg.copy()
    state.history.append({"iteration": 2})
    state = drift_registration(half_set, px, np, lambda *_: None)(state)
    assert not state.history[-1][HALF_SET_REGISTRATION]["moved"]
    np.testing.assert_array_equal(state.references[1], moved_reference)
    np.testing.assert_array_equal(state.euler_deg, moved_euler)
