#!/bin/bash
# issue 15, call 3: an atomic-grain belt (detergent as ~3000 atom-like blobs per particle: sigma 1 Å, 30 Å^3 each)
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 MPLBACKEND=Agg
R=$OUT/r; mkdir -p $R
save() { cd $OUT && tar czf r.tgz r; cd - > /dev/null; }
M=.maps/shared/8zpm_cxcr4.cif
V="uniform nu nu:nu_tau2_fudge=4 nu:nu_align_quantile=0.1 nu:nu_tau2_fudge=4,nu_align_quantile=0.1"
for snr in 0.02 0.03; do
timeout 270 python3 bench/bench_small_membrane.py --snr $snr --n 2000 4000 8000 16000 --box-size 96 --pixel-size-A 1.2 --chains R \
  --model $M --regularizers $V --max-iterations 20 --device gpu --out /tmp/sma --results $R/a96_snr$snr \
  blob_sigma_A=1.0 blob_volume_A3=30 > $R/a96_snr$snr.log 2>&1
save
done
rm -rf $R
