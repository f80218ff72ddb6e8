#!/bin/bash
# issue 15, session 2026-12-04d call 67: half-set drift registration (--register-halves) on the belt-motion sweep
# uniform vs NU (and NU with +-1.5 deg likelihood-weighted poses), with the floor
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 MPLBACKEND=Agg
R=$OUT/r; mkdir -p $R
save() { cd $OUT && tar czf r.tgz r; cd - > /dev/null; }
cp .maps/dev67.sh $R/script.sh
C=.maps/shared/8zpm_cxcr4.cif
REGS="uniform nu uniform:register_halves=1 nu:register_halves=1 nu:register_halves=1,marginalize_step_deg=1.5"
for tilt in 0 5 7; do
shift_A=$(python3 -c "print(round(0.3*$tilt,2))")
timeout 140 python3 bench/bench_small_membrane.py --snr 0.03 --n 2000 4000 --box-size 96 --pixel-size-A 1.2 --chains R \
  --model $C --regularizers $REGS --max-iterations 20 --device gpu --floor \
  --out /tmp/belt$tilt --results $R/belt_tilt$tilt -- belt_tilt_sigma_deg=$tilt belt_shift_sigma_A=$shift_A > $R/belt_tilt$tilt.log 2>&1
save
done
rm -rf $R
