"""CPU proxy of issue 12's candidate question (how many start candidates a local search keeps):
``prep KDA`` builds the two-body dataset (1000 particles, uniform) and the registered consensus as
bench/bench_local.py does; ``local KDA C [S]`` runs local-refine --subtract with C start candidates (and
--narrow-steps S) from it and judges the domain against the truth (writes res_local_KDA_cC.json)."""
import json, os, sys, time
sys.path.insert(0, "/work/main/bench"); sys.path.insert(0, "/work/main")
import numpy as np
from bench_local import register_to_truth
from two_body_dataset import build_dataset, domain_pose_error_deg, load_truth, masked_fsc_resolution
from cryocv.fourier import lowpass_map
from cryocv.io.mrc import read_map, write_map
from cryocv.io.particle_files import load_particles
from cryocv.jobs import local_refine, reconstruct, refine

stage, kDa = sys.argv[1], float(sys.argv[2])
run = f"/tmp/diagdir/tb{kDa:g}"
data, cons = f"{run}/data", f"{run}/consensus_registered"
if stage == "prep":
    build_dataset(data, 1000, domain_kDa=kDa, box_size=128, snr=0.1, hinge_sigma_deg=7.0, seed=0, xp=np)
    full, px = read_map(f"{data}/map_full.mrc")
    write_map(f"{run}/ref30.mrc", lowpass_map(full, px, 30.0).astype(np.float32), px)
    t0 = time.time()
    refine.run(f"{data}/particles.star", f"{run}/ref30.mrc", f"{run}/consensus", refine.RefineParams(), device="cpu",
               progress=False, overwrite=True)
    print("consensus", round(time.time() - t0), "s", flush=True)
    star = register_to_truth(f"{run}/consensus/particles.star", load_truth(f"{data}/truth.npz"), "C4", f"{cons}.star")
    reconstruct.run(star, cons, device="cpu", progress=False, overwrite=True)
    sys.exit()
c = int(sys.argv[3])
narrow = int(sys.argv[4]) if len(sys.argv) > 4 else 0       # --narrow-steps
out = f"{run}/local_c{c}" + (f"_narrow{narrow}" if narrow else "")
t0 = time.time()
rep = local_refine.run(f"{cons}/particles.star", [f"{cons}/half_map_{h}.mrc" for h in (1, 2)], f"{data}/mask_domain.mrc",
                       out, local_refine.LocalRefineParams(subtract=True, regularizer="uniform", n_base_candidates=c,
                                                      narrow_steps=narrow),
                       device="cpu", progress=False, overwrite=True)
domain, px = read_map(f"{data}/map_domain.mrc"); mask, _ = read_map(f"{data}/mask_domain.mrc")
truth = load_truth(f"{data}/truth.npz")
res = {"domain_kDa": kDa, "base_candidates": c, "narrow_steps": narrow, "wall_s": round(time.time() - t0, 1)}
for name, job in (("consensus", cons), ("local", out)):
    vol, _ = read_map(f"{job}/map.mrc")
    res[f"{name}_domain_fsc05_A"] = masked_fsc_resolution(vol, domain, mask, px, 0.5)
    err = domain_pose_error_deg(load_particles(f"{job}/particles.star").rotations, truth)
    res[f"{name}_domain_pose_error_median_deg"] = float(np.median(err))
res["pass_seconds"] = [h["pass_seconds"] for h in rep["iterations"]]
json.dump(res, open(f"{run}/res_local_{kDa:g}_c{c}" + (f"_narrow{narrow}" if narrow else "") + ".json", "w"), indent=1)
print(res)
