#!/bin/bash
# issue 15, session 2026-12-04c call 63: where the trap forms (truth starts at 15/8 Å, a staged resolution ramp);
# GPU cost per pass of --marginalize-step-deg at box 128 and 256
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 MPLBACKEND=Agg
R=$OUT/r; mkdir -p $R
save() { cd $OUT && tar czf r.tgz r; cd - > /dev/null; }
cp .maps/dev63.sh $R/script.sh
C=.maps/shared/8zpm_cxcr4.cif
timeout 200 python3 bench/bench_small_membrane.py --snr 0.02 --n 2000 4000 --box-size 96 --pixel-size-A 1.2 --chains R --floor --truth-start 15 8 \
  --model $C --regularizers uniform nu uniform:stage_align_res_A=8 nu:stage_align_res_A=8 nu:stage_align_res_A=6 --max-iterations 20 --device gpu \
  --out /tmp/sm96 --results $R/ramp_snr0.02 -- blob_sigma_A=1.0 blob_volume_A3=30 > $R/ramp_snr0.02.log 2>&1
save
M=/tmp/maps/trpv1_128.mrc; M256=/tmp/maps/trpv1_256.mrc
python3 bench/make_map.py .maps/shared/3j5p_trpv1_c4.pdb --box 128 --pixel-size-A 1.2 --out $M > /dev/null
python3 bench/make_map.py .maps/shared/3j5p_trpv1_c4.pdb --box 256 --pixel-size-A 0.9 --out $M256 > /dev/null
for box in 128 256; do
  if [ $box = 128 ]; then MAP=$M; N=20000; else MAP=$M256; N=10000; fi
  for v in "uniform" "nu" "uniform --marginalize-step-deg 1.5" "nu --marginalize-step-deg 1.5"; do
    t=$(echo $v | tr ' ' '_' | tr -d '-' | cut -c1-24)
    timeout 75 python3 bench/bench_refine_gpu.py --map $MAP --n $N --truth-sym C4 --max-iterations 4 --regularizer $v --tag _$t \
      --out /tmp/b$box --results $R/cost_${box}_$t.json > $R/cost_${box}_$t.log 2>&1
    save
  done
done
rm -rf $R
