#!/bin/bash
# issue 17/12 measurements: GPU tests, E-step sampling agreement, batch-size A/B, box 256, 200k
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 MPLBACKEND=Agg
R=$OUT/r; mkdir -p $R
M=/tmp/maps/trpv1_128.mrc; M256=/tmp/maps/trpv1_256.mrc
python3 bench/make_map.py .maps/shared/3j5p_trpv1_c4.pdb --box 128 --pixel-size-A 1.2 --out $M
python3 bench/make_map.py .maps/shared/3j5p_trpv1_c4.pdb --box 256 --pixel-size-A 0.9 --out $M256
timeout 120 python3 -m pytest -q tests/test_gpu.py 2>&1 | tail -4 > $R/gpu_tests.log
B="bench/bench_refine_gpu.py --map $M --n 50000 --truth-sym C4 --out /tmp/b128"
python3 $B --warmup --results $R/refine_128_50k.json > $R/refine_128_50k.log 2>&1
python3 $B --batch-size 8192 --tag _b8192 --results $R/refine_128_50k_b8192.json > $R/refine_128_50k_b8192.log 2>&1
cp /tmp/b128/refine_base15_b32_c4/run.log $R/refine_128_50k_run.log
timeout 60 python3 bench/sampling_agreement.py --particles /tmp/b128/sim/particles.star --map $M --n 20000 --resolution-A 4 --sym C4 --out $R/sampling_agreement_128.json > $R/sampling_agreement.log 2>&1
L="bench/bench_local_gpu.py --map $M --n 50000 --out /tmp/bl"
python3 $L --results $R/local_128_50k.json > $R/local_128_50k.log 2>&1
python3 $L --local-args "--batch-size 8192" --results $R/local_128_50k_b8192.json > $R/local_128_50k_b8192.log 2>&1
cp /tmp/bl/local_default/run.log $R/local_128_50k_run.log
timeout 150 python3 bench/bench_refine_gpu.py --map $M256 --n 20000 --truth-sym C4 --out /tmp/b256 --results $R/refine_256_20k.json > $R/refine_256_20k.log 2>&1
cp /tmp/b256/refine_base15_b32_c4/run.log $R/refine_256_20k_run.log
cd $OUT && tar czf r.tgz r
cd - >/dev/null
timeout 200 python3 bench/bench_refine_gpu.py --map $M --n 200000 --truth-sym C4 --out /tmp/b128_200k --results $R/refine_128_200k.json > $R/refine_128_200k.log 2>&1
cp /tmp/b128_200k/refine_base15_b32_c4/run.log $R/refine_128_200k_run.log
cd $OUT && tar czf r.tgz r && rm -rf r
