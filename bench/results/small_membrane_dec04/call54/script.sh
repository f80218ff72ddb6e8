#!/bin/bash
# issue 15, call 5: the NU window cap at box 128/256 (plain TRPV1), and the pose error the data allow (atomic belt)
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 MPLBACKEND=Agg
R=$OUT/r; mkdir -p $R
save() { cd $OUT && tar czf r.tgz r; cd - > /dev/null; }
C=.maps/shared/8zpm_cxcr4.cif
for snr in 0.03 0.02; do
timeout 75 python3 bench/bench_small_membrane.py --snr $snr --n 4000 16000 --box-size 96 --pixel-size-A 1.2 --chains R --floor \
  --model $C --regularizers nu:nu_max_window_fraction=0.125 --max-iterations 20 --device gpu --out /tmp/sma --results $R/a96f_snr$snr \
  blob_sigma_A=1.0 blob_volume_A3=30 > $R/a96f_snr$snr.log 2>&1
save
done
M=/tmp/maps/trpv1_128.mrc; M256=/tmp/maps/trpv1_256.mrc
python3 bench/make_map.py .maps/shared/3j5p_trpv1_c4.pdb --box 128 --pixel-size-A 1.2 --out $M > /dev/null
python3 bench/make_map.py .maps/shared/3j5p_trpv1_c4.pdb --box 256 --pixel-size-A 0.9 --out $M256 > /dev/null
for v in "uniform" "nu" "nu --nu-max-window-fraction 0.125 --tag _cap"; do
  t=$(echo $v | tr ' ' '_' | tr -d '-' | cut -c1-12)
  timeout 45 python3 bench/bench_refine_gpu.py --map $M --n 20000 --truth-sym C4 --regularizer $v --out /tmp/b128 --results $R/cap_128_$t.json > $R/cap_128_$t.log 2>&1
done
save
for v in "uniform" "nu" "nu --nu-max-window-fraction 0.125 --tag _cap"; do
  t=$(echo $v | tr ' ' '_' | tr -d '-' | cut -c1-12)
  timeout 50 python3 bench/bench_refine_gpu.py --map $M256 --n 10000 --truth-sym C4 --regularizer $v --out /tmp/b256 --results $R/cap_256_$t.json > $R/cap_256_$t.log 2>&1
done
save
rm -rf $R
