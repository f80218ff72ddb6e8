# Ran at 4cf4937 -> test_case.txt (the grid-only figures with _polish_rigid replaced by the identity).
import sys, time, numpy as np
sys.path.insert(0, "/work/main/tests"); sys.path.insert(0, "/work/main")
from conftest import asymmetric_map
from cryocv.geometry import angular_distance_deg
from cryocv.geometry import axis_angle_to_matrix
from cryocv.masks import spherical_mask
import cryocv.register as R
for n in (40, 48):
  vol = asymmetric_map(n, seed=3)
  support = spherical_mask(n, 0.4 * n, 3.0, np)
  rng = np.random.default_rng(2)
  for noise in (0.5, 1.0):
    for angle_deg in (0.0, 0.4, 0.8):
        axis = rng.normal(size=3)
        turn = axis_angle_to_matrix(np.radians(angle_deg) * axis / np.linalg.norm(axis))
        noisy = [np.clip(v + rng.normal(0, noise * vol.std(), vol.shape).astype(np.float32), 0, None) * support
                 for v in (vol, R.transform_volume(vol, R.MapTransform(turn, np.zeros(3))))]
        t0=time.time()
        found = R.align_maps(*noisy, 2.0, 6.0, keep_identity_within=0.005)
        orig = R._polish_rigid
        R._polish_rigid = lambda *a: a[4]
        grid = R.align_maps(*noisy, 2.0, 6.0, keep_identity_within=0.005)
        R._polish_rigid = orig
        print(n, noise, angle_deg, "polished %.3f grid %.3f shift %.3f  %.1fs" % (angular_distance_deg(turn @ found.matrix, np.eye(3)),
              angular_distance_deg(turn @ grid.matrix, np.eye(3)), np.linalg.norm(found.shift_px), time.time()-t0))
