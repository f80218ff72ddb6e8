#!/bin/bash
# belt motion (tilt 10 deg, shift 3 A), CXCR4 R, atomic belt, box 96 at 1.2 A, SNR 0.03, 2000 particles, CPU 1 thread per job
cd /work/main
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1
P="python bench/bench_small_membrane.py --snr 0.03 --n 2000 --box-size 96 --pixel-size-A 1.2 --chains R --max-iterations 20 --device cpu"
$P --floor --regularizers uniform --out /tmp/mb/a --results /tmp/mb/res_uniform > /tmp/mb/uniform.log 2>&1 &
$P --regularizers nu --out /tmp/mb/b --results /tmp/mb/res_nu > /tmp/mb/nu.log 2>&1 &
wait
