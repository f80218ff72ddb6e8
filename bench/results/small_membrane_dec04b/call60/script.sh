#!/bin/bash
# issue 15, session 2026-12-04b call 5: likelihood-weighted poses in global refinement (--marginalize-step-deg), CXCR4 atomic belt; GPU twins
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 MPLBACKEND=Agg
R=$OUT/r; mkdir -p $R
save() { cd $OUT && tar czf r.tgz r; cd - > /dev/null; }
C=.maps/shared/8zpm_cxcr4.cif
V="uniform nu uniform:marginalize_step_deg=1.5 nu:marginalize_step_deg=1.5 uniform:marginalize_step_deg=3 nu:marginalize_step_deg=3"
for snr in 0.03 0.02; do
timeout 170 python3 bench/bench_small_membrane.py --snr $snr --n 2000 4000 16000 --box-size 96 --pixel-size-A 1.2 --chains R \
  --model $C --regularizers $V --max-iterations 20 --device gpu --out /tmp/sma --results $R/cxcr4_marg_snr$snr > $R/cxcr4_marg_snr$snr.log 2>&1
save
done
timeout 60 python3 -m pytest -q tests/test_gpu.py -k "spread or score_poses or nu_filter" 2>&1 | tail -3 > $R/gpu_tests.log
save
rm -rf $R
