#!/bin/bash
# issue 15, call 4: NU vs uniform GPU cost per iteration (box 128, 256), TRPV1 never-worse, NU window variants (atomic belt)
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 MPLBACKEND=Agg
R=$OUT/r; mkdir -p $R
save() { cd $OUT && tar czf r.tgz r; cd - > /dev/null; }
M=/tmp/maps/trpv1_128.mrc; M256=/tmp/maps/trpv1_256.mrc
python3 bench/make_map.py .maps/shared/3j5p_trpv1_c4.pdb --box 128 --pixel-size-A 1.2 --out $M > /dev/null
python3 bench/make_map.py .maps/shared/3j5p_trpv1_c4.pdb --box 256 --pixel-size-A 0.9 --out $M256 > /dev/null
for reg in uniform nu; do
  timeout 60 python3 bench/bench_refine_gpu.py --map $M --n 20000 --truth-sym C4 --regularizer $reg --tag _$reg --out /tmp/b128 --results $R/cost_128_$reg.json > $R/cost_128_$reg.log 2>&1
done
for reg in uniform nu; do
  timeout 80 python3 bench/bench_refine_gpu.py --map $M256 --n 10000 --truth-sym C4 --regularizer $reg --tag _$reg --out /tmp/b256 --results $R/cost_256_$reg.json > $R/cost_256_$reg.log 2>&1
done
save
timeout 150 python3 bench/bench_membrane.py --n 500 1000 2000 4000 8000 16000 --model .maps/shared/3j5p_trpv1_c4.pdb \
  --regularizers uniform nu nu:nu_max_window_fraction=0.125 --out /tmp/mem --results $R/trpv1_membrane > $R/trpv1_membrane.log 2>&1
save
C=.maps/shared/8zpm_cxcr4.cif
V="uniform nu nu:nu_max_window_fraction=0.125 nu:nu_awf=2"
for snr in 0.03 0.02; do
timeout 110 python3 bench/bench_small_membrane.py --snr $snr --n 2000 4000 8000 --box-size 96 --pixel-size-A 1.2 --chains R \
  --model $C --regularizers $V --max-iterations 20 --device gpu --out /tmp/sma --results $R/a96w_snr$snr \
  blob_sigma_A=1.0 blob_volume_A3=30 > $R/a96w_snr$snr.log 2>&1
save
done
rm -rf $R
