#!/bin/bash
# issue 12: cryocv local-refine --marginalize-step-deg 1 on the same 25 kDa particles and consensus as the finished RELION run (CPU)
set -x
cd /work/snap_main
export MPLBACKEND=Agg OMP_NUM_THREADS=2
date
/work/venv/bin/python bench/bench_local.py --kDa 25 --n 2000 --snr 0.1 --box 128 --regularizer uniform --narrow-steps 2 --no-priors \
   --marginalize-step-deg 1 --device cpu --out /tmp/rl/cv25 --results /tmp/rl/cryocv_local_2k_25_spread1 > /tmp/rl/cryocv25m.log 2>&1
date
