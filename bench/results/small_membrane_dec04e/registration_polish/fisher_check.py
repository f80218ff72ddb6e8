# Ran against commit dc8eab4 (before the polish; outputs in outputs_before_polish.txt). Kept as run: with the
# polish, _rotation_scorer returns three functions and align_maps_locally is no longer the grid search alone.
import sys, numpy as np
sys.path.insert(0, "/work/regnoise")
from fisher import rotation_sigma_deg
from cryocv.io.mrc import read_map
from cryocv.register import align_maps_locally
from scipy.spatial.transform import Rotation
d = "/work/relion_sm/cryocv_cpu_registered/nu_registered/iterations/iter_010/"
a, px = read_map(d + "reference_1.mrc"); mk, _ = read_map(d + "mask.mrc")
a = a * mk
rng = np.random.default_rng(0)
for noise_rel in (0.0, 0.5, 2.0):
    ests = []
    for t in range(5):
        na = a + noise_rel * a.std() * rng.normal(size=a.shape).astype(np.float32) * mk
        nb = a + noise_rel * a.std() * rng.normal(size=a.shape).astype(np.float32) * mk
        T = align_maps_locally(na, nb, px, 4.8, max_deg=8, fine_step_deg=0.125)
        ests.append(Rotation.from_matrix(T.matrix).as_rotvec(degrees=True))
    s, *_ = rotation_sigma_deg(na, nb, px, 4.8)
    ests = np.array(ests)
    print(f"noise {noise_rel}: predicted sigma {np.round(s,3)}; estimates rms per axis {np.round(np.sqrt((ests**2).mean(0)),3)}", flush=True)
    print(np.round(ests, 3))
