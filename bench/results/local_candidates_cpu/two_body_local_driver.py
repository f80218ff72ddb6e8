import sys, os, json, time
sys.path.insert(0, "/work/main/bench"); sys.path.insert(0, "/work/main")
import numpy as np
from two_body_dataset import domain_pose_error_deg, load_truth, masked_fsc_resolution
from cryocv.io.mrc import read_map
from cryocv.io.particle_files import load_particles
from cryocv.jobs import local_refine
c = int(sys.argv[1])
run = "/tmp/diagdir/tb/run"; data = f"{run}/data_50"; cons = f"{run}/consensus_registered_50"
out = f"/tmp/diagdir/tb/local_c{c}"
t0 = time.time()
rep = local_refine.run(f"{cons}/particles.star", [f"{cons}/half_map_{h}.mrc" for h in (1, 2)], f"{data}/mask_domain.mrc", out,
                       local_refine.LocalRefineParams(subtract=True, regularizer="uniform", n_base_candidates=c),
                       device="cpu", progress=False, overwrite=True)
wall = time.time() - t0
domain, px = read_map(f"{data}/map_domain.mrc"); mask, _ = read_map(f"{data}/mask_domain.mrc")
truth = load_truth(f"{data}/truth.npz")
res = {"base_candidates": c, "wall_s": round(wall, 1)}
for name, job in (("consensus", cons), ("local", out)):
    vol, _ = read_map(f"{job}/map.mrc")
    res[f"{name}_domain_fsc05_A"] = masked_fsc_resolution(vol, domain, mask, px, 0.5)
    err = domain_pose_error_deg(load_particles(f"{job}/particles.star").rotations, truth)
    res[f"{name}_domain_pose_error_median_deg"] = float(np.median(err))
res["pass_seconds"] = [h["pass_seconds"] for h in rep["iterations"]]
json.dump(res, open(f"/tmp/diagdir/tb/res_local_c{c}.json", "w"), indent=1)
print(res)
