#!/bin/bash
# issue 15, session 2026-12-04c call 65: a staged start (converge aligning no finer than X, restart from that map at X)
# across SNR and particle counts, with and without likelihood-weighted poses; flexible-periphery dataset
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 MPLBACKEND=Agg
R=$OUT/r; mkdir -p $R
save() { cd $OUT && tar czf r.tgz r; cd - > /dev/null; }
cp .maps/dev65.sh $R/script.sh
C=.maps/shared/8zpm_cxcr4.cif
REGS="uniform nu uniform:stage_align_res_A=8 nu:stage_align_res_A=8 nu:stage_align_res_A=8,marginalize_step_deg=1.5"
for snr in 0.02 0.03; do
timeout 170 python3 bench/bench_small_membrane.py --snr $snr --n 2000 4000 16000 --box-size 96 --pixel-size-A 1.2 --chains R \
  --model $C --regularizers $REGS --max-iterations 20 --device gpu \
  --out /tmp/sm96 --results $R/staged_snr$snr -- blob_sigma_A=1.0 blob_volume_A3=30 > $R/staged_snr$snr.log 2>&1
save
done
timeout 80 python3 bench/bench_small_membrane.py --snr 0.02 --n 4000 --box-size 128 --pixel-size-A 1.1 --chains R,N \
  --model $C --regularizers uniform nu uniform:stage_align_res_A=8 nu:stage_align_res_A=8 --max-iterations 20 --device gpu --out /tmp/fw10 \
  --results $R/flex10_staged_snr0.02 -- flexible_chains=N wobble_sigma_deg=10 > $R/flex10_staged_snr0.02.log 2>&1
save
rm -rf $R
