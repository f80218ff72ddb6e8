# Ran against commit dc8eab4 (before the polish; outputs in outputs_before_polish.txt). Kept as run: with the
# polish, _rotation_scorer returns three functions and align_maps_locally is no longer the grid search alone.
import math, numpy as np
import cryocv.register as reg
from cryocv.io.mrc import read_map
from cryocv.fourier import fourier_crop
from scipy.spatial.transform import Rotation
d = "/work/relion_sm/cryocv_cpu_registered/nu_registered/iterations/iter_010/"
a, px = read_map(d + "reference_1.mrc"); mk, _ = read_map(d + "mask.mrc")
a = a * mk
rng = np.random.default_rng(0)
na = a + 2.0 * a.std() * rng.normal(size=a.shape).astype(np.float32) * mk
nb = a + 2.0 * a.std() * rng.normal(size=a.shape).astype(np.float32) * mk
n = a.shape[0]; size = 64; coarse = px * n / size
score, finish = reg._rotation_scorer(fourier_crop(na, size), fourier_crop(nb, size), coarse, 4.8, 4)
T = reg.align_maps_locally(na, nb, px, 4.8)
print("estimate", np.round(Rotation.from_matrix(T.matrix).as_rotvec(degrees=True), 3))
for axis in range(3):
    degs = np.linspace(-0.6, 0.6, 13)
    rv = np.zeros((13, 3)); rv[:, axis] = degs
    s = score(Rotation.from_rotvec(rv, degrees=True).as_matrix(), np.zeros(13, bool))
    p = np.polyfit(degs, s, 2)
    print("axis", axis, "scores", np.round(s - s.max(), 6).tolist(), "quadratic optimum", round(-p[1] / (2 * p[0]), 3))
