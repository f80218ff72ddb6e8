"""How large is the belt's particle-to-particle variation against the noise, in the images of the
SNR 0.03 CXCR4 dataset (atomic-grain micelle, 1.25x)? One pose per draw, 24 belt draws per pose, no CTF."""
import sys, json, numpy as np
sys.path[:0] = ["/work/main/bench", "/work/main"]
import small_membrane_dataset as s
from cryocv.projector import prepare_volume
from cryocv.geometry import random_rotations
truth = s.build_truth(s.DEFAULT_MODEL, ["R"], 96, 1.2, "micelle", "helices", 1.25, blob_sigma_A=1.0, blob_volume_A3=30)
pft = prepare_volume(truth.protein_map.astype(np.float32))
rng = np.random.default_rng(0)
out = []
for pose in range(4):
    R = np.repeat(random_rotations(1, rng), 24, axis=0)
    o = np.zeros((24, 2))
    belts = [truth.particle_belt(0, 1000 * pose + i) for i in range(24)]
    full = s.render(truth, pft, R, o, belts)
    prot = s.render(truth, pft, R[:1], o[:1], None)[0]
    belt = full - prot
    fluct = belt - belt.mean(0)
    out.append((prot.var(), belt.mean(0).var(), fluct.var(axis=0).mean() * 24 / 23, full.var(axis=(1, 2)).mean()))
p, bm, bf, tot = np.mean(out, axis=0)
noise_var = tot / 0.03
print(json.dumps({"protein_image_var": float(p), "mean_belt_image_var": float(bm), "belt_fluctuation_var": float(bf),
                  "total_signal_var": float(tot), "noise_var_at_snr_0.03": float(noise_var),
                  "fluctuation_over_noise": float(bf / noise_var), "fluctuation_over_protein": float(bf / p)}, indent=1))
