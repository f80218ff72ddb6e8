import numpy as np

from cryocv.ctf import CTFParams, ctf_half_plane, electron_wavelength_A, evaluate_ctf


def params(u=15000.0, v=15000.0, angle=0.0, kv=300.0, cs=2.7, q0=0.1, phase=0.0, b=0.0, scale=1.0):
    return np.array([[u, v, angle, kv, cs, q0, phase, b, scale]], dtype=np.float64)


def test_wavelength_300kV():
    assert abs(electron_wavelength_A(300) - 0.019687) < 1e-5


def test_ctf_at_zero_frequency_is_amplitude_contrast(xp):
    c = evaluate_ctf(xp.asarray(params(q0=0.07)), xp.zeros(1), xp.zeros(1))
    assert abs(float(c[0, 0]) - 0.07) < 1e-6


def test_first_zero_matches_defocus_along_astigmatism_axes():
    # without Cs, CTF zero when pi*lambda*df*k^2 = pi - asin(Q0): check along U (angle) and V (angle+90)
    lam = electron_wavelength_A(300)
    q0 = 0.1
    for df, direction in ((20000.0, 30.0), (12000.0, 120.0)):
        k0 = np.sqrt((np.pi - np.arcsin(q0)) / (np.pi * lam * df))
        theta = np.deg2rad(direction)
        c = evaluate_ctf(params(u=20000, v=12000, angle=30, cs=0, q0=q0),
                         np.array([k0 * np.cos(theta)]), np.array([k0 * np.sin(theta)]))
        assert abs(c[0, 0]) < 1e-4


def test_phase_shift_bfactor_and_scale():
    k = np.array([0.05])
    base = evaluate_ctf(params(), k, np.zeros(1))[0, 0]
    damped = evaluate_ctf(params(b=100, scale=0.5), k, np.zeros(1))[0, 0]
    assert np.isclose(damped, 0.5 * base * np.exp(-100 / 4 * 0.05 ** 2), rtol=1e-5)
    # a 90° phase plate turns the sin into a cos at zero frequency: CTF(0) = 1 for Q0 = 0
    assert np.isclose(evaluate_ctf(params(phase=90, q0=0.0), np.zeros(1), np.zeros(1))[0, 0], 1.0, atol=1e-6)


def test_half_plane_grid_layout():
    c = ctf_half_plane(params(u=9000, v=3000, angle=0, cs=0), 64, 3.0)  # well sampled (no aliasing)
    assert c.shape == (1, 64, 33)
    # astigmatism: along x (angle 0) the defocus is U (oscillates faster) than along y (V)
    row_x = c[0, 32, :]         # ky = 0, kx >= 0
    col_y = c[0, 32:, 0]        # kx = 0, ky >= 0
    assert np.sum(np.diff(np.sign(row_x)) != 0) > np.sum(np.diff(np.sign(col_y)) != 0)


def test_ctf_params_take():
    p = CTFParams(*(np.arange(3.0) + i for i in range(9)))
    assert len(p.take([0, 2])) == 2
    assert p.as_matrix().shape == (3, 9)
