#!/bin/bash
# issue 15, session 2026-12-04b call 6: TRPV1 at SNR 0.02 with likelihood-weighted poses (--marginalize-step-deg 1.5)
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 MPLBACKEND=Agg
R=$OUT/r; mkdir -p $R
save() { cd $OUT && tar czf r.tgz r; cd - > /dev/null; }
timeout 110 python3 bench/bench_membrane.py --snr 0.02 --dataset-size 16000 --n 2000 16000 --model .maps/shared/3j5p_trpv1_c4.pdb \
  --regularizers uniform nu uniform:marginalize_step_deg=1.5 nu:marginalize_step_deg=1.5 --out /tmp/mem --results $R/trpv1_marg_snr0.02 > $R/trpv1_marg_snr0.02.log 2>&1
save
rm -rf $R
