"""Belt motion dataset (tilt 10°, shift 3 Å; /tmp/mb/a/snr0.03, 2,000 particles): one regularizer refined
from the 30 Å start with --staged-start-res-A 8, judged as bench_small_membrane judges. Usage: staged.py REG"""
import json, sys, time
sys.path[:0] = ["/work/main", "/work/main/bench"]
from bench_small_membrane import judge_job
from cryocv.io.mrc import read_map
from cryocv.io.particle_files import load_particles
from cryocv.jobs.refine import RefineParams, run as run_refine
data, reg = "/tmp/mb/a/snr0.03", sys.argv[1]
truth, px = read_map(f"{data}/truth_protein.mrc"); mask, _ = read_map(f"{data}/protein_mask.mrc")
everyone = load_particles(f"{data}/particles.star")
job = f"/tmp/mb/{reg}_staged8"
t0 = time.time()
run_refine(f"{data}/n2000/particles.star", f"{data}/initial_reference.mrc", job,
           RefineParams(regularizer=reg, max_iterations=20, staged_start_res_A=8.0), device="cpu", progress=False,
           overwrite=True)
result = {**judge_job(job, truth, mask, px, everyone), "wall_s": round(time.time() - t0, 1)}
print(reg, json.dumps({k: v for k, v in result.items() if not isinstance(v, dict)}), flush=True)
json.dump(result, open(f"/work/main/bench/results/small_membrane_dec04c/cpu_belt_motion/{reg}_staged8.json", "w"), indent=1)
