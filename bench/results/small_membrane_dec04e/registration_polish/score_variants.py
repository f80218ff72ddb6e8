# Ran against commit dc8eab4 (before the polish; outputs in outputs_before_polish.txt). Kept as run: with the
# polish, _rotation_scorer returns three functions and align_maps_locally is no longer the grid search alone.
import numpy as np, time
import cryocv.register as reg
from cryocv.io.mrc import read_map
from cryocv.projector import sample_volume_ft
from scipy.spatial.transform import Rotation
d = "/work/relion_sm/cryocv_cpu_registered/nu_registered/iterations/iter_010/"
a, px = read_map(d + "reference_1.mrc"); mk, _ = read_map(d + "mask.mrc")
a = a * mk
orig = reg._scores
def cross_only(reference_values, moving_ft, matrices, points, padding):
    xp = np
    kx, ky, kz = points
    out = []
    ref_norm = float(np.sqrt((np.abs(reference_values) ** 2).sum()))
    step = max(1, reg._CHUNK_POINTS // max(1, kx.size))
    for s in range(0, matrices.shape[0], step):
        L = matrices[s:s + step].astype(np.float32)
        q = [padding * (L[:, i, 0, None] * kx[None] + L[:, i, 1, None] * ky[None] + L[:, i, 2, None] * kz[None]) for i in range(3)]
        values = sample_volume_ft(moving_ft, *q)
        out.append((reference_values[None].conj() * values).real.sum(axis=1) / ref_norm ** 2)
    return np.concatenate(out)
for name, fn in (("normalized (now)", orig), ("cross / |ref|^2", cross_only)):
    reg._scores = fn
    for noise in (0.5, 2.0):
        rng = np.random.default_rng(0); ests = []
        t0 = time.time()
        for t in range(5):
            na = a + noise * a.std() * rng.normal(size=a.shape).astype(np.float32) * mk
            nb = a + noise * a.std() * rng.normal(size=a.shape).astype(np.float32) * mk
            T = reg.align_maps_locally(na, nb, px, 4.8)
            ests.append(Rotation.from_matrix(T.matrix).as_rotvec(degrees=True))
        # known rotation: nb turned by 1 deg about (1,1,0)/sqrt2
        L = Rotation.from_rotvec(np.array([1, 1, 0]) / np.sqrt(2), degrees=True).as_matrix()
        nb1 = reg.transform_volume(nb, reg.MapTransform(L, np.zeros(3), 0.0), padding=4)
        T1 = reg.align_maps_locally(na, nb1, px, 4.8)
        err = Rotation.from_matrix(T1.matrix @ L).as_rotvec(degrees=True)
        ests = np.array(ests)
        print(f"{name}, noise {noise}: rms per axis {np.round(np.sqrt((ests**2).mean(0)), 3)}; 1° turn recovered with residual {np.round(err, 3)} ({time.time()-t0:.0f} s)", flush=True)
reg._scores = orig
