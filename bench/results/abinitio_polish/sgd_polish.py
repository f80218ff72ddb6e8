# Ran at commit 4cf4937 (the polish called directly, so align_maps's own use of it does not matter).
# noisy_copies_in_support.txt: as here; noisy_copies_whole_box_noise.txt: the same without the support and the clip
# (v = map + noise), noise levels 0.5 and 2.0 only.
"""align_maps (ab-initio's SGD half-set check: global grid, 0.5° fine step, 2-fold padding) with and
without a Gauss-Newton polish of its best: two noisy copies of a CXCR4+Nb map, one turned and shifted
by a known small transform; error of each estimate per axis (deg) and in shift (px)."""
import math, sys, time
import numpy as np
from scipy.spatial.transform import Rotation
sys.path.insert(0, "/work/main")
from cryocv.models import map_from_model
from cryocv.fourier import lowpass_map
from cryocv.projector import prepare_volume

import cryocv.register as R
from cryocv.geometry import euler_to_matrix, so3_grid

px, n, res = 1.5, 96, 6.5
vol = map_from_model("/work/shared/data/models/8zpm_cxcr4.cif", n, px).astype(np.float32)
vol = lowpass_map(vol, px, res * 0.8)
sd = float(vol[vol > 0.05 * vol.max()].std())
from cryocv.masks import spherical_mask
support = spherical_mask(n, 0.4 * n, 4.0, np)
rv = lambda L: Rotation.from_matrix(L).as_rotvec(degrees=True)

def grid_and_polished(ref, mov, keep=0.005):
    score, finish, polish = R._rotation_scorer(ref, mov, px, res, R.DEFAULT_PADDING)
    rotations = euler_to_matrix(so3_grid(15.0)); flips = np.zeros(len(rotations), bool)
    rotations, flips = np.concatenate([rotations, rotations]), np.repeat([False, True], len(flips))
    best = R._subdivide(score, rotations, flips, score(rotations, flips), math.radians(15.0), 0.5, 8)
    near = np.eye(3)[None]
    ident = R._subdivide(score, near, np.zeros(1, bool), score(near, np.zeros(1, bool)), math.radians(2.0), 0.5, 8)
    if ident[2] >= best[2] - keep:
        best = ident
    grid = finish(*best)
    p = polish(grid)
    print("   polish accepted" if p is not grid else "   polish rejected")
    return grid, p

rng = np.random.default_rng(1)
out = []
for noise in (0.5, 1.0, 2.0):
    for trial in range(4):
        axis = rng.normal(size=3); axis /= np.linalg.norm(axis)
        deg = [0.0, 0.4, 0.8, 1.5][trial]
        L = Rotation.from_rotvec(np.radians(deg) * axis).as_matrix()
        t = rng.normal(size=3) * 0.3 if deg else np.zeros(3)
        truth = R.MapTransform(L, t)
        moved = R.transform_volume(vol, truth, padding=4)
        v1 = np.clip(vol + rng.normal(scale=noise * sd, size=vol.shape).astype(np.float32), 0, None) * support
        v2 = np.clip(moved + rng.normal(scale=noise * sd, size=vol.shape).astype(np.float32), 0, None) * support
        # estimate T with transform_volume(v2, T) ≈ v1: T = truth^-1: error = T ∘ truth
        t0 = time.time(); grid, pol = grid_and_polished(v1, v2); t1 = time.time()
        loc = R.align_maps_locally(v1, v2, px, res); t2 = time.time()
        def err(T):
            # composite transform error: apply truth then T → should be identity
            comp = truth.matrix @ T.matrix       # V(L_truth (L_T (x - t_T) - t_truth))
            return rv(comp)
        row = (noise, deg, err(grid), err(pol), err(loc), t1 - t0, t2 - t1)
        print(f"noise {noise} turn {deg:.1f}: grid {np.round(row[2],3)} polished {np.round(row[3],3)} "
              f"local {np.round(row[4],3)}  ({row[5]:.0f}+{row[6]:.0f} s)", flush=True)
