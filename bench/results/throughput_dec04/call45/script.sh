#!/bin/bash
# issue 17: search roofline (memory vs texture) at box 128 and 256; sampling agreement mod C4; refine 256 20k
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 MPLBACKEND=Agg
R=$OUT/r; mkdir -p $R
M=/tmp/maps/trpv1_128.mrc; M256=/tmp/maps/trpv1_256.mrc
python3 bench/make_map.py .maps/shared/3j5p_trpv1_c4.pdb --box 128 --pixel-size-A 1.2 --out $M
python3 bench/make_map.py .maps/shared/3j5p_trpv1_c4.pdb --box 256 --pixel-size-A 0.9 --out $M256
timeout 120 python3 bench/search_roofline.py --map $M --resolution-A 2.4 --out $R/search_roofline_128 > $R/roofline_128.log 2>&1
timeout 150 python3 bench/search_roofline.py --map $M256 --resolution-A 2.7 --out $R/search_roofline_256 > $R/roofline_256.log 2>&1
cd $OUT && tar czf r.tgz r; cd - > /dev/null
python3 -m cryocv simulate --map $M --n 20000 --snr 0.05 --seed 1 --device gpu --out /tmp/s20k --quiet > $R/sim20k.log 2>&1
timeout 90 python3 bench/sampling_agreement.py --particles /tmp/s20k/particles.star --map $M --n 20000 --resolution-A 4 --sym C4 --out $R/sampling_agreement_128.json > $R/sampling_agreement.log 2>&1
cd $OUT && tar czf r.tgz r; cd - > /dev/null
timeout 200 python3 bench/bench_refine_gpu.py --map $M256 --n 20000 --truth-sym C4 --warmup --tag _a --out /tmp/b256 --results $R/refine_256_20k_a.json > $R/refine_256_20k_a.log 2>&1
cp /tmp/b256/refine_base15_b32_c4_a/run.log $R/refine_256_20k_a_run.log
cd $OUT && tar czf r.tgz r && rm -rf r
