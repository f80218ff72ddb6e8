#!/bin/bash
# issue 15, session 2026-12-04d call 70: half-set registration now on by default (moves > 0.5 deg / 0.5 px only);
# defaults vs register_halves=0 on the data-efficiency curve (SNR 0.03), the moving belt (tilt 7), and TRPV1
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 MPLBACKEND=Agg
R=$OUT/r; mkdir -p $R
save() { cd $OUT && tar czf r.tgz r; cd - > /dev/null; }
cp .maps/dev70.sh $R/script.sh
C=.maps/shared/8zpm_cxcr4.cif
timeout 170 python3 bench/bench_small_membrane.py --snr 0.03 --n 4000 8000 16000 --box-size 96 --pixel-size-A 1.2 --chains R \
  --model $C --regularizers uniform nu uniform:register_halves=0 nu:register_halves=0 --max-iterations 20 --device gpu \
  --out /tmp/de --results $R/efficiency_snr0.03 -- blob_sigma_A=1.0 blob_volume_A3=30 > $R/efficiency_snr0.03.log 2>&1
save
timeout 110 python3 bench/bench_small_membrane.py --snr 0.03 --n 2000 4000 --box-size 96 --pixel-size-A 1.2 --chains R \
  --model $C --regularizers uniform nu nu:marginalize_step_deg=1.5 uniform:register_halves=0 nu:register_halves=0 \
  --max-iterations 20 --device gpu --out /tmp/belt7 --results $R/belt_tilt7 -- belt_tilt_sigma_deg=7 belt_shift_sigma_A=2.1 > $R/belt_tilt7.log 2>&1
save
timeout 100 python3 bench/bench_membrane.py --snr 0.02 --dataset-size 4000 --n 500 2000 4000 --model .maps/shared/3j5p_trpv1_c4.pdb \
  --regularizers uniform nu --out /tmp/mem --results $R/trpv1_snr0.02 > $R/trpv1_snr0.02.log 2>&1
save
rm -rf $R
