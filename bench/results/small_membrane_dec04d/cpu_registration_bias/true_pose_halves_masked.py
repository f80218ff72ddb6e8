import numpy as np, time
from cryocv.io.particle_files import load_particles
from cryocv.reconstruct import reconstruct_half_maps
from cryocv.register import align_maps_locally
from cryocv.fourier import lowpass_map
from cryocv.fsc import fsc_curve
from scipy import ndimage
p = load_particles("/work/relion_sm/snr0.03/n2000.star")
h1, h2 = reconstruct_half_maps(p, np, progress=False)
px = p.pixel_size_A; n = h1.shape[0]
f = np.clip(fsc_curve(h1, h2), 1e-3, 0.999); w = np.sqrt(2*f/(1+f))
from cryocv.fourier import shell_index_3d
def filt(h):
    ft = np.fft.fftshift(np.fft.fftn(h))
    sh = np.clip(np.round(np.sqrt(sum(g**2 for g in np.meshgrid(*[np.arange(n)-n//2]*3, indexing='ij')))).astype(int), 0, len(w)-1)
    return np.real(np.fft.ifftn(np.fft.ifftshift(ft * w[sh]))).astype(np.float32)
a, b = filt(h1), filt(h2)
m = ndimage.gaussian_filter((lowpass_map(a+b, px, 10) > 0.1*float((a+b).max())).astype(np.float32), 2)
for masked in (False, True):
    A, B = (a*m, b*m) if masked else (a, b)
    for pad in (4,):
        for res in (8, 6, 5, 4):
            t=time.time(); T = align_maps_locally(A, B, px, res, padding=pad)
            print("mask" if masked else "none", pad, res, round(T.rotation_deg,3), round(time.time()-t,1), "s", flush=True)
