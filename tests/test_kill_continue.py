"""A refinement killed with SIGKILL at random moments (and while it writes a checkpoint) and
continued with ``--continue`` ends with the same poses and map as an uninterrupted run (every chain
of kills and continuations that reaches the end is checked)."""
import glob
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from cryocv.io.mrc import read_map, write_map
from cryocv.io.particle_files import load_particles
from cryocv.simulate import simulate
from .conftest import blob_volume

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
KILLS = 10


def start(star, ref, out, resume):
    args = ["--continue", out] if resume else ["--particles", star, "--ref", ref, "--out", out,
                                               "--regularizer", "uniform", "--max-iterations", "2",
                                               "--initial-lowpass-A", "12", "--device", "cpu"]
    return subprocess.Popen([sys.executable, "-m", "cryocv", "refine", *args, "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def writing_a_checkpoint(out):
    """An iteration folder without its state.json (written last in the folder) is being written."""
    return any(not os.path.exists(os.path.join(folder, "state.json"))
               for folder in glob.glob(os.path.join(out, "iterations", "iter_*")))


def test_killed_and_continued_refinement_equals_an_uninterrupted_one(tmp_path):
    truth = blob_volume(24, seed=3)
    write_map(str(tmp_path / "truth.mrc"), truth, 2.0)
    simulate(truth, 2.0, 160, str(tmp_path / "sim"), snr=1.0, seed=1, progress=False)
    star, ref = str(tmp_path / "sim" / "particles.star"), str(tmp_path / "truth.mrc")

    clean = str(tmp_path / "clean")
    started = time.time()
    process = start(star, ref, clean, resume=False)
    assert process.wait(timeout=600) == 0, process.stderr.read()
    duration = time.time() - started

    rng = np.random.default_rng(0)
    moments = list(rng.uniform(1.0, 0.8 * duration, KILLS - 2)) + ["checkpoint", "checkpoint"]
    rng.shuffle(moments)
    out = str(tmp_path / "killed")

    def run_until(moment):
        """Start (or continue) the job; SIGKILL it at ``moment`` (seconds, or "checkpoint": while a
        checkpoint file is being written); returns whether it was killed."""
        process = start(star, ref, out, resume=os.path.isfile(os.path.join(out, "refine_config.json")))
        t0 = time.time()
        while process.poll() is None:
            elapsed = time.time() - t0
            writing = moment == "checkpoint" and writing_a_checkpoint(out)
            if moment is not None and (writing or elapsed > (duration if moment == "checkpoint" else moment)):
                process.send_signal(signal.SIGKILL)
                process.wait(timeout=60)
                return 1 + writing
            time.sleep(0.001)
        assert process.returncode == 0, process.stderr.read()[-2000:]
        return 0

    def equals_the_uninterrupted_run():
        a = load_particles(os.path.join(clean, "particles.star"))
        b = load_particles(os.path.join(out, "particles.star"))
        np.testing.assert_array_equal(b.half_set, a.half_set)
        np.testing.assert_allclose(b.euler_deg, a.euler_deg, atol=1e-4)
        np.testing.assert_allclose(b.origin_A, a.origin_A, atol=1e-4)
        np.testing.assert_allclose(read_map(os.path.join(out, "map.mrc"))[0],
                                   read_map(os.path.join(clean, "map.mrc"))[0], atol=1e-6)

    # A continued run has less left to do than a whole one, so it may finish before its moment
    # comes: that chain of kills is then checked and a new one starts, with the same moment.
    kills, during_checkpoint, chains = 0, 0, 0
    for moment in moments:
        for _ in range(2):
            if os.path.isfile(os.path.join(out, "map.mrc")):
                equals_the_uninterrupted_run()
                chains += 1
                shutil.rmtree(out)
            outcome = run_until(moment)
            if outcome:
                break
        kills += outcome > 0
        during_checkpoint += outcome == 2
    while not os.path.isfile(os.path.join(out, "map.mrc")):
        run_until(None)
    equals_the_uninterrupted_run()
    print(f"{kills} kills ({during_checkpoint} while a checkpoint was being written) in {chains + 1} chains")
    assert kills >= KILLS // 2 and during_checkpoint >= 1, (kills, during_checkpoint)
