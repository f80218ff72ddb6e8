
import numpy as np

from cryocv.fsc import fsc_curve, resolution_at
from cryocv.io.particle_files import load_particles
from cryocv.reconstruct import reconstruct
from cryocv.simulate import simulate
from cryocv.symmetry import symmetry_operators
from .conftest import blob_volume


def test_simulate_then_reconstruct_recovers_truth(tmp_path, hemoglobin_map):
    truth, px = hemoglobin_map
    simulate(truth, px, 1500, str(tmp_path), snr=0.2, seed=1, progress=False)
    parts = load_particles(str(tmp_path / "particles.star"))
    assert set(np.unique(parts.half_set)) == {1, 2}
    half1, half2, full, report = reconstruct(parts, progress=False)
    vs_truth = resolution_at(fsc_curve(full, truth), 0.5, 40, px)
    assert vs_truth < 8.5, vs_truth  # measured 8.0 Å (the truth map is blurred to 5 Å; Nyquist 4.8 Å)
    # gold-standard FSC (0.143) tracks the truth FSC (0.5)
    assert abs(report["resolution_A"] - vs_truth) < 1.0
    assert "fsc_corrected" not in report  # no mask given


def test_wrong_convention_would_fail(tmp_path):
    # a control: the same particles reconstructed with origins of the wrong sign lose resolution
    vol = blob_volume(32, seed=2)
    parts = simulate(vol, 2.0, 800, str(tmp_path), snr=1.0, seed=2, shift_sigma_A=6.0, progress=False)
    parts = load_particles(parts.source)
    _, _, good, _ = reconstruct(parts, progress=False)
    parts.origin_A = -parts.origin_A
    _, _, bad, _ = reconstruct(parts, progress=False)
    assert fsc_curve(good, vol)[3:9].mean() > 0.95
    assert fsc_curve(bad, vol)[3:9].mean() < 0.3


def symmetrize(volume, group):
    """Reference: average of V(g r) over the group, by interpolation about index N//2."""
    from scipy.ndimage import map_coordinates
    n = volume.shape[0]
    grid = np.indices(volume.shape).reshape(3, -1).T[:, ::-1] - n // 2
    out = np.zeros_like(volume)
    for g in symmetry_operators(group):
        src = grid @ g
        out += map_coordinates(volume, [src[:, 2] + n // 2, src[:, 1] + n // 2, src[:, 0] + n // 2],
                               order=1).reshape(volume.shape)
    return out / len(symmetry_operators(group))


def test_symmetric_reconstruction(tmp_path):
    # a C4-symmetric map reconstructed with C4 from few particles beats C1 from the same particles
    vol = symmetrize(blob_volume(32, seed=6, n_blobs=4), "C4")
    parts = load_particles(simulate(vol, 2.0, 300, str(tmp_path), snr=0.05, seed=3, progress=False).source)
    _, _, c1, _ = reconstruct(parts, progress=False)
    _, _, c4, rep = reconstruct(parts, symmetry="C4", progress=False)
    assert fsc_curve(c4, vol)[2:14].mean() > fsc_curve(c1, vol)[2:14].mean() + 0.05
    # and the result is C4-symmetric
    assert np.corrcoef(symmetrize(c4, "C4").ravel(), c4.ravel())[0, 1] > 0.99


def test_one_half_on_device_gives_the_same_maps():
    """Accumulators with one half-set on the device at a time (the large-box mode: the other
    half-set waits in host memory) form the same half-maps, quarter-maps and NU sums as with
    both on the device, whatever the order halves are asked for."""
    from cryocv.accumulate import Accumulators, quarter_split
    from cryocv.geometry import random_rotations
    from cryocv.projector import frequency_points
    n = 16
    rng = np.random.default_rng(0)
    half_set = np.repeat([1, 2], 20)
    quarters = quarter_split(half_set, seed=3)
    pts = frequency_points(n)
    rot = random_rotations(40, rng).astype(np.float32)
    vals = (rng.normal(size=(40, pts.kx.size)) + 1j * rng.normal(size=(40, pts.kx.size))).astype(np.complex64)
    wts = rng.uniform(0.1, 1, size=(40, pts.kx.size)).astype(np.float32)
    results = []
    for one_half in (False, True):
        acc = Accumulators(n, symmetry_operators("C2"), np, quarters, one_half_on_device=one_half)
        for h in (1, 2):
            idx = np.nonzero(half_set == h)[0]
            acc.insert(h, idx, rot[idx], pts, vals[idx], wts[idx])
        assert len(acc.grids) == (2 if one_half else 4)
        assert acc.resident_first() == ((2, 1) if one_half else (1, 2))
        maps = acc.half_maps()
        term = np.full_like(acc.half_weight(1), 0.5)
        results.append(maps + [acc.half_map(1, term), acc.half_map(2, term), acc.quarter(1, 1)[0], acc.half(2)[1]])
        assert len(acc.grids) == (2 if one_half else 4)
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)
    assert np.abs(results[0][0] - results[0][1]).max() > 0      # the halves differ: a real check


def test_one_half_on_device_swaps_one_part_at_a_time(monkeypatch):
    """A swap of half-sets with quarter-set parts moves one part out, then one part in, and so
    on: the arriving part's host buffers are free for the next part leaving, so a swap needs one
    part's worth of new (page-locked) host memory, not a half-set's."""
    from cryocv import accumulate
    from cryocv.geometry import random_rotations
    from cryocv.projector import frequency_points
    n = 12
    rng = np.random.default_rng(5)
    half_set = np.repeat([1, 2], 10)
    quarters = accumulate.quarter_split(half_set, seed=1)
    pts = frequency_points(n)
    rot = random_rotations(20, rng).astype(np.float32)
    vals = (rng.normal(size=(20, pts.kx.size)) + 1j * rng.normal(size=(20, pts.kx.size))).astype(np.complex64)
    wts = rng.uniform(0.1, 1, size=(20, pts.kx.size)).astype(np.float32)
    acc = accumulate.Accumulators(n, symmetry_operators("C1"), np, quarters, one_half_on_device=True)
    for h in (1, 2):
        idx = np.nonzero(half_set == h)[0]
        acc.insert(h, idx, rot[idx], pts, vals[idx], wts[idx])
    events = []
    to_host, to_device = accumulate._to_host, accumulate.to_device
    monkeypatch.setattr(accumulate, "_to_host", lambda a: events.append("out") or to_host(a))
    monkeypatch.setattr(accumulate, "to_device", lambda a, xp: events.append("in") or to_device(a, xp))
    acc.half(1)                                  # half-set 2 (on the device after the pass) leaves
    assert events == ["out", "out", "in", "in"] * 2          # (data, weight) of one part, then of the next
    assert sorted(acc.grids) == [(1, 0), (1, 1)] and sorted(acc._host) == [(2, 0), (2, 1)]


def test_one_half_on_device_reuses_its_host_buffers():
    """The host copies of the off-device half-set (page-locked on a GPU: slow to allocate) are
    exact-size buffers that the next iteration's accumulators take again once the previous ones
    are gone, and a buffer is never handed out while its data is still waiting in it."""
    import gc
    from cryocv.accumulate import Accumulators
    from cryocv.geometry import random_rotations
    from cryocv.projector import frequency_points
    n = 12
    rng = np.random.default_rng(4)
    half_set = np.repeat([1, 2], 10)
    pts = frequency_points(n)
    rot = random_rotations(20, rng).astype(np.float32)
    vals = (rng.normal(size=(20, pts.kx.size)) + 1j * rng.normal(size=(20, pts.kx.size))).astype(np.complex64)
    wts = rng.uniform(0.1, 1, size=(20, pts.kx.size)).astype(np.float32)

    def iteration(one_half):
        acc = Accumulators(n, symmetry_operators("C1"), np, None, one_half_on_device=one_half)
        for h in (1, 2):
            idx = np.nonzero(half_set == h)[0]
            acc.insert(h, idx, rot[idx], pts, vals[idx], wts[idx])
        held = {id(a) for arrays in acc._host.values() for a in arrays}     # half-set 1, waiting on the host
        maps = acc.half_maps()                  # half-set 2 goes to the host, half-set 1 comes back
        return maps, held, {id(a) for arrays in acc._host.values() for a in arrays}
    reference, _, _ = iteration(False)
    first, held_1, held_2 = iteration(True)
    assert held_1 and held_2 and held_1.isdisjoint(held_2)                # distinct while both hold data
    gc.collect()
    second, again_1, _ = iteration(True)
    assert again_1 <= held_1 | held_2                                       # taken again, not allocated anew
    for maps in (first, second):
        for a, b in zip(reference, maps):
            np.testing.assert_array_equal(a, b)
