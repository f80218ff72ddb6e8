#!/bin/bash
# issue 15, call 6: GPU twins (NU filter with the default cap), a single globin and CXCR4 + nanobody (atomic belt)
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 MPLBACKEND=Agg
R=$OUT/r; mkdir -p $R
save() { cd $OUT && tar czf r.tgz r; cd - > /dev/null; }
timeout 80 python3 -m pytest -q tests/test_gpu.py tests/test_refine.py -k "gpu or nu_filter" 2>&1 | tail -4 > $R/gpu_tests.log
save
timeout 75 python3 bench/bench_small_membrane.py --snr 0.05 --n 4000 8000 --box-size 72 --pixel-size-A 1.2 --chains A --floor \
  --model .maps/shared/5ni1_hemoglobin.cif --regularizers uniform nu --max-iterations 20 --device gpu --out /tmp/smg \
  --results $R/globin72_snr0.05 belt_axis=principal blob_sigma_A=1.0 blob_volume_A3=30 > $R/globin72_snr0.05.log 2>&1
save
timeout 85 python3 bench/bench_small_membrane.py --snr 0.02 --n 4000 8000 --box-size 128 --pixel-size-A 1.1 --chains R,N --floor \
  --model .maps/shared/8zpm_cxcr4.cif --regularizers uniform nu --max-iterations 20 --device gpu --out /tmp/smn \
  --results $R/cxcr4nb128_snr0.02 blob_sigma_A=1.0 blob_volume_A3=30 > $R/cxcr4nb128_snr0.02.log 2>&1
save
rm -rf $R
