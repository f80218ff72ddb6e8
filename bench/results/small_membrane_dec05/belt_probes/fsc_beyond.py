"""Dense belt: the protein-mask FSC vs the protein-only truth dips below 0.5 at low frequency (the
belt, at the protein's density, abuts the protein inside the mask), so the first 0.5 crossing reads
~42 Å for every map. Here: FSC in the protein mask against (a) the protein-only truth, first 0.5
crossing finer than 15 Å, (b) the protein + mean belt truth, first 0.5 crossing."""
import sys, numpy as np
sys.path.insert(0, "/work/main")
from cryocv.io.mrc import read_map
from cryocv.fsc import fsc_curve, resolution_at
for name in sys.argv[1:]:
    d = f"/work/probes/{name}/snr0.03"
    truth, px = read_map(f"{d}/truth_protein.mrc"); mask, _ = read_map(f"{d}/protein_mask.mrc")
    both, _ = read_map(f"{d}/n2000/truth_protein_and_mean_belt.mrc")
    n = truth.shape[0]
    for job in ("truth_reference", "oracle", "uniform", "nu"):
        import glob
        maps = sorted(glob.glob(f"{d}/n2000/{job}/map.mrc")) or sorted(glob.glob(f"{d}/n2000/{job}/*.mrc"))
        if not maps: print(name, job, "no map"); continue
        m, _ = read_map(maps[0])
        c1 = fsc_curve(m * mask, truth * mask); c2 = fsc_curve(m * mask, both * mask)
        shells = np.arange(len(c1)); freq_A = np.where(shells > 0, n * px / np.maximum(shells, 1), np.inf)
        beyond = [s for s in range(1, len(c1)) if freq_A[s] < 15 and c1[s] < 0.5]
        r1 = freq_A[beyond[0]] if beyond else float('nan')
        print(f"{name:9s} {job:16s} {maps[0].split('/')[-1]:14s} protein-only truth, 0.5 past 15 Å: {r1:.2f} Å (shell); "
              f"protein + mean belt truth 0.5: {resolution_at(c2, 0.5, n, px):.2f} Å; 0.143: {resolution_at(c1, 0.143, n, px):.2f} Å")
