import numpy as np
import pytest

from cryocv.backend import to_device, to_numpy
from cryocv.fsc import (apply_shell_filter, fsc_curve, gold_standard_fsc, phase_randomize, resolution_at,
                        shell_frequencies_per_A)
from cryocv.masks import auto_threshold_mask, spherical_mask, threshold_mask
from .conftest import blob_volume


def test_fsc_identity_and_independent_noise(xp):
    rng = np.random.default_rng(0)
    a = to_device(rng.normal(size=(32,) * 3).astype(np.float32), xp)
    b = to_device(rng.normal(size=(32,) * 3).astype(np.float32), xp)
    np.testing.assert_allclose(fsc_curve(a, a), 1.0, atol=1e-6)
    noise = fsc_curve(a, b)
    assert np.abs(noise[3:]).max() < 0.2 and abs(noise[3:].mean()) < 0.02


def test_resolution_interpolates_the_crossing():
    n, px = 40, 2.0
    fsc = np.linspace(1, 0, n // 2 + 1)  # crosses 0.5 exactly at shell 10
    assert resolution_at(fsc, 0.5, n, px) == pytest.approx(1 / shell_frequencies_per_A(n, px)[10])
    assert resolution_at(np.ones(n // 2 + 1), 0.143, n, px) == pytest.approx(2 * px)  # never crosses


def test_fsc_of_noisy_copies_matches_theory():
    # two copies of a signal with independent noise at SNR s per shell: FSC ≈ s/(1+s)
    rng = np.random.default_rng(1)
    signal = rng.normal(size=(48,) * 3)
    a = signal + rng.normal(size=signal.shape)
    b = signal + rng.normal(size=signal.shape)
    assert np.abs(fsc_curve(a, b)[4:] - 0.5).max() < 0.1


def test_phase_randomization_corrects_mask_inflation():
    rng = np.random.default_rng(2)
    n = 40
    signal = blob_volume(n, seed=3)
    signal = apply_shell_filter(signal, (np.arange(n // 2 + 1) < 6).astype(float))  # signal only below shell 6
    a = signal + 0.02 * rng.normal(size=signal.shape).astype(np.float32)
    b = signal + 0.02 * rng.normal(size=signal.shape).astype(np.float32)
    sharp = threshold_mask(signal, 0.3 * signal.max(), 0, 0)  # a hard mask correlates the noise
    # one randomization's correction scatters by ~0.06 here (it divides by 1 - FSC_rand ≈ 0.013):
    # judged over six seeds
    reports = [gold_standard_fsc(a, b, 2.0, mask=sharp, seed=seed) for seed in range(6)]
    masked = np.array(reports[0]["fsc_masked"])
    corrected = np.mean([r["fsc_corrected"] for r in reports], axis=0)
    tail = slice(reports[0]["phase_randomized_from_shell"] + 2, n // 2)
    assert masked[tail].mean() > 0.9                 # the sharp mask inflates the noise shells
    assert abs(corrected[tail].mean()) < 0.1


def test_hashed_noise_is_white_uniform_and_the_same_on_every_device(xp):
    """The phase-randomization noise: uniform on [-0.5, 0.5), uncorrelated between neighbours and
    seeds, the same numbers on the CPU and the GPU, and its transform's phases uniform."""
    from cryocv.fsc import _noise_phases, hashed_uniform
    u = to_numpy(hashed_uniform(32 ** 3, 0, xp))
    np.testing.assert_array_equal(u, hashed_uniform(32 ** 3, 0, np))       # bit for bit on every device
    assert -0.5 <= u.min() and u.max() < 0.5 and abs(u.mean()) < 0.005 and abs(u.std() - 12 ** -0.5) < 0.003
    v = hashed_uniform(32 ** 3, 1, np)
    assert abs(np.corrcoef(u, v)[0, 1]) < 0.02 and abs(np.corrcoef(u[:-1], u[1:])[0, 1]) < 0.02
    counts, _ = np.histogram(to_numpy(_noise_phases((32, 32, 32), 3, xp)), bins=8, range=(-np.pi, np.pi))
    assert np.abs(counts / counts.sum() - 1 / 8).max() < 0.01


def test_phase_randomize_keeps_amplitudes(xp):
    vol = to_device(blob_volume(32, seed=4), xp)
    rand = phase_randomize(vol, 5)
    from cryocv.fourier import ft3_centered
    np.testing.assert_allclose(to_numpy(xp.abs(ft3_centered(rand))), to_numpy(xp.abs(ft3_centered(vol))),
                               rtol=1e-3, atol=1e-3)
    assert fsc_curve(rand, vol)[:5].min() > 0.999 and fsc_curve(rand, vol)[8:].max() < 0.5


def test_masks(xp):
    m = to_numpy(spherical_mask(32, 10, 4, xp))
    assert m[16, 16, 16] == 1 and m[16, 16, 16 + 10] == 1 and m[16, 16, 16 + 14] == 0
    assert 0 < m[16, 16, 16 + 12] < 1
    vol = to_device(blob_volume(32, seed=5), xp)
    auto = to_numpy(auto_threshold_mask(vol, 2.0))
    v = to_numpy(vol)
    assert auto[v > 0.2 * v.max()].min() == 1.0 and auto.min() == 0.0 and auto.max() == 1.0
    with pytest.raises(ValueError):
        threshold_mask(vol, 1e9)
