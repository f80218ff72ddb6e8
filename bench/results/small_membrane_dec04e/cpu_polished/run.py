"""The default refinement (half-sets kept in register since 91cb844) on the CPU (1 thread) on the same 2 000 CXCR4
particles (SNR 0.03) as RELION and the earlier CPU runs (small_membrane_dec04b/relion_cpu/): wall and
CPU time, judged as bench_small_membrane judges. Usage: run.py REGULARIZER OUT_DIR."""
import json, os, resource, sys, time
HERE = "/work/main"
sys.path[:0] = [HERE, os.path.join(HERE, "bench")]
from bench_small_membrane import judge_job
from cryocv.io.mrc import read_map
from cryocv.io.particle_files import load_particles
from cryocv.jobs.refine import RefineParams, run as run_refine
data = "/work/relion_sm/snr0.03"
truth, px = read_map(f"{data}/truth_protein.mrc"); mask, _ = read_map(f"{data}/protein_mask.mrc")
everyone = load_particles(f"{data}/particles.star")
reg, out_dir = sys.argv[1], sys.argv[2]
job = os.path.join(out_dir, f"{reg}_registered")
t0, c0 = time.time(), resource.getrusage(resource.RUSAGE_SELF)
report = run_refine(f"{data}/n2000.star", f"{data}/initial_reference.mrc", job,
                    RefineParams(regularizer=reg, max_iterations=20), device="cpu",
                    progress=False, overwrite=True)
c1 = resource.getrusage(resource.RUSAGE_SELF)
result = {**judge_job(job, truth, mask, px, everyone), "wall_s": round(time.time() - t0, 1),
          "cpu_s": round(c1.ru_utime + c1.ru_stime - c0.ru_utime - c0.ru_stime, 1),
          "alignment_resolution_A": [round(h["alignment_resolution_A"], 2) for h in report["iterations"]],
          "registration": [h.get("half_set_registration") for h in report["iterations"]]}
print(reg, json.dumps({k: v for k, v in result.items() if not isinstance(v, dict)}), flush=True)
json.dump(result, open(os.path.join(out_dir, f"result_{reg}.json"), "w"), indent=1)
