"""3D map alignment and the pose transform it implies (cryocv/register.py)."""
import numpy as np

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
