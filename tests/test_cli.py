"""The cryocv command line, run as users run it (a subprocess), checked by content."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from cryocv.fsc import fsc_curve, resolution_at
from cryocv.io.mrc import read_map, write_map
from cryocv.io.particle_files import load_particles
from .conftest import blob_volume


def cryocv(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "cryocv", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600)


@pytest.fixture(scope="module")
def truth_map(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("map") / "truth.mrc")
    write_map(path, blob_volume(32, seed=11), 2.0)
    return path


@pytest.fixture(scope="module")
def simulated_dir(truth_map, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("sim"))
    r = cryocv("simulate", "--map", truth_map, "--n", "600", "--out", out, "--snr", "0.5", "--seed", "4", "--quiet")
    assert r.returncode == 0, r.stderr
    return out


def test_simulate_writes_true_poses(simulated_dir):
    parts = load_particles(os.path.join(simulated_dir, "particles.star"))
    assert len(parts) == 600 and parts.box_size == 32 and parts.pixel_size_A == pytest.approx(2.0)
    assert parts.read_images().shape == (600, 32, 32)
    assert 250 < np.sum(parts.half_set == 1) < 350
    # rerunning with the same seed gives the same particles
    job = json.load(open(os.path.join(simulated_dir, "job.json")))
    assert job["parameters"]["seed"] == 4 and job["parameters"]["n"] == 600


def test_reconstruct_outputs(simulated_dir, truth_map, tmp_path):
    out = str(tmp_path / "rec")
    r = cryocv("reconstruct", "--particles", os.path.join(simulated_dir, "particles.star"), "--out", out, "--quiet")
    assert r.returncode == 0, r.stderr
    report = json.load(open(os.path.join(out, "fsc.json")))
    truth, px = read_map(truth_map)
    full, mpx = read_map(os.path.join(out, "map.mrc"))
    assert mpx == pytest.approx(2.0)
    vs_truth = resolution_at(fsc_curve(full, truth), 0.5, 32, px)
    assert vs_truth < 8.0 and report["resolution_A"] < 8.0  # measured 7.0 Å vs truth (Nyquist 4 Å)
    assert {"fsc_unmasked", "fsc_masked", "fsc_corrected", "frequency_per_A"} <= set(report)
    h1, _ = read_map(os.path.join(out, "half_map_1.mrc"))
    h2, _ = read_map(os.path.join(out, "half_map_2.mrc"))
    assert 0.3 < np.corrcoef(h1.ravel(), h2.ravel())[0, 1] < 0.999  # independent halves
    with open(os.path.join(out, "fsc.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert f"{report['resolution_A']:.2f}" in r.stdout


def test_reconstruct_cs_input_and_symmetry_flag(simulated_dir, tmp_path):
    cs = str(tmp_path / "p.cs")
    assert cryocv("convert", os.path.join(simulated_dir, "particles.star"), cs).returncode == 0
    out = str(tmp_path / "rec")
    r = cryocv("reconstruct", "--particles", cs, "--out", out, "--sym", "c1", "--quiet")
    assert r.returncode == 0, r.stderr
    back = load_particles(os.path.join(out, "particles.star"))
    orig = load_particles(os.path.join(simulated_dir, "particles.star"))
    np.testing.assert_array_equal(back.half_set, orig.half_set)


def test_fsc_command(truth_map, tmp_path):
    noisy = str(tmp_path / "noisy.mrc")
    vol, _ = read_map(truth_map)
    write_map(noisy, vol + 0.05 * np.random.default_rng(0).normal(size=vol.shape).astype(np.float32), 2.0)
    r = cryocv("fsc", truth_map, noisy)
    assert r.returncode == 0
    lines = r.stdout.strip().splitlines()
    assert lines[0].startswith("FSC=0.143:") and lines[1].startswith("FSC=0.5:")
    res = json.loads(cryocv("fsc", truth_map, noisy, "--json").stdout)
    assert res["resolution_0.143_A"] <= res["resolution_0.5_A"]


@pytest.mark.parametrize("args,message", [
    (["reconstruct", "--particles", "/nonexistent.star", "--out", "x"], "file not found"),
    (["reconstruct", "--particles", "{sim}/particles.star", "--out", "{tmp}/r", "--sym", "Q7"], "unknown symmetry"),
    (["fsc", "{map}", "{small}"], "differ in size"),
    (["simulate", "--map", "{map}", "--n", "0", "--out", "{tmp}/s"], "--n must be positive"),
    (["convert", "{sim}/particles.star", "{tmp}/x.txt"], "unknown particle file type"),
    (["reconstruct", "--particles", "{nopose}", "--out", "{tmp}/r"], "no poses"),
    (["reconstruct", "--particles", "{nandef}", "--out", "{tmp}/r"], "non-finite value in defocus_u_A"),
    (["reconstruct", "--particles", "{onehalf}", "--out", "{tmp}/r"], "half-set 2 is empty"),
    (["reconstruct", "--particles", "{badname}", "--out", "{tmp}/r"], "bad rlnImageName"),
    (["simulate", "--map", "{map}", "--n", "5", "--out", "{tmp}/s", "--pixel-size-A", "nan"], "positive number"),
    (["fsc", "{map}", "{map}", "--pixel-size-A", "-1"], "positive number"),
])
def test_errors_are_one_line(args, message, simulated_dir, truth_map, tmp_path):
    small = str(tmp_path / "small.mrc")
    write_map(small, np.zeros((16, 16, 16), np.float32), 2.0)
    nopose = tmp_path / "nopose.star"
    nopose.write_text("data_particles\n\nloop_\n_rlnImageName #1\n_rlnImagePixelSize #2\n"
                      f"1@{simulated_dir}/particles.mrcs 2.0\n")
    import starfile
    blocks = starfile.read(os.path.join(simulated_dir, "particles.star"), always_dict=True)
    variants = {}
    for name, edit in {"nandef": lambda t: t.assign(rlnDefocusU=np.where(t.index == 3, np.nan, t.rlnDefocusU)),
                       "onehalf": lambda t: t.assign(rlnRandomSubset=1),
                       "badname": lambda t: t.assign(rlnImageName="x@" + t.rlnImageName.str.split("@").str[1])
                       }.items():
        table = edit(blocks["particles"].copy())
        table["rlnImageName"] = table["rlnImageName"].str.replace("@particles", f"@{simulated_dir}/particles")
        variants[name] = str(tmp_path / f"{name}.star")
        starfile.write({"optics": blocks["optics"], "particles": table}, variants[name])
    subs = {"sim": simulated_dir, "tmp": str(tmp_path), "map": truth_map, "small": small, "nopose": str(nopose),
            **variants}
    r = cryocv(*[a.format(**subs) for a in args])
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not os.path.exists(os.path.join(str(tmp_path), "r", "map.mrc"))


@pytest.mark.skipif(__import__("cryocv.backend").backend.gpu_available(), reason="a GPU is present")
def test_gpu_request_without_gpu_is_one_line(simulated_dir, tmp_path):
    r = cryocv("reconstruct", "--particles", os.path.join(simulated_dir, "particles.star"), "--out",
               str(tmp_path / "r"), "--device", "gpu")
    assert r.returncode == 2 and "no CUDA GPU" in r.stderr and "Traceback" not in r.stderr


def test_rerun_into_a_finished_job_is_refused_and_leaves_it_untouched(simulated_dir, tmp_path):
    """One rule for every job (issue 11): a finished job in --out is kept unless --overwrite,
    and a rerun that fails on its input leaves the folder as it was (the old map is still the
    old, finished one)."""
    out = str(tmp_path / "r")
    star = os.path.join(simulated_dir, "particles.star")
    assert cryocv("reconstruct", "--particles", star, "--out", out, "--quiet").returncode == 0
    finished = open(os.path.join(out, "map.mrc"), "rb").read()
    r = cryocv("reconstruct", "--particles", star, "--out", out)
    assert r.returncode == 2 and "already holds a finished job" in r.stderr and "--overwrite" in r.stderr
    stack = os.path.join(simulated_dir, "particles.mrcs")
    os.rename(stack, stack + ".hidden")
    try:
        r = cryocv("reconstruct", "--particles", star, "--out", out, "--overwrite")
    finally:
        os.rename(stack + ".hidden", stack)
    assert r.returncode == 2 and "not found" in r.stderr
    assert open(os.path.join(out, "map.mrc"), "rb").read() == finished
    assert cryocv("reconstruct", "--particles", star, "--out", out, "--overwrite", "--quiet").returncode == 0


def test_help_documents_every_subcommand():
    r = cryocv("--help")
    for sub in ("simulate", "reconstruct", "refine", "fsc", "convert", "demo"):
        assert sub in r.stdout
    assert "--snr" in cryocv("simulate", "--help").stdout
    assert "--regularizer" in cryocv("refine", "--help").stdout


def test_refine_rejects_bad_input_with_one_line(simulated_dir, truth_map, tmp_path):
    star = os.path.join(simulated_dir, "particles.star")
    r = cryocv("refine", "--particles", star, "--out", str(tmp_path / "a"))
    assert r.returncode == 2 and "--ref" in r.stderr and "Traceback" not in r.stderr
    small = str(tmp_path / "small.mrc")
    write_map(small, np.zeros((24, 24, 24), np.float32) + 1, 2.0)
    r = cryocv("refine", "--particles", star, "--ref", small, "--out", str(tmp_path / "b"), "--device", "cpu")
    assert r.returncode == 2 and "24 px" in r.stderr and "32 px" in r.stderr
    r = cryocv("refine", "--particles", star, "--ref", truth_map, "--out", str(tmp_path / "c"), "--sym", "X7")
    assert r.returncode == 2 and "X7" in r.stderr
    r = cryocv("refine", "--continue", str(tmp_path / "nothing"))
    assert r.returncode == 2 and "no refinement to continue" in r.stderr
    assert not os.path.exists(str(tmp_path / "b" / "map.mrc"))
