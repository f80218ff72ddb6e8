import sys, time, numpy as np
import cryocv.register as reg
from cryocv.io.mrc import read_map
from scipy.spatial.transform import Rotation
rv = lambda L: Rotation.from_matrix(L).as_rotvec(degrees=True)
d = "/work/relion_sm/cryocv_cpu_registered/nu_registered/iterations/iter_010/"
a, px = read_map(d + "reference_1.mrc"); mk, _ = read_map(d + "mask.mrc")
a = a * mk
for noise in (0.5, 2.0):
    rng = np.random.default_rng(0); ests = []
    t0 = time.time()
    for t in range(5):
        na = a + noise * a.std() * rng.normal(size=a.shape).astype(np.float32) * mk
        nb = a + noise * a.std() * rng.normal(size=a.shape).astype(np.float32) * mk
        T = reg.align_maps_locally(na, nb, px, 4.8)
        ests.append(np.r_[rv(T.matrix), T.shift_px])
    ests = np.array(ests)
    print(f"noise {noise}: rms per axis {np.round(np.sqrt((ests[:, :3]**2).mean(0)), 3)} deg, shift rms {np.round(np.sqrt((ests[:, 3:]**2).mean(0)), 3)} px ({(time.time()-t0)/5:.1f} s each)", flush=True)
    L = Rotation.from_rotvec(np.array([1, 1, 0]) / np.sqrt(2), degrees=True).as_matrix()
    nb1 = reg.transform_volume(nb, reg.MapTransform(L, np.array([0.6, -0.4, 0.2]), 0.0), padding=4)
    T1 = reg.align_maps_locally(na, nb1, px, 4.8)
    print(f"   1° turn + (0.6,-0.4,0.2) px: residual {np.round(rv(T1.matrix @ L), 3)}, shift {np.round(T1.shift_px, 3)}, score {T1.score:.4f}", flush=True)
