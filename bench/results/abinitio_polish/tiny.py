# tiny.py DIR DRAW at commit cd3c9b9 (grid-only check) and at 4cf4937 (polished) -> tiny_seeds.txt
"""The tiny ab-initio test's case (24 px, 600 particles): job with the current code; final map
registered to the truth by the grid alone and polished; FSC 0.5. Usage: tiny.py OUTDIR"""
import sys, os, numpy as np
sys.path.insert(0, "/work/main")
from tests.conftest import asymmetric_map
from tests.test_abinitio import quick_params, N, PX
from cryocv.simulate import simulate
from cryocv.jobs.abinitio import run
import cryocv.register as R
from cryocv.io.mrc import read_map
from cryocv.fsc import fsc_curve, resolution_at
root = sys.argv[1]; seed = int(sys.argv[2]) if len(sys.argv) > 2 else 2
orig0 = R._polish_rigid
def logged(*a):
    out = orig0(*a)
    print("POLISH", "accepted" if out is not a[4] else "rejected", "%.3f deg" % np.degrees(np.arccos(np.clip((np.trace(a[4].matrix.T @ out.matrix) - 1) / 2, -1, 1))))
    return out
R._polish_rigid = logged
truth = asymmetric_map(N, seed=11, n_atoms=50, sigma_px=1.0)
if not os.path.exists(f"{root}/sim"):
    simulate(truth, PX, 600, f"{root}/sim", snr=1.0, seed=seed, progress=False)
run(f"{root}/sim/particles.star", f"{root}/job", quick_params(), device="cpu", progress=False, overwrite=True)
full, _ = read_map(f"{root}/job/map.mrc")
pol = R.align_maps(truth, full, PX, 9.0)
R._polish_rigid = orig0
orig = R._polish_rigid; R._polish_rigid = lambda *a: a[4]
grid = R.align_maps(truth, full, PX, 9.0); R._polish_rigid = orig
for name, t in (("grid", grid), ("polished", pol)):
    c = fsc_curve(R.transform_volume(full, t), truth)
    print(name, "FSC0.5 %.2f A" % resolution_at(c, 0.5, N, PX), "rot %.2f" % t.rotation_deg, np.round(t.shift_px, 2))
