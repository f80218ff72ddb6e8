#!/bin/bash
# issues 12/17: page-locked read-ahead A/B with warm kernels; GPU tests; read stages; profile of local
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 MPLBACKEND=Agg
R=$OUT/r; mkdir -p $R
M=/tmp/maps/trpv1_128.mrc; M256=/tmp/maps/trpv1_256.mrc
python3 bench/make_map.py .maps/shared/3j5p_trpv1_c4.pdb --box 128 --pixel-size-A 1.2 --out $M
python3 bench/make_map.py .maps/shared/3j5p_trpv1_c4.pdb --box 256 --pixel-size-A 0.9 --out $M256
timeout 150 python3 -m pytest -q tests/test_gpu.py tests/test_source.py 2>&1 | tail -4 > $R/gpu_tests.log
L="bench/bench_local_gpu.py --map $M --n 50000 --out /tmp/bl"
python3 $L --warmup --tag _pinned --results $R/local_128_50k_pinned.json > $R/local_128_50k_pinned.log 2>&1
python3 $L --pageable-reads --tag _pageable --results $R/local_128_50k_pageable.json > $R/local_128_50k_pageable.log 2>&1
python3 $L --tag _pinned2 --results $R/local_128_50k_pinned2.json > $R/local_128_50k_pinned2.log 2>&1
for t in pinned pageable pinned2; do cp /tmp/bl/local_default_$t/run.log $R/local_128_50k_${t}_run.log; done
python3 bench/bench_read.py --particles /tmp/bl/sim/particles.star --out $R/read_128.json > /dev/null 2>&1
python3 bench/profile_job.py --function cryocv.jobs.local_refine:run --call 99 --cprofile-call 1 --out $R/prof_local_pinned -- $L --tag _prof --results $R/local_prof.json > $R/prof.log 2>&1
cd $OUT && tar czf r.tgz r; cd - > /dev/null
B="bench/bench_refine_gpu.py --map $M --n 50000 --truth-sym C4 --out /tmp/b128"
python3 $B --warmup --tag _pinned --results $R/refine_128_50k_pinned.json > $R/refine_128_50k_pinned.log 2>&1
python3 $B --pageable-reads --tag _pageable --results $R/refine_128_50k_pageable.json > $R/refine_128_50k_pageable.log 2>&1
cp /tmp/b128/refine_base15_b32_c4_pinned/run.log $R/refine_128_50k_pinned_run.log
cd $OUT && tar czf r.tgz r; cd - > /dev/null
timeout 200 python3 bench/bench_refine_gpu.py --map $M256 --n 20000 --truth-sym C4 --warmup --tag _pinned --out /tmp/b256 --results $R/refine_256_20k_pinned.json > $R/refine_256_20k_pinned.log 2>&1
cp /tmp/b256/refine_base15_b32_c4_pinned/run.log $R/refine_256_20k_pinned_run.log
cd $OUT && tar czf r.tgz r && rm -rf r
