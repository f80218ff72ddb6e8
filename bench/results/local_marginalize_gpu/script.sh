#!/bin/bash
# issue 12: local marginalization (--marginalize-step-deg) on the two-body benchmark, 2000 particles, 25 and 50 kDa
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 MPLBACKEND=Agg
R=$OUT/r; mkdir -p $R
B="bench/bench_local.py --kDa 50 25 --n 2000 --snr 0.1 --box 128 --regularizer uniform --narrow-steps 2 --no-priors --device gpu --model .maps/shared/3j5p_trpv1_c4.pdb --out /tmp/lv"
timeout 120 python3 $B --results $R/local_2k_best > $R/local_2k_best.log 2>&1
cd $OUT && tar czf r.tgz r; cd - > /dev/null
for s in 2 1 4; do
  timeout 50 python3 $B --marginalize-step-deg $s --results $R/local_2k_spread$s > $R/local_2k_spread$s.log 2>&1
  cd $OUT && tar czf r.tgz r; cd - > /dev/null
done
cd $OUT && tar czf r.tgz r && rm -rf r
