#!/bin/bash
# issue 15, session 2026-12-04d call 69: --register-halves on TRPV1 (never worse?), a data-efficiency curve with it
# (SNR 0.03, 4000-16000), and the GPU twin test of the local map alignment
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 MPLBACKEND=Agg
R=$OUT/r; mkdir -p $R
save() { cd $OUT && tar czf r.tgz r; cd - > /dev/null; }
cp .maps/dev69.sh $R/script.sh
timeout 60 python3 -m pytest -q -x tests/test_gpu.py -k "map_alignment" > $R/gpu_tests.log 2>&1
save
timeout 130 python3 bench/bench_membrane.py --snr 0.02 --dataset-size 4000 --n 500 2000 4000 --model .maps/shared/3j5p_trpv1_c4.pdb \
  --regularizers uniform nu uniform:register_halves=1 nu:register_halves=1 --out /tmp/mem --results $R/trpv1_reg_snr0.02 > $R/trpv1_reg_snr0.02.log 2>&1
save
timeout 230 python3 bench/bench_small_membrane.py --snr 0.03 --n 4000 8000 16000 --box-size 96 --pixel-size-A 1.2 --chains R \
  --model .maps/shared/8zpm_cxcr4.cif --regularizers uniform uniform:register_halves=1 nu:register_halves=1 --max-iterations 20 --device gpu \
  --out /tmp/de --results $R/efficiency_reg_snr0.03 -- blob_sigma_A=1.0 blob_volume_A3=30 > $R/efficiency_reg_snr0.03.log 2>&1
save
rm -rf $R
