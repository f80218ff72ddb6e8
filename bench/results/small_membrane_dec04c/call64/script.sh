#!/bin/bash
# issue 15, session 2026-12-04c call 64: a coarse-to-fine alignment ramp (--resolution-ramp) for uniform and NU
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 MPLBACKEND=Agg
R=$OUT/r; mkdir -p $R
save() { cd $OUT && tar czf r.tgz r; cd - > /dev/null; }
cp .maps/dev64.sh $R/script.sh
C=.maps/shared/8zpm_cxcr4.cif
timeout 70 python3 -m pytest -q -x tests/test_gpu.py -k "nu_filter or mode_spread or refine" 2>&1 | tail -3 > $R/gpu_tests.log
save
REGS="uniform nu uniform:resolution_ramp=0.8 nu:resolution_ramp=0.8 uniform:resolution_ramp=0.7 nu:resolution_ramp=0.7"
for snr in 0.02 0.03; do
timeout 150 python3 bench/bench_small_membrane.py --snr $snr --n 2000 4000 16000 --box-size 96 --pixel-size-A 1.2 --chains R \
  --model $C --regularizers $REGS --max-iterations 20 --device gpu \
  --out /tmp/sm96 --results $R/ramp_snr$snr -- blob_sigma_A=1.0 blob_volume_A3=30 > $R/ramp_snr$snr.log 2>&1
save
done
timeout 90 python3 bench/bench_membrane.py --snr 0.02 --dataset-size 4000 --n 500 2000 4000 --model .maps/shared/3j5p_trpv1_c4.pdb \
  --regularizers uniform nu uniform:resolution_ramp=0.8 nu:resolution_ramp=0.8 --out /tmp/mem --results $R/trpv1_ramp_snr0.02 > $R/trpv1_ramp_snr0.02.log 2>&1
save
timeout 100 python3 bench/bench_small_membrane.py --snr 0.02 --n 4000 8000 --box-size 128 --pixel-size-A 1.1 --chains R,N \
  --model $C --regularizers uniform nu uniform:resolution_ramp=0.8 nu:resolution_ramp=0.8 --max-iterations 20 --device gpu --out /tmp/fw10 \
  --results $R/flex10_ramp_snr0.02 -- flexible_chains=N wobble_sigma_deg=10 > $R/flex10_ramp_snr0.02.log 2>&1
save
rm -rf $R
