"""Particle signal subtraction (``cryocv subtract``, cryocv/subtraction.py), judged by physics:
a two-domain map (domain A kept, domain B subtracted, 16 px apart), seeded CTF particles, box 40.
What is subtracted leaves only the noise, what is kept stays, each half-set meets only its own
half-map, per-particle scales come back, a reconstruction of re-centred particles has the kept
domain in the box centre, and RELION reads (and reverts) what we write."""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import starfile

from cryocv import cli
from cryocv.io.mrc import read_map, write_map, write_stack
from cryocv.io.particle_files import load_particles, save_particles
from cryocv.jobs import jobdir
from cryocv.jobs.subtract import SubtractParams, run
from cryocv.reconstruct import reconstruct_half_maps
from cryocv.source import ParticleSource
from cryocv.subtraction import center_of_mass, recentring_shifts, subtract_source

BOX, PIXEL, N = 40, 2.0, 300
CENTER_A = np.array([7.3, 2.6, -2.2])      # (x, y, z) px from the box centre: the kept domain
CENTER_B = -CENTER_A * 9 / 7.9             # the domain to subtract, 17 px away


GRID = np.indices((BOX,) * 3).astype(np.float32)[::-1] - BOX // 2      # (x, y, z) px from the box centre


def domain(center_xyz, seed, n_atoms=25, radius=4.5):
    """Gaussian atoms (σ 1 px) within ``radius`` of ``center_xyz`` (px from the box centre)."""
    rng = np.random.default_rng(seed)
    grid = GRID
    volume = np.zeros((BOX,) * 3, np.float32)
    for _ in range(n_atoms):
        offset = rng.normal(0, 1, 3)
        offset *= rng.uniform(0, radius) / np.linalg.norm(offset)
        c = np.asarray(center_xyz) + offset
        volume += np.exp(-((grid - c[:, None, None, None]) ** 2).sum(0) / 2)
    return volume


def keep_mask_around(center_xyz, radius=7.0, edge=3.0):
    """Soft sphere (cosine edge) around ``center_xyz`` (not on the grid: its centre of mass is too)."""
    distance = np.sqrt(((GRID - np.asarray(center_xyz, np.float32)[:, None, None, None]) ** 2).sum(0))
    return (0.5 * (1 + np.cos(np.pi * np.clip((distance - radius) / edge, 0, 1)))).astype(np.float32)


def translated(volume, center_xyz):
    """``volume`` moved by −center (a Fourier shift): what a reconstruction centred on it shows."""
    k = np.meshgrid(*[np.fft.fftfreq(BOX)] * 3, indexing="ij")[::-1]     # (kx, ky, kz) on [z, y, x]
    phase = np.exp(2j * np.pi * sum(ki * ci for ki, ci in zip(k, center_xyz)))
    return np.fft.ifftn(np.fft.fftn(volume) * phase).real.astype(np.float32)


def correlation(a, b):
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def with_images(particles, images, path):
    """``particles`` with ``images`` written to ``path`` (.mrcs) and saved as ``path`` .star."""
    write_stack(path, images, PIXEL)
    particles.stack_paths = np.array([os.path.abspath(path)] * len(particles), dtype=object)
    particles.stack_indices = np.arange(len(particles))
    star = path.replace(".mrcs", ".star")
    save_particles(particles, star)
    return star


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Files in one folder: domains, maps, masks, noise-free particles (clean.star), the same
    with white noise at SNR 1 (noisy.star, noise kept in ``noise``)."""
    from cryocv.simulate import simulate
    root = tmp_path_factory.mktemp("subtract")
    a, b = domain(CENTER_A, 1), domain(CENTER_B, 2)
    mask = keep_mask_around(CENTER_A)
    assert np.abs(a * (1 - mask)).max() < 1e-3 * a.max() and np.abs(b * mask).max() < 1e-3 * b.max()
    files = {"truth": a + b, "a": a, "zero": np.zeros_like(a), "ones": np.ones_like(a), "keep": mask,
             "other": domain((0.0, 0.0, 0.0), 7, n_atoms=60, radius=9)}
    for name, volume in files.items():
        write_map(str(root / f"{name}.mrc"), volume, PIXEL)
    clean = simulate(a + b, PIXEL, N, str(root / "sim"), snr=np.inf, seed=3, progress=False, name="clean")
    images = clean.read_images()
    noise = np.random.default_rng(4).normal(0, images.std(), images.shape).astype(np.float32)
    noisy = with_images(load_particles(clean.source), images + noise, str(root / "sim" / "noisy.mrcs"))
    return {"root": root, "clean": clean.source, "noisy": noisy, "images": images, "noise": noise,
            "half_set": clean.half_set, "domain_a": a, "mask": mask, **{k: str(root / f"{k}.mrc") for k in files}}


def subtract(data, tmp_path, maps=("truth", "truth"), mask="keep", star="noisy", **params):
    out = str(tmp_path / "out")
    run(data[star], [data[maps[0]], data[maps[1]]], data[mask], out, SubtractParams(**params), device="cpu",
        progress=False)
    return load_particles(os.path.join(out, jobdir.PARTICLES_STAR)), out


def power_fraction(residual, signal):
    return float((residual ** 2).sum() / (signal ** 2).sum())


def test_zero_keep_mask_leaves_only_the_noise(data, tmp_path):
    out, _ = subtract(data, tmp_path, mask="zero")
    residual_signal = out.read_images() - data["noise"]
    fraction = power_fraction(residual_signal, data["images"])
    print(f"zero keep mask: residual signal power {fraction:.2e} of the particles' signal power")
    assert fraction < 0.02


@pytest.fixture(scope="module")
def only_a(data):
    """Noise-free images of domain A alone at the particles' poses, origins and CTFs (same seed)."""
    from cryocv.simulate import simulate
    return simulate(data["domain_a"], PIXEL, N, str(data["root"] / "sim"), snr=np.inf, seed=3, progress=False,
                    name="only_a").read_images()


def test_keep_mask_keeps_its_domain_and_removes_the_rest(data, only_a, tmp_path):
    """With the mask around A, the output is A's particle images plus the noise."""
    out, _ = subtract(data, tmp_path)
    fraction = power_fraction(out.read_images() - data["noise"] - only_a, data["images"])
    print(f"keep mask on domain A: residual of domain B {fraction:.2e} of the signal power")
    assert fraction < 0.02


def test_full_keep_mask_leaves_the_images_unchanged(data, tmp_path):
    out, _ = subtract(data, tmp_path, mask="ones")
    original = load_particles(data["noisy"]).read_images()
    np.testing.assert_allclose(out.read_images(), original, atol=1e-5 * np.abs(original).max())


def test_each_half_set_meets_only_its_own_half_map(data, tmp_path):
    """(The one number both half-sets share is the scale fit's frequency limit, by default from the
    half-maps' FSC as a gold-standard refinement's resolution; here it is given.)"""
    half, noise, signal = data["half_set"], data["noise"], data["images"]
    original = load_particles(data["noisy"]).read_images()
    first, second, third = (subtract(data, tmp_path / str(i), maps=maps, mask="zero", scale_resolution_A=2 * PIXEL)[0]
                            .read_images() for i, maps in enumerate([("truth", "zero"), ("truth", "other"),
                                                                     ("other", "truth")]))
    np.testing.assert_array_equal(first[half == 1], second[half == 1])        # half-map 2 never reaches half 1
    np.testing.assert_allclose(first[half == 2], original[half == 2], atol=1e-5 * np.abs(original).max())
    for images, h in ((first, 1), (third, 2)):          # subtracted with their own (true) half-map: noise left
        assert power_fraction(images[half == h] - noise[half == h], signal[half == h]) < 0.02
    # a wrong map does leave signal behind: so "noise left" above means the right map was used
    assert power_fraction(second[half == 2] - noise[half == 2], signal[half == 2]) > 0.3


def test_per_particle_scales_come_back(data, only_a, tmp_path):
    rng = np.random.default_rng(9)
    amplitude = rng.uniform(0.6, 1.6, N).astype(np.float32)
    noise = 0.5 * data["noise"]
    images = data["images"] * amplitude[:, None, None] + noise
    particles = load_particles(with_images(load_particles(data["clean"]), images, str(tmp_path / "scaled.mrcs")))
    written = np.zeros_like(images)

    def write(index, batch):
        written[index] = batch

    maps = [read_map(data["truth"])[0]] * 2
    scales, origins = subtract_source(ParticleSource(particles, np), maps, data["mask"], write, 64, progress=False)
    error = np.abs(scales / amplitude - 1)
    print(f"per-particle scales: median error {np.median(error):.2%}, max {error.max():.2%}")
    assert np.median(error) < 0.02 and error.max() < 0.08
    np.testing.assert_array_equal(origins, particles.origin_px.astype(np.float32))
    # the scale is fitted on the whole map, so the kept domain A does not bias it: each image loses
    # domain B at its own amplitude and keeps A
    residual = written - noise - amplitude[:, None, None] * only_a
    fraction = power_fraction(residual, images - noise)
    print(f"scaled particles, keep mask on A: residual of domain B {fraction:.2e} of the signal power")
    assert fraction < 0.02


def test_recentred_particles_reconstruct_with_the_kept_domain_in_the_centre(data, tmp_path):
    out, folder = subtract(data, tmp_path, star="clean", recenter=True)
    assert np.all(np.abs(out.origin_px) <= 0.5 + 1e-4)                       # whole pixels moved, the rest kept
    com = center_of_mass(data["mask"])
    np.testing.assert_allclose(com, CENTER_A, atol=0.05)
    # the origin rule: the mask's centre projects to box centre − new origin in the output images
    clean = load_particles(data["clean"])
    shifts, new_origin = recentring_shifts(clean.rotations, clean.origin_px, com)
    np.testing.assert_allclose(out.origin_px, new_origin, atol=1e-4)
    recon = sum(reconstruct_half_maps(out, np, progress=False)) / 2
    moved = translated(data["domain_a"], com)          # domain A with the mask's centre of mass at the box centre
    centre = center_of_mass(np.clip(recon, 0, None))
    error = np.linalg.norm(centre - center_of_mass(moved))
    print(f"recentred reconstruction: density centre of mass {np.linalg.norm(centre):.2f} px from the box centre, "
          f"{error:.3f} px from the moved truth's; correlation with the moved truth {correlation(recon, moved):.3f}")
    assert np.linalg.norm(centre) < 1.0 and error < 0.5
    assert correlation(recon, moved) > 0.9
    cropped, _ = subtract(data, tmp_path / "crop", star="clean", recenter=True, new_box=24)
    assert cropped.box_size == 24 and cropped.read_images().shape == (N, 24, 24)
    np.testing.assert_array_equal(cropped.read_images(), out.read_images()[:, 8:32, 8:32])
    small = sum(reconstruct_half_maps(cropped, np, progress=False)) / 2
    truth_small = moved[8:32, 8:32, 8:32]
    print(f"--new-box 24: correlation with the cropped moved truth {correlation(small, truth_small):.3f}")
    assert correlation(small, truth_small) > 0.9


def test_rows_original_names_and_a_subtraction_of_a_subtraction(data, tmp_path):
    source = load_particles(data["noisy"])
    out, folder = subtract(data, tmp_path, mask="zero")
    table = starfile.read(os.path.join(folder, jobdir.PARTICLES_STAR), always_dict=True)["particles"]
    assert len(table) == N and list(table.columns[:3]) == ["rlnImageName", "rlnOpticsGroup", "rlnAngleRot"]
    np.testing.assert_allclose(out.euler_deg, source.euler_deg, atol=1e-4)
    np.testing.assert_allclose(out.origin_A, source.origin_A, atol=1e-4)
    np.testing.assert_array_equal(out.half_set, source.half_set)
    np.testing.assert_allclose(out.ctf.defocus_u_A, source.ctf.defocus_u_A)
    np.testing.assert_array_equal(out.stack_indices, np.arange(N))         # row i is image i of the new stack
    assert set(out.stack_paths) == {os.path.join(folder, jobdir.SUBTRACTED_STACK)}
    # the original names point at the input's images, row by row (RELION's --revert swaps them back)
    reverted = table.copy()
    reverted["rlnImageName"], reverted["rlnImageOriginalName"] = table["rlnImageOriginalName"], table["rlnImageName"]
    blocks = starfile.read(os.path.join(folder, jobdir.PARTICLES_STAR), always_dict=True)
    blocks["particles"] = reverted
    starfile.write(blocks, str(tmp_path / "reverted.star"), overwrite=True)
    np.testing.assert_array_equal(load_particles(str(tmp_path / "reverted.star")).read_images(), source.read_images())
    # again on the output: the original names then point at the first output (as RELION writes them)
    run(os.path.join(folder, jobdir.PARTICLES_STAR), [data["truth"]] * 2, data["ones"], str(tmp_path / "again"),
        device="cpu", progress=False)
    blocks = starfile.read(str(tmp_path / "again" / jobdir.PARTICLES_STAR), always_dict=True)
    blocks["particles"]["rlnImageName"] = blocks["particles"]["rlnImageOriginalName"]
    starfile.write(blocks, str(tmp_path / "again_reverted.star"), overwrite=True)
    np.testing.assert_array_equal(load_particles(str(tmp_path / "again_reverted.star")).read_images(),
                                  out.read_images())


def test_other_columns_travel_and_origin_priors_go_when_recentred(data, tmp_path):
    blocks = starfile.read(data["noisy"], always_dict=True)
    blocks["particles"]["rlnClassNumber"] = np.arange(N) % 3 + 1
    blocks["particles"]["rlnOriginXPriorAngst"] = blocks["particles"]["rlnOriginXAngst"]
    star = os.path.join(os.path.dirname(data["noisy"]), "with_columns.star")
    starfile.write(blocks, star, overwrite=True)
    for recenter in (False, True):
        folder = str(tmp_path / f"recenter_{recenter}")
        run(star, [data["truth"]] * 2, data["keep"], folder, SubtractParams(recenter=recenter), device="cpu",
            progress=False)
        table = starfile.read(os.path.join(folder, jobdir.PARTICLES_STAR), always_dict=True)["particles"]
        np.testing.assert_array_equal(table["rlnClassNumber"], np.arange(N) % 3 + 1)
        assert ("rlnOriginXPriorAngst" in table.columns) != recenter       # RELION drops them when re-centring


def test_cs_input_gives_a_star_whose_original_names_are_the_cs_images(data, tmp_path):
    cs = str(tmp_path / "noisy.cs")
    save_particles(load_particles(data["noisy"]), cs)
    out = str(tmp_path / "out")
    run(cs, [data["truth"]] * 2, data["zero"], out, device="cpu", progress=False)
    table = starfile.read(os.path.join(out, jobdir.PARTICLES_STAR), always_dict=True)["particles"]
    table["rlnImageName"] = table["rlnImageOriginalName"]
    blocks = starfile.read(os.path.join(out, jobdir.PARTICLES_STAR), always_dict=True)
    blocks["particles"] = table
    starfile.write(blocks, str(tmp_path / "back.star"), overwrite=True)
    np.testing.assert_array_equal(load_particles(str(tmp_path / "back.star")).read_images(),
                                  load_particles(data["noisy"]).read_images())


# ------------------------------------------------------------------------ bad input, job hygiene
def cli_error(capsys, *args):
    """``cryocv subtract ARGS`` in this process: exit status 2 and a one-line message (returned)."""
    code = cli.main(["subtract", *args, "--device", "cpu", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, (code, err)
    return err


@pytest.fixture(scope="module")
def bad(data):
    """Broken inputs beside the good ones."""
    root = data["root"] / "sim"          # beside the stack, which the STAR files name relative to their folder
    files = {"small": (np.zeros((BOX - 8,) * 3), PIXEL), "other_pixel": (data["mask"], 2.2),
             "over_one": (data["mask"] * 2, PIXEL), "nan": (np.where(data["mask"] > 0.5, np.nan, 0), PIXEL)}
    for name, (volume, pixel) in files.items():
        write_map(str(root / f"{name}.mrc"), np.asarray(volume, np.float32), pixel)
    tables = starfile.read(data["noisy"], always_dict=True)
    parts = tables["particles"]
    for name, dropped in (("no_poses", ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]),
                          ("no_halves", ["rlnRandomSubset"])):
        starfile.write({**tables, "particles": parts.drop(columns=dropped)}, str(root / f"{name}.star"), overwrite=True)
    return {name: str(root / f"{name}{'.star' if name.startswith('no_') else '.mrc'}")
            for name in list(files) + ["no_poses", "no_halves"]}


@pytest.mark.parametrize("case,words", [
    ("mask_box", ["keep mask", f"{BOX - 8} px", f"{BOX} px"]),
    ("mask_pixel", ["keep mask", "2.2000 Å/px", "2.0000 Å/px"]),
    ("mask_range", ["values in [0, 2]", "[0, 1]"]),
    ("mask_nan", ["NaN"]),
    ("half_map_box", ["half-map", f"{BOX - 8} px"]),
    ("half_map_pixel", ["half-map", "2.2000 Å/px"]),
    ("no_poses", ["no poses"]),
    ("no_halves", ["no half-set"]),
    ("new_box_large", ["--new-box 48", "larger"]),
    ("new_box_odd", ["--new-box", "even"]),
    ("new_box_tiny", ["--new-box", ">= 16"]),
    ("recenter_empty", ["--recenter", "all zero"]),
])
def test_bad_input_gives_one_line_and_no_output(data, bad, tmp_path, capsys, case, words):
    particles, halves, mask, extra = data["noisy"], [data["truth"], data["truth"]], data["keep"], []
    if case.startswith("mask_"):
        mask = bad[{"mask_box": "small", "mask_pixel": "other_pixel", "mask_range": "over_one",
                    "mask_nan": "nan"}[case]]
    elif case.startswith("half_map_"):
        halves[1] = bad["small" if case == "half_map_box" else "other_pixel"]
    elif case.startswith("no_"):
        particles = bad[case]
    elif case.startswith("new_box"):
        extra = ["--new-box", {"new_box_large": "48", "new_box_odd": "23", "new_box_tiny": "12"}[case]]
    else:
        mask, extra = data["zero"], ["--recenter"]
    out = str(tmp_path / "out")
    err = cli_error(capsys, "--particles", particles, "--half-maps", *halves, "--keep-mask", mask, "--out", out, *extra)
    for word in words:
        assert word in err, (word, err)
    assert not os.path.exists(out)


def test_finished_job_kept_unless_overwrite_and_a_failure_leaves_no_output(data, tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "out")
    args = ["--particles", data["noisy"], "--half-maps", data["truth"], data["truth"], "--keep-mask", data["keep"],
            "--out", out]
    assert cli.main(["subtract", *args, "--device", "cpu", "--quiet"]) == 0
    first = starfile.read(os.path.join(out, jobdir.PARTICLES_STAR), always_dict=True)
    assert "--overwrite" in cli_error(capsys, *args)
    assert cli.main(["subtract", *args, "--device", "cpu", "--quiet", "--overwrite", "--no-scale"]) == 0
    again = starfile.read(os.path.join(out, jobdir.PARTICLES_STAR), always_dict=True)
    for block in ("optics", "particles"):                                       # same rows, names, poses
        assert again[block].equals(first[block])
    # a job that dies half-way through the images leaves no stack, no STAR and no temporary file behind
    from cryocv.jobs import subtract as job
    real = job.subtract_source

    def die_after_one_batch(source, half_maps, keep_mask, write, *rest, **kwargs):
        def write_then_die(index, images):
            write(index, images)
            raise KeyboardInterrupt
        return real(source, half_maps, keep_mask, write_then_die, *rest, **kwargs)

    monkeypatch.setattr(job, "subtract_source", die_after_one_batch)
    with pytest.raises(KeyboardInterrupt):
        run(data["noisy"], [data["truth"]] * 2, data["keep"], out, device="cpu", progress=False, overwrite=True)
    assert os.listdir(out) == [jobdir.RUN_LOG]
    monkeypatch.undo()
    # a job never writes over its input, even with --overwrite
    inputs = str(tmp_path / "inputs")
    save_particles(load_particles(data["noisy"]), os.path.join(inputs, jobdir.PARTICLES_STAR))
    before = open(os.path.join(inputs, jobdir.PARTICLES_STAR)).read()
    assert "overwrite the input" in cli_error(capsys, "--particles", os.path.join(inputs, jobdir.PARTICLES_STAR),
                                              *args[2:-1], inputs, "--overwrite")
    assert open(os.path.join(inputs, jobdir.PARTICLES_STAR)).read() == before


# ------------------------------------------------------------------------------------- RELION
needs_relion = pytest.mark.skipif(shutil.which("relion_reconstruct") is None or shutil.which("relion_project") is None,
                                  reason="RELION 3.1 binaries not installed (apt-get install relion)")


def relion(cmd, cwd):
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]


@needs_relion
def test_relion_reads_reconstructs_and_reverts_what_subtract_writes(data, tmp_path):
    """In a project folder: RELION's projections of the map are subtracted to nothing (an
    independent projector); a re-centred subtraction run from the project folder is reconstructed by
    relion_reconstruct --ctf with domain A in the box centre, and relion_particle_subtract --revert
    gives back the input's images."""
    project = tmp_path
    relion(["relion_project", "--i", data["truth"], "--ang", data["clean"], "--o", "proj", "--ctf"], project)
    run(str(project / "proj.star"), [data["truth"]] * 2, data["zero"], str(project / "Zero"), device="cpu",
        progress=False)
    projected = load_particles(str(project / "proj.star")).read_images()
    left = power_fraction(load_particles(str(project / "Zero" / jobdir.PARTICLES_STAR)).read_images(), projected)
    print(f"relion_project particles, zero keep mask: residual power {left:.2e}")
    assert left < 0.02
    r = subprocess.run([sys.executable, "-m", "cryocv", "subtract", "--particles", data["clean"], "--half-maps",
                        data["truth"], data["truth"], "--keep-mask", data["keep"], "--out", "Subtract/job002",
                        "--recenter", "--quiet"], cwd=project, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    star = "Subtract/job002/particles.star"
    names = starfile.read(str(project / star), always_dict=True)["particles"]["rlnImageName"]
    assert names[0] == f"000001@Subtract/job002/{jobdir.SUBTRACTED_STACK}"    # relative to the project folder
    relion(["relion_reconstruct", "--i", star, "--o", "relion.mrc", "--ctf"], project)
    theirs = read_map(str(project / "relion.mrc"))[0]
    moved = translated(data["domain_a"], center_of_mass(data["mask"]))
    offset = np.linalg.norm(center_of_mass(np.clip(theirs, 0, None)) - center_of_mass(moved))
    print(f"relion_reconstruct of the re-centred subtraction: correlation with domain A moved to the centre "
          f"{correlation(theirs, moved):.3f}, centre of mass {offset:.2f} px from its")
    assert correlation(theirs, moved) > 0.9 and offset < 1.0
    ours = sum(reconstruct_half_maps(load_particles(str(project / star)), np, progress=False)) / 2
    assert correlation(theirs, ours) > 0.95
    (project / "Revert").mkdir()                     # (RELION's --revert writes there but does not create it)
    relion(["relion_particle_subtract", "--revert", star, "--o", "Revert/"], project)
    np.testing.assert_array_equal(load_particles(str(project / "Revert" / "original.star")).read_images(),
                                  load_particles(data["clean"]).read_images())
