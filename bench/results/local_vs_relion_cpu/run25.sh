#!/bin/bash
# issue 12: a finished RELION 3.1 local refinement at 25 kDa on the same particles as cryocv (CPU, this machine)
set -x
cd /work/snap_main
export MPLBACKEND=Agg OMP_NUM_THREADS=2
PY=/work/venv/bin/python
date
$PY bench/bench_local.py --kDa 25 --n 2000 --snr 0.1 --box 128 --regularizer uniform --narrow-steps 2 --no-priors \
   --device cpu --out /tmp/rl/cv25 --results /tmp/rl/cryocv_local_2k_25 > /tmp/rl/cryocv25.log 2>&1
date
$PY bench/relion_local.py /tmp/rl/cv25/consensus_registered_25/particles.star /tmp/rl/cv25/consensus_registered_25/map.mrc \
   /tmp/rl/cv25/data_25/mask_domain.mrc --out /tmp/rl/relion25 --sigma-ang 6.67 --offset-range-A 10 --mpi 3 --threads 1 \
   --dataset /tmp/rl/cv25/data_25 > /tmp/rl/relion25.log 2>&1
date
