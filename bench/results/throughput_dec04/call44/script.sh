#!/bin/bash
# issue 12/17: fused CTF kernel + one metadata copy per batch; GPU tests; local 50k x3; refine 50k; 200k
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 MPLBACKEND=Agg
R=$OUT/r; mkdir -p $R
M=/tmp/maps/trpv1_128.mrc
python3 bench/make_map.py .maps/shared/3j5p_trpv1_c4.pdb --box 128 --pixel-size-A 1.2 --out $M
timeout 150 python3 -m pytest -q tests/test_gpu.py tests/test_source.py 2>&1 | tail -4 > $R/gpu_tests.log
L="bench/bench_local_gpu.py --map $M --n 50000 --out /tmp/bl"
python3 $L --warmup --tag _a --results $R/local_128_50k_a.json > $R/local_128_50k_a.log 2>&1
python3 $L --tag _b --results $R/local_128_50k_b.json > $R/local_128_50k_b.log 2>&1
python3 $L --tag _c --results $R/local_128_50k_c.json > $R/local_128_50k_c.log 2>&1
for t in a b c; do cp /tmp/bl/local_default_$t/run.log $R/local_128_50k_${t}_run.log; done
cd $OUT && tar czf r.tgz r; cd - > /dev/null
B="bench/bench_refine_gpu.py --map $M --n 50000 --truth-sym C4 --out /tmp/b128"
python3 $B --warmup --tag _a --results $R/refine_128_50k_a.json > $R/refine_128_50k_a.log 2>&1
python3 $B --tag _b --results $R/refine_128_50k_b.json > $R/refine_128_50k_b.log 2>&1
cp /tmp/b128/refine_base15_b32_c4_a/run.log $R/refine_128_50k_a_run.log
cd $OUT && tar czf r.tgz r; cd - > /dev/null
timeout 230 python3 bench/bench_refine_gpu.py --map $M --n 200000 --truth-sym C4 --tag _a --out /tmp/b128_200k --results $R/refine_128_200k_a.json > $R/refine_128_200k_a.log 2>&1
cp /tmp/b128_200k/refine_base15_b32_c4_a/run.log $R/refine_128_200k_a_run.log
cd $OUT && tar czf r.tgz r && rm -rf r
