import numpy as np, time
from cryocv.io.particle_files import load_particles
from cryocv.reconstruct import reconstruct_half_maps
from cryocv.register import align_maps_locally, transform_volume, MapTransform
from cryocv.fourier import lowpass_map
from cryocv.geometry import axis_angle_to_matrix
p = load_particles("/work/relion_sm/snr0.03/n2000.star")
t=time.time(); h1, h2 = reconstruct_half_maps(p, np, progress=False); print("recon", time.time()-t)
px = p.pixel_size_A
for res in (20, 12, 8):
    a, b = lowpass_map(h1, px, 4.0), lowpass_map(h2, px, 4.0)   # crude filter like a reference
    T = align_maps_locally(a, b, px, res)
    v = T.matrix
    print(res, "rot", round(T.rotation_deg,3), "shift", T.shift_px.round(3), "score", round(T.score,4))
    # same map with itself + small known turn
    g = MapTransform(axis_angle_to_matrix(np.radians(1.0)*np.array([0,0,1.0])), np.zeros(3))
    T2 = align_maps_locally(a, transform_volume(a, g), px, res)
    print("  self 1deg:", round(T2.rotation_deg,3))
    T3 = align_maps_locally(a, a.copy(), px, res)
    print("  self 0:", round(T3.rotation_deg,3))
