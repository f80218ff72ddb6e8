#!/bin/bash
# issue 15, session 2026-12-04c call 62: CXCR4 + a wobbling nanobody (flexible periphery) in an atomic micelle, box 128
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 MPLBACKEND=Agg
R=$OUT/r; mkdir -p $R
save() { cd $OUT && tar czf r.tgz r; cd - > /dev/null; }
cp .maps/dev62.sh $R/script.sh
C=.maps/shared/8zpm_cxcr4.cif
REGS="uniform nu uniform:marginalize_step_deg=1.5 nu:marginalize_step_deg=1.5"
timeout 170 python3 bench/bench_small_membrane.py --snr 0.02 --n 2000 4000 8000 --box-size 128 --pixel-size-A 1.1 --chains R,N --floor --truth-start \
  --model $C --regularizers $REGS --max-iterations 20 --device gpu --out /tmp/fw10 \
  --results $R/flex10_snr0.02 -- flexible_chains=N wobble_sigma_deg=10 > $R/flex10_snr0.02.log 2>&1
save
timeout 200 python3 bench/bench_small_membrane.py --snr 0.01 --n 4000 8000 16000 --box-size 128 --pixel-size-A 1.1 --chains R,N --floor \
  --model $C --regularizers $REGS --max-iterations 20 --device gpu --out /tmp/fw10 \
  --results $R/flex10_snr0.01 -- flexible_chains=N wobble_sigma_deg=10 > $R/flex10_snr0.01.log 2>&1
save
timeout 150 python3 bench/bench_small_membrane.py --snr 0.02 --n 4000 8000 --box-size 128 --pixel-size-A 1.1 --chains R,N --floor \
  --model $C --regularizers $REGS --max-iterations 20 --device gpu --out /tmp/fw20 \
  --results $R/flex20_snr0.02 -- flexible_chains=N wobble_sigma_deg=20 > $R/flex20_snr0.02.log 2>&1
save
rm -rf $R
