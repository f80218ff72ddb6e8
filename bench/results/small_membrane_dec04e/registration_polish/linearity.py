"""Is the late 0.5° scatter of align_maps_locally data noise (fixed for a pair of maps) or estimator
noise (changes when one map is turned by a known fraction of a degree)? Iteration-10 maps of the CPU NU run."""
import numpy as np, time
from cryocv.io.mrc import read_map
from cryocv.register import align_maps_locally, transform_volume, MapTransform
from cryocv.geometry import angular_distance_deg
from scipy.spatial.transform import Rotation
d = "/work/relion_sm/cryocv_cpu_registered/nu_registered/iterations/iter_010/"
a, px = read_map(d + "reference_1.mrc"); b, _ = read_map(d + "reference_2.mrc"); m, _ = read_map(d + "mask.mrc")
res = 4.8
def rotvec(L):
    return Rotation.from_matrix(L).as_rotvec(degrees=True)
base = None
for axis in ("x", "y", "z"):
    for deg in (0.0, 0.25, 0.5, 1.0, -0.5):
        if deg == 0.0 and axis != "x":
            continue
        L = Rotation.from_euler(axis, deg, degrees=True).as_matrix()
        bt = transform_volume(b, MapTransform(L, np.zeros(3), 0.0)) if deg else b
        t0 = time.time()
        T = align_maps_locally(a * m, bt * m, px, res, max_deg=8, fine_step_deg=0.125)
        # T maps bt back onto a; T·(applied) should be the pair's own offset if the estimate follows the map
        est = rotvec(T.matrix)
        net = rotvec(T.matrix @ L) if deg else est      # composition order checked below with deg=1
        net2 = rotvec(L @ T.matrix) if deg else est
        print(f"applied {deg:+.2f}° about {axis}: estimate {np.round(est,2)} |{np.linalg.norm(est):.2f}°|  "
              f"T·L {np.round(net,2)}  L·T {np.round(net2,2)}  ({time.time()-t0:.1f} s)", flush=True)
