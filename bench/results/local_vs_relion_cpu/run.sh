#!/bin/bash
# issue 12: a finished RELION 3.1 local refinement on the same particles as cryocv (CPU, this machine)
set -x
cd /work/main
export MPLBACKEND=Agg OMP_NUM_THREADS=2
PY=/work/venv/bin/python
date
$PY bench/bench_local.py --kDa 50 --n 2000 --snr 0.1 --box 128 --regularizer uniform --narrow-steps 2 --no-priors \
   --device cpu --out /tmp/rl/cv --results /tmp/rl/cryocv_local_2k > /tmp/rl/cryocv.log 2>&1
date
$PY bench/relion_local.py /tmp/rl/cv/consensus_registered_50/particles.star /tmp/rl/cv/consensus_registered_50/map.mrc \
   /tmp/rl/cv/data_50/mask_domain.mrc --out /tmp/rl/relion50 --sigma-ang 6.67 --offset-range-A 10 --mpi 3 --threads 1 \
   --dataset /tmp/rl/cv/data_50 > /tmp/rl/relion.log 2>&1
date
