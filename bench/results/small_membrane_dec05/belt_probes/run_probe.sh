#!/bin/bash
# Ran at commit cd3c9b9 on the 2 CPU cores (one job per core, sharing them with other work):
#   run_probe.sh dense belt_mass_ratio=1.5 belt_density_fraction=1.0
#   run_probe.sh nanodisc belt=nanodisc belt_mass_ratio=1.5
# usage: run_probe.sh NAME dataset_opts...
name=$1; shift
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1
cd /work/main
/work/venv/bin/python bench/bench_small_membrane.py --snr 0.03 --n 2000 --box-size 96 --pixel-size-A 1.2 \
  --max-iterations 20 --device cpu --floor --regularizers uniform nu \
  --out /work/probes/$name --results /work/probes/$name/result -- "$@" \
  > /work/probes/$name.log 2>&1
