#!/bin/bash
# issue 15, session 2026-12-04b call 4: sharpened alignment references (a B-factor on the references the search uses), CXCR4 atomic belt
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 MPLBACKEND=Agg
R=$OUT/r; mkdir -p $R
save() { cd $OUT && tar czf r.tgz r; cd - > /dev/null; }
C=.maps/shared/8zpm_cxcr4.cif
V="uniform nu uniform:align_bfactor_A2=-50 nu:align_bfactor_A2=-50 uniform:align_bfactor_A2=-100 nu:align_bfactor_A2=-100 uniform:align_bfactor_A2=-200 nu:align_bfactor_A2=-200"
for snr in 0.02 0.03; do
timeout 230 python3 bench/bench_small_membrane.py --snr $snr --n 2000 4000 16000 --box-size 96 --pixel-size-A 1.2 --chains R \
  --model $C --regularizers $V --max-iterations 20 --device gpu --out /tmp/sma --results $R/cxcr4_bsharp_snr$snr > $R/cxcr4_bsharp_snr$snr.log 2>&1
save
done
rm -rf $R
