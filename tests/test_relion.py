"""Cross-checks against RELION 3.1 binaries (skipped when RELION is not installed).

1. particles made by relion_project --ctf, reconstructed by cryocv, reach FSC 0.5 vs
   the true map within 10% of what relion_reconstruct --ctf reaches on them;
2. particles made by cryocv simulate, reconstructed by relion_reconstruct --ctf, do
   the same against cryocv's own reconstruction.
"""
import subprocess
import sys

import numpy as np
import pytest

from cryocv.fsc import fsc_curve, resolution_at
from cryocv.geometry import matrix_to_euler, random_rotations
from cryocv.io.mrc import read_map, write_map
from cryocv.particles import Particles
from cryocv.io.particle_files import load_particles, save_particles
from cryocv.reconstruct import reconstruct
from cryocv.simulate import random_ctf, simulate
from .conftest import needs_relion

pytestmark = needs_relion
BOX, PIXEL, N = 40, 2.4, 1500


def relion(cmd, cwd):
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]


def resolutions(truth, ours, theirs):
    return (resolution_at(fsc_curve(ours, truth), 0.5, BOX, PIXEL),
            resolution_at(fsc_curve(theirs, truth), 0.5, BOX, PIXEL))


@pytest.fixture(scope="module")
def truth(hemoglobin_map):
    return hemoglobin_map[0]


def test_relion_projected_particles_reconstruct_in_cryocv(truth, tmp_path):
    write_map(str(tmp_path / "truth.mrc"), truth, PIXEL)
    rng = np.random.default_rng(3)
    poses = Particles(stack_paths=np.array([str(tmp_path / "none.mrcs")] * N, dtype=object),
                      stack_indices=np.arange(N), box_size=BOX, pixel_size_A=PIXEL,
                      euler_deg=matrix_to_euler(random_rotations(N, rng)), origin_A=rng.normal(0, 4, (N, 2)),
                      ctf=random_ctf(N, rng), half_set=(np.arange(N) % 2 + 1).astype(np.int8),
                      optics_group=np.ones(N, int))
    save_particles(poses, str(tmp_path / "poses.star"))
    noise = float(np.sqrt(truth.sum(axis=0).var() / 0.1))  # SNR ≈ 0.1 before CTF
    relion(["relion_project", "--i", "truth.mrc", "--ang", "poses.star", "--o", "proj", "--ctf",
            "--add_noise", "--white_noise", f"{noise:.4f}"], tmp_path)
    relion(["relion_reconstruct", "--i", "proj.star", "--o", "relion.mrc", "--ctf"], tmp_path)
    parts = load_particles(str(tmp_path / "proj.star"))
    np.testing.assert_allclose(parts.euler_deg, poses.euler_deg, atol=1e-3)
    h1, h2, _, _ = reconstruct(parts, progress=False)
    ours_res, relion_res = resolutions(truth, (h1 + h2) / 2, read_map(str(tmp_path / "relion.mrc"))[0])
    print(f"relion_project particles: cryocv {ours_res:.2f} Å, relion_reconstruct {relion_res:.2f} Å")
    assert ours_res <= 1.10 * relion_res


def test_cryocv_simulated_particles_reconstruct_in_relion(truth, tmp_path):
    simulate(truth, PIXEL, N, str(tmp_path), snr=0.05, seed=7, progress=False)
    relion(["relion_reconstruct", "--i", "particles.star", "--o", "relion.mrc", "--ctf"], tmp_path)
    parts = load_particles(str(tmp_path / "particles.star"))
    h1, h2, _, _ = reconstruct(parts, progress=False)
    relion_map = read_map(str(tmp_path / "relion.mrc"))[0]
    ours_res, relion_res = resolutions(truth, (h1 + h2) / 2, relion_map)
    print(f"cryocv simulate particles: cryocv {ours_res:.2f} Å, relion_reconstruct {relion_res:.2f} Å")
    assert relion_res <= 1.10 * ours_res
    assert relion_res < 10.0  # RELION sees a real signal, so our CTF, angles and origins agree with it


def test_relion_runs_from_the_project_directory_on_what_cryocv_wrote_into_sub_folders(truth, tmp_path):
    """As users work: one project directory, cryocv jobs writing into sub-folders, RELION binaries run
    from the project directory on those STAR files (image names relative to the project)."""
    write_map(str(tmp_path / "truth.mrc"), truth, PIXEL)

    def cryocv(*args):
        r = subprocess.run([sys.executable, "-m", "cryocv", *args, "--quiet"], cwd=tmp_path, capture_output=True,
                           text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]

    cryocv("simulate", "--map", "truth.mrc", "--n", str(N), "--out", "Simulate/job001", "--snr", "0.1", "--seed", "5")
    cryocv("reconstruct", "--particles", "Simulate/job001/particles.star", "--out", "Reconstruct/job002",
           "--device", "cpu")
    import starfile
    names = starfile.read(str(tmp_path / "Reconstruct" / "job002" / "particles.star"),
                          always_dict=True)["particles"]["rlnImageName"]
    assert names[0] == "000001@Simulate/job001/particles.mrcs"  # the input's names, unchanged
    halves = [read_map(str(tmp_path / "Reconstruct" / "job002" / f"half_map_{h}.mrc"))[0] for h in (1, 2)]
    for star, out in (("Simulate/job001/particles.star", "sim.mrc"), ("Reconstruct/job002/particles.star", "rec.mrc")):
        relion(["relion_reconstruct", "--i", star, "--o", out, "--ctf"], tmp_path)
        ours_res, relion_res = resolutions(truth, (halves[0] + halves[1]) / 2, read_map(str(tmp_path / out))[0])
        print(f"from the project directory, {star}: relion_reconstruct {relion_res:.2f} Å, cryocv {ours_res:.2f} Å")
        assert relion_res <= 1.10 * ours_res, (star, relion_res, ours_res)
