# Ran at commit be04393 (first version of the polish) on the SGD state of a stopped CPU run of
# bench_abinitio.py --map cxcr4_96.mrc --n 8000 (/tmp/ab_off, not kept: four 96^3 maps).
"""Ab-initio's SGD half-set check (align_maps with keep_identity_within, 0.5° fine step, 2-fold padding)
on the two SGD maps of an 8,000-particle CXCR4+Nb run (box 96, 1.5 Å/px; stopped near iteration 140):
is its ~1° move at every check the maps' offset or the estimator's? Known turns applied to map 2."""
import numpy as np, time
from scipy.spatial.transform import Rotation
from cryocv.register import align_maps, align_maps_locally, transform_volume, MapTransform
d = np.load("/tmp/ab_off/abinitio/sgd_state.npz", allow_pickle=True)
v1, v2 = d["volume_1"], d["volume_2"]
px, res = 1.5, 6.5
rv = lambda L: Rotation.from_matrix(L).as_rotvec(degrees=True)
for axis, deg in (("x", 0.0), ("x", 0.5), ("x", 1.0), ("y", 0.5), ("z", 0.5), ("z", -0.5)):
    L = Rotation.from_euler(axis, deg, degrees=True).as_matrix()
    w = transform_volume(v2, MapTransform(L, np.zeros(3)), padding=4) if deg else v2
    t0 = time.time()
    g = align_maps(v1, w, px, res, keep_identity_within=0.005)
    p = align_maps_locally(v1, w, px, res)
    print(f"applied {deg:+.1f}° about {axis}: SGD check's estimate {np.round(rv(g.matrix),2)} -> pair offset {np.round(rv(g.matrix @ L),2)}; "
          f"polished local {np.round(rv(p.matrix),2)} -> {np.round(rv(p.matrix @ L),2)} ({time.time()-t0:.0f} s)", flush=True)
