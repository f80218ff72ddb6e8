import sys, time, numpy as np
sys.path.insert(0, "/work/regnoise")
from gn import align_locally_gn
import cryocv.register as reg
from cryocv.io.mrc import read_map
from scipy.spatial.transform import Rotation
rv = lambda L: Rotation.from_matrix(L).as_rotvec(degrees=True)
d = "/work/relion_sm/cryocv_cpu_registered/nu_registered/iterations/iter_010/"
a, px = read_map(d + "reference_1.mrc"); mk, _ = read_map(d + "mask.mrc")
a = a * mk
for noise in (0.5, 2.0):
    rng = np.random.default_rng(0); ests, coarse = [], []
    for t in range(5):
        na = a + noise * a.std() * rng.normal(size=a.shape).astype(np.float32) * mk
        nb = a + noise * a.std() * rng.normal(size=a.shape).astype(np.float32) * mk
        T, C, sig, sigt, steps = align_locally_gn(na, nb, px, 4.8)
        ests.append(rv(T.matrix)); coarse.append(rv(C.matrix))
    ests, coarse = np.array(ests), np.array(coarse)
    print(f"noise {noise}: GN rms per axis {np.round(np.sqrt((ests**2).mean(0)), 3)} (coarse {np.round(np.sqrt((coarse**2).mean(0)), 3)}); "
          f"predicted sigma {np.round(sig, 3)} deg, shift {np.round(sigt, 3)} px; GN steps {len(steps)}", flush=True)
    L = Rotation.from_rotvec(np.array([1, 1, 0]) / np.sqrt(2), degrees=True).as_matrix()
    nb1 = reg.transform_volume(nb, reg.MapTransform(L, np.array([0.3, -0.2, 0.1]), 0.0), padding=4)
    T1, C1, *_ = align_locally_gn(na, nb1, px, 4.8)
    print(f"   1° turn + (0.3,-0.2,0.1) px: residual GN {np.round(rv(T1.matrix @ L), 3)} (coarse {np.round(rv(C1.matrix @ L), 3)}), "
          f"shift {np.round(T1.shift_px, 3)}", flush=True)
