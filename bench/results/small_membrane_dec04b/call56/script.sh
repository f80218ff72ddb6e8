#!/bin/bash
# issue 15, session 2026-12-04b call 1: TRPV1 at SNR 0.02 up to 16k (capped default); CXCR4 from the truth; globin SNR grid
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 MPLBACKEND=Agg
R=$OUT/r; mkdir -p $R
save() { cd $OUT && tar czf r.tgz r; cd - > /dev/null; }
C=.maps/shared/8zpm_cxcr4.cif
timeout 130 python3 bench/bench_small_membrane.py --snr 0.02 --n 4000 16000 --box-size 96 --pixel-size-A 1.2 --chains R --floor --truth-start \
  --model $C --regularizers uniform nu --max-iterations 20 --device gpu --out /tmp/sma --results $R/cxcr4_truthstart_snr0.02 > $R/cxcr4_truthstart_snr0.02.log 2>&1
save
timeout 70 python3 bench/bench_small_membrane.py --snr 0.03 --n 2000 16000 --box-size 96 --pixel-size-A 1.2 --chains R --floor \
  --model $C --regularizers uniform nu --max-iterations 20 --device gpu --out /tmp/sma --results $R/cxcr4_snr0.03_relionset > $R/cxcr4_snr0.03_relionset.log 2>&1
python3 -c "
import mrcfile, numpy as np
with mrcfile.mmap('/tmp/sma/snr0.03/particles.mrcs', mode='r') as m:
    d = np.asarray(m.data[:2000], dtype=np.float64)
print('first2000 sum', d.sum(), 'sumsq', (d*d).sum(), 'p0', d[0].sum(), d[0,40,40], d[1999,50,50])
" > $R/checksum_snr0.03.txt 2>&1
save
timeout 200 python3 bench/bench_membrane.py --snr 0.02 --dataset-size 16000 --n 2000 4000 8000 16000 --model .maps/shared/3j5p_trpv1_c4.pdb \
  --regularizers uniform nu nu:nu_max_window_fraction=0 --out /tmp/mem --results $R/trpv1_snr0.02 > $R/trpv1_snr0.02.log 2>&1
save
timeout 150 python3 bench/bench_small_membrane.py --snr 0.1 0.2 --n 8000 16000 --box-size 72 --pixel-size-A 1.2 --chains A --floor \
  --model .maps/shared/5ni1_hemoglobin.cif --regularizers uniform nu --max-iterations 20 --device gpu --out /tmp/smg \
  --results $R/globin72_snrgrid belt_axis=principal > $R/globin72_snrgrid.log 2>&1
save
rm -rf $R
