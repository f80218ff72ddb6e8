# Ran on the SGD state at iteration 200 of a bench_abinitio run with an intermediate version (the polish in
# align_maps trusted only within two fine steps, dropped): /tmp/sgd_state_main_200.npz 9.0 2.25 -> sgd_maps_known_turns.txt.
# Its "guard 2 steps" rows are that version; "linear-range guard only" is what align_maps does now.
"""On the final SGD maps of a bench_abinitio run (CXCR4+Nb, box 64, 2.25 Å/px, 4,000 particles):
known turns applied to map 2; the pair's own offset implied by each estimator should not change
with the applied turn. Estimators: ab-initio's check (align_maps: global 0.5° grid + polish within
two fine steps), the same grid alone, the polish with the linear-range guard only, and
align_maps_locally. Usage: sgd_final_linearity.py JOB_DIR|sgd_state.npz RES_A [PIXEL_SIZE_A]"""
import sys, time
import numpy as np
from scipy.spatial.transform import Rotation
sys.path.insert(0, "/work/main")
import cryocv.register as R
from cryocv.io.mrc import read_map
job, res = sys.argv[1], float(sys.argv[2])
if job.endswith(".npz"):
    d = np.load(job, allow_pickle=True); v1, v2, px = d["volume_1"], d["volume_2"], float(sys.argv[3])
else:
    v1, px = read_map(f"{job}/sgd_half_map_1.mrc"); v2, _ = read_map(f"{job}/sgd_half_map_2.mrc")
rv = lambda L: Rotation.from_matrix(L).as_rotvec(degrees=True)
orig, steps = R._polish_rigid, getattr(R, "POLISH_GRID_STEPS", None)   # None: the current code (no such guard)
def estimators(w):
    out = {"check (polished, guard 2 steps)": R.align_maps(v1, w, px, res, keep_identity_within=R.IN_REGISTER_SCORE if hasattr(R, "IN_REGISTER_SCORE") else 0.005)}
    R._polish_rigid = lambda *a, **k: a[4]
    out["grid alone"] = R.align_maps(v1, w, px, res, keep_identity_within=0.005)
    R._polish_rigid = orig
    if steps is not None:
        R.POLISH_GRID_STEPS = 100.0
    out["polished, linear-range guard only"] = R.align_maps(v1, w, px, res, keep_identity_within=0.005)
    if steps is not None:
        R.POLISH_GRID_STEPS = steps
    out["align_maps_locally"] = R.align_maps_locally(v1, w, px, res)
    return out
for axis, deg in (("x", 0.0), ("x", 0.5), ("x", 1.0), ("y", 0.5), ("z", 0.5), ("z", -0.5)):
    L = Rotation.from_euler(axis, deg, degrees=True).as_matrix()
    w = R.transform_volume(v2, R.MapTransform(L, np.zeros(3)), padding=4) if deg else v2
    t0 = time.time()
    for name, g in estimators(w).items():
        print(f"applied {deg:+.1f}° about {axis}: {name:36s} estimate {np.round(rv(g.matrix), 3)} -> pair offset "
              f"{np.round(rv(L @ g.matrix), 3)}", flush=True)
    print(f"  ({time.time() - t0:.0f} s)", flush=True)
