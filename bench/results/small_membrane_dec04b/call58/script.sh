#!/bin/bash
# issue 15, session 2026-12-04b call 3: is the gap to the truth-start a search failure or the schedule? CXCR4 atomic belt
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 MPLBACKEND=Agg
R=$OUT/r; mkdir -p $R
save() { cd $OUT && tar czf r.tgz r; cd - > /dev/null; }
C=.maps/shared/8zpm_cxcr4.cif
V="uniform nu uniform:min_iterations=20 nu:min_iterations=20 uniform:n_base_candidates=128,n_candidates=16 nu:n_base_candidates=128,n_candidates=16 uniform:base_cutoff_times_step=3.5 nu:base_cutoff_times_step=3.5"
for snr in 0.02 0.03; do
timeout 230 python3 bench/bench_small_membrane.py --snr $snr --n 2000 4000 16000 --box-size 96 --pixel-size-A 1.2 --chains R \
  --model $C --regularizers $V --max-iterations 20 --device gpu --out /tmp/sma --results $R/cxcr4_search_snr$snr > $R/cxcr4_search_snr$snr.log 2>&1
save
done
rm -rf $R
