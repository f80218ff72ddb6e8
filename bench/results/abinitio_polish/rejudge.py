"""Judge both bench_abinitio jobs (grid-only check at cd3c9b9, polished check now) with the same
(current, polished) registration to the truth. Usage: rejudge.py JOB_DIR... (each with sim/ and abinitio/)"""
import json, os, sys
sys.path[:0] = ["/work/main", "/work/main/bench"]
from bench_abinitio import judge
from cryocv.io.mrc import read_map
from cryocv.io.particle_files import load_particles
truth, px = read_map("/work/polish_exp/cxcr4_64_225.mrc")
for out in sys.argv[1:]:
    result = judge(os.path.join(out, "abinitio"), truth, px, load_particles(os.path.join(out, "sim", "particles.star")), "C1")
    print(out, json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in result.items()
                           if not isinstance(v, (dict, list))}), flush=True)
