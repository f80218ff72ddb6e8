#!/bin/bash
# issue 15, call 1: the regime at a finer pixel (box 96 @ 1.2 Å, CXCR4 receptor in a micelle), 20 iterations max
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 MPLBACKEND=Agg
R=$OUT/r; mkdir -p $R
save() { cd $OUT && tar czf r.tgz r; cd - > /dev/null; }
timeout 90 python3 -m pytest -q -x tests/test_gpu.py -k "mode_spread" > $R/gpu_mode_spread.log 2>&1
M=.maps/shared/8zpm_cxcr4.cif
V="uniform nu nu:nu_max_window_fraction=0.125,join_halves_A=20 uniform:join_halves_A=20"
timeout 300 python3 bench/bench_small_membrane.py --snr 0.05 --n 4000 16000 --box-size 96 --pixel-size-A 1.2 --chains R \
  --model $M --regularizers $V --max-iterations 20 --device gpu --out /tmp/sm --results $R/r96_snr005 > $R/r96_snr005.log 2>&1
save
timeout 150 python3 bench/bench_small_membrane.py --snr 0.05 --n 4000 --box-size 128 --pixel-size-A 1.1 --chains R,N \
  --model $M --regularizers uniform nu:nu_max_window_fraction=0.125,join_halves_A=20 --max-iterations 20 --device gpu \
  --out /tmp/smnb --results $R/rn128_snr005 > $R/rn128_snr005.log 2>&1
save
rm -rf $R
