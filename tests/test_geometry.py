import re
import shutil
import subprocess

import numpy as np
import pytest

from cryocv.geometry import (angular_distance_deg, axis_angle_to_matrix, euler_to_matrix, healpix_centers,
                             matrix_to_axis_angle, matrix_to_euler, random_rotations, so3_grid)
from cryocv.symmetry import parse_symmetry, symmetry_operators


def test_relion_euler_matrix_is_transpose_of_active_zyz():
    # RELION's A = Rz(psi)Ry(tilt)Rz(rot) of passive rotations = (active ZYZ)^T
    from scipy.spatial.transform import Rotation
    rng = np.random.default_rng(0)
    euler = rng.uniform([-180, 0, -180], [180, 180, 180], size=(50, 3))
    active = Rotation.from_euler("ZYZ", euler, degrees=True).as_matrix()
    np.testing.assert_allclose(euler_to_matrix(euler), np.swapaxes(active, 1, 2), atol=1e-12)


def test_known_relion_matrix_entries():
    a = euler_to_matrix([90, 0, 0])
    # rot = 90: RELION maps volume x=+8 to image (0, -8) (checked with relion_project)
    np.testing.assert_allclose(a @ [8, 0, 0], [0, -8, 0], atol=1e-12)
    a = euler_to_matrix([0, 90, 0])
    np.testing.assert_allclose(a @ [0, 0, -10], [10, 0, 0], atol=1e-12)


def test_euler_roundtrip_including_gimbal_lock():
    rng = np.random.default_rng(1)
    mats = random_rotations(500, rng)
    back = euler_to_matrix(matrix_to_euler(mats))
    assert np.max(angular_distance_deg(mats, back)) < 1e-6
    for euler in ([10, 0, 30], [10, 180, 30]):
        m = euler_to_matrix(euler)
        assert angular_distance_deg(m, euler_to_matrix(matrix_to_euler(m))) < 1e-6
    tilt = matrix_to_euler(mats)[:, 1]
    assert tilt.min() >= 0 and tilt.max() <= 180


def test_axis_angle_roundtrip_and_rodrigues():
    from scipy.spatial.transform import Rotation
    rng = np.random.default_rng(2)
    vecs = Rotation.random(300, random_state=3).as_rotvec()
    np.testing.assert_allclose(axis_angle_to_matrix(vecs), Rotation.from_rotvec(vecs).as_matrix(), atol=1e-12)
    mats = random_rotations(300, rng)
    assert np.max(angular_distance_deg(axis_angle_to_matrix(matrix_to_axis_angle(mats)), mats)) < 1e-5
    near_pi = axis_angle_to_matrix(np.array([[0, np.pi - 1e-7, 0], [np.pi, 0, 0]]))
    assert np.max(angular_distance_deg(axis_angle_to_matrix(matrix_to_axis_angle(near_pi)), near_pi)) < 1e-4


def test_so3_grid_counts_and_coverage():
    euler = so3_grid(30)
    assert euler.shape == (576, 3)  # HEALPix nside 2 (48) x 12 psi, as RELION's order 1
    assert len(healpix_centers(4)[0]) == 12 * 16
    # coverage: every random rotation lies within ~ the grid spacing of a grid point
    grid = euler_to_matrix(so3_grid(15))
    probes = random_rotations(200, np.random.default_rng(4))
    nearest = np.array([angular_distance_deg(grid, p).min() for p in probes])
    assert nearest.max() < 15.0
    # HEALPix directions are equal-area: z is uniform in [-1, 1]
    tilt, _ = healpix_centers(8)
    assert abs(np.cos(tilt).mean()) < 1e-9


@pytest.mark.parametrize("name,order", [("C1", 1), ("C4", 4), ("D2", 4), ("D7", 14), ("T", 12), ("O", 24),
                                        ("I", 60), ("I1", 60), ("I3", 60), ("I4", 60)])
def test_symmetry_groups_are_closed(name, order):
    ops = symmetry_operators(name)
    assert ops.shape == (order, 3, 3)
    np.testing.assert_allclose(ops[0], np.eye(3))
    for g in ops[:: max(1, order // 6)]:
        for h in ops[:: max(1, order // 6)]:
            assert np.min(angular_distance_deg(ops, g @ h)) < 1e-3
    np.testing.assert_allclose(np.linalg.det(ops), 1, atol=1e-9)


def test_symmetry_axes_follow_relion():
    c4 = symmetry_operators("C4")
    assert all(np.allclose(g @ [0, 0, 1], [0, 0, 1]) for g in c4)  # n-fold on z
    d2 = symmetry_operators("D2")
    assert any(np.allclose(g, np.diag([1, -1, -1])) for g in d2)  # 2-fold on x


def test_bad_symmetry_names():
    assert parse_symmetry("c4") == "C4" and parse_symmetry("i") == "I2"
    for bad in ("C0", "X3", "D", "C4.5", ""):
        with pytest.raises(ValueError):
            parse_symmetry(bad)


def _relion_symmetry_ops(name):
    out = subprocess.run(["relion_refine", "--print_symmetry_ops", "--sym", name], capture_output=True, text=True,
                         timeout=60).stdout
    blocks = re.findall(r"R\(\d+\)=\s*\n((?:\s*[-\d.e+]+\s+[-\d.e+]+\s+[-\d.e+]+\s*\n){3})", out)
    return np.array([np.array(b.split(), dtype=float).reshape(3, 3) for b in blocks])


@pytest.mark.skipif(shutil.which("relion_refine") is None, reason="RELION not installed")
@pytest.mark.parametrize("name", ["C4", "D3", "T", "O", "I", "I1", "I3", "I4"])
def test_symmetry_operators_match_relion(name):
    ours = symmetry_operators(name)
    theirs = _relion_symmetry_ops(name)
    assert len(theirs) == len(ours)
    for m in theirs:  # same set of matrices (RELION prints them to 5 decimals)
        assert np.min(np.abs(ours - m).reshape(len(ours), -1).max(axis=1)) < 1e-4
