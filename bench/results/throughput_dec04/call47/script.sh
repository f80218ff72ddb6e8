#!/bin/bash
# review fixes (texture per device, released after each pass/half; exact-size page-locked buffers): GPU tests + local 50k
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 MPLBACKEND=Agg
R=$OUT/r; mkdir -p $R
M=/tmp/maps/trpv1_128.mrc
python3 bench/make_map.py .maps/shared/3j5p_trpv1_c4.pdb --box 128 --pixel-size-A 1.2 --out $M
timeout 150 python3 -m pytest -q tests/test_gpu.py tests/test_source.py 2>&1 | tail -6 > $R/gpu_tests.log
cd $OUT && tar czf r.tgz r; cd - > /dev/null
L="bench/bench_local_gpu.py --map $M --n 50000 --out /tmp/bl"
python3 $L --warmup --tag _a --results $R/local_128_50k_a.json > $R/local_128_50k_a.log 2>&1
python3 $L --tag _b --results $R/local_128_50k_b.json > $R/local_128_50k_b.log 2>&1
for t in a b; do cp /tmp/bl/local_default_$t/run.log $R/local_128_50k_${t}_run.log; done
cd $OUT && tar czf r.tgz r && rm -rf r
