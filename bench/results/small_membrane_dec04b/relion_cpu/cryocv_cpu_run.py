"""cryocv uniform and NU on the CPU (1 thread) on the 2 000 particles RELION refines: wall and CPU time, judged as bench_small_membrane judges."""
import json, os, resource, sys, time
sys.path.insert(0, "/work/snap_relion"); sys.path.insert(0, "/work/snap_relion/bench")
from bench_small_membrane import judge_job
from cryocv.io.mrc import read_map
from cryocv.io.particle_files import load_particles
from cryocv.jobs.refine import RefineParams, run as run_refine
data = "/work/relion_sm/snr0.03"
truth, px = read_map(f"{data}/truth_protein.mrc"); mask, _ = read_map(f"{data}/protein_mask.mrc")
everyone = load_particles(f"{data}/particles.star")
out = {}
for reg in sys.argv[1:]:
    job = f"/work/relion_sm/cryocv_cpu/{reg}"
    t0, c0 = time.time(), resource.getrusage(resource.RUSAGE_SELF)
    run_refine(f"{data}/n2000.star", f"{data}/initial_reference.mrc", job,
               RefineParams(regularizer=reg, max_iterations=20), device="cpu", progress=False, overwrite=True)
    c1 = resource.getrusage(resource.RUSAGE_SELF)
    out[reg] = {**judge_job(job, truth, mask, px, everyone), "wall_s": round(time.time() - t0, 1),
                "cpu_s": round(c1.ru_utime + c1.ru_stime - c0.ru_utime - c0.ru_stime, 1)}
    print(reg, json.dumps({k: v for k, v in out[reg].items() if not isinstance(v, dict)}), flush=True)
    json.dump(out, open("/work/relion_sm/cryocv_cpu/result.json", "w"), indent=1)
