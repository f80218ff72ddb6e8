#!/bin/bash
# issue 15, call 2: lower SNR at box 96 @ 1.2 Å (CXCR4 receptor in a micelle), count curves, NU variants
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 MPLBACKEND=Agg
R=$OUT/r; mkdir -p $R
save() { cd $OUT && tar czf r.tgz r; cd - > /dev/null; }
M=.maps/shared/8zpm_cxcr4.cif
V="uniform nu nu:nu_align_quantile=0.1 nu:nu_tau2_fudge=4 nu:nu_tau2_fudge=4,nu_align_quantile=0.1 nu:nu_align_quantile=0.25"
for snr in 0.02 0.01; do
timeout 270 python3 bench/bench_small_membrane.py --snr $snr --n 2000 4000 8000 16000 --box-size 96 --pixel-size-A 1.2 --chains R \
  --model $M --regularizers $V --max-iterations 20 --device gpu --out /tmp/sm --results $R/r96_snr$snr > $R/r96_snr$snr.log 2>&1
save
done
rm -rf $R
