#!/bin/bash
# issue 17: TF32 products for the base grid and unfused local start: tests, roofline, ranking agreement, jobs A/B
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 MPLBACKEND=Agg
R=$OUT/r; mkdir -p $R
M=/tmp/maps/trpv1_128.mrc
python3 bench/make_map.py .maps/shared/3j5p_trpv1_c4.pdb --box 128 --pixel-size-A 1.2 --out $M
timeout 150 python3 -m pytest -q tests/test_gpu.py tests/test_source.py 2>&1 | tail -6 > $R/gpu_tests.log
CRYOCV_GPU_PRODUCTS=tf32 timeout 100 python3 bench/search_roofline.py --map $M --resolution-A 2.4 --out $R/search_roofline_128_tf32 > $R/roofline_128_tf32.log 2>&1
python3 -m cryocv simulate --map $M --n 20000 --snr 0.05 --seed 1 --device gpu --out /tmp/s20k --quiet > $R/sim20k.log 2>&1
timeout 90 python3 bench/sampling_agreement.py --compare products --particles /tmp/s20k/particles.star --map $M --n 20000 --resolution-A 4 --sym C4 --out $R/products_agreement_128.json > $R/products_agreement.log 2>&1
cd $OUT && tar czf r.tgz r; cd - > /dev/null
L="bench/bench_local_gpu.py --map $M --n 50000 --out /tmp/bl"
python3 $L --warmup --tag _fp32 --results $R/local_128_50k_fp32.json > $R/local_128_50k_fp32.log 2>&1
CRYOCV_GPU_PRODUCTS=tf32 python3 $L --tag _tf32 --results $R/local_128_50k_tf32.json > $R/local_128_50k_tf32.log 2>&1
for t in fp32 tf32; do cp /tmp/bl/local_default_$t/run.log $R/local_128_50k_${t}_run.log; done
cd $OUT && tar czf r.tgz r; cd - > /dev/null
B="bench/bench_refine_gpu.py --map $M --n 50000 --truth-sym C4 --out /tmp/b128"
python3 $B --warmup --tag _fp32 --results $R/refine_128_50k_fp32.json > $R/refine_128_50k_fp32.log 2>&1
CRYOCV_GPU_PRODUCTS=tf32 python3 $B --tag _tf32 --results $R/refine_128_50k_tf32.json > $R/refine_128_50k_tf32.log 2>&1
cd $OUT && tar czf r.tgz r && rm -rf r
