#!/bin/bash
# Run a fixed, seeded set of CLI jobs on the CPU with the cryocv found under $CRYOCV_TREE (a checkout
# or worktree), into OUT, for before/after comparisons of a change (bench/compare_jobs.py):
#   CRYOCV_TREE=/path/to/old/checkout bench/capture_cli.sh /tmp/before
#   CRYOCV_TREE=$PWD bench/capture_cli.sh /tmp/after && python bench/compare_jobs.py /tmp/before /tmp/after
# (PYTHON=/path/to/python picks the interpreter)
set -e
OUT=$1; mkdir -p "$OUT"; cd "$OUT"
C="env PYTHONPATH=$CRYOCV_TREE ${PYTHON:-python} -m cryocv.cli"
MAP=$CRYOCV_TREE/cryocv/data/trpv1_box56_2.8A.mrc.gz
$C simulate --map "$MAP" --n 400 --out sim --snr 0.1 --seed 3 --device cpu --quiet > log.txt 2>&1
$C reconstruct --particles sim/particles.star --out rec --sym C4 --device cpu --quiet >> log.txt 2>&1
$C refine --particles sim/particles.star --ref "$MAP" --out ref_uni --regularizer uniform --sym C4 --max-iterations 2 \
  --device cpu --quiet >> log.txt 2>&1
$C refine --particles sim/particles.star --ref "$MAP" --out ref_nu --regularizer nu --sym C1 --max-iterations 2 \
  --nu-cutoffs 20 --device cpu --quiet >> log.txt 2>&1
$C demo --out demo --device cpu --quiet >> log.txt 2>&1
