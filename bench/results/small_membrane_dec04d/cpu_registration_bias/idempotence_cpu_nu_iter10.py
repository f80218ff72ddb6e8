import numpy as np, json
from cryocv.io.mrc import read_map
from cryocv.register import align_maps_locally, transform_volume
from cryocv.geometry import angular_distance_deg
d = "/work/relion_sm/cryocv_cpu_registered/nu_registered/iterations/iter_010/"
r1, px = read_map(d + "reference_1.mrc"); r2, _ = read_map(d + "reference_2.mrc"); m, _ = read_map(d + "mask.mrc")
h1, _ = read_map(d + "half_map_1.mrc"); h2, _ = read_map(d + "half_map_2.mrc")
res = json.load(open(d + "state.json")).get("resolution_A", 4.0) if False else 4.8
def axis(T):
    L = T.matrix; v = np.array([L[2,1]-L[1,2], L[0,2]-L[2,0], L[1,0]-L[0,1]]); return (v/ (np.linalg.norm(v)+1e-12)).round(2)
for name, a, b in (("references (after move)", r1, r2), ("half-maps (before move)", h1, h2)):
    T = align_maps_locally(a*m, b*m, px, res, max_deg=8, fine_step_deg=0.125)
    b2 = transform_volume(b, T)
    T2 = align_maps_locally(a*m, b2*m, px, res, max_deg=8, fine_step_deg=0.125)
    print(name, "first", round(T.rotation_deg,3), axis(T), "second", round(T2.rotation_deg,3), axis(T2))
    # swapped roles: half 1 onto half 2 (should be the inverse)
    Ts = align_maps_locally(b*m, a*m, px, res, max_deg=8, fine_step_deg=0.125)
    print("   swapped", round(Ts.rotation_deg,3), axis(Ts), "angle between T and Ts^-1:", round(angular_distance_deg(T.matrix, Ts.matrix.T),3))
