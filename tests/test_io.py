import os

import numpy as np
import pytest

from cryocv.errors import CryocvError
from cryocv.geometry import angular_distance_deg, euler_to_matrix
from cryocv.io.mrc import read_map, write_map, write_stack
from cryocv.io.particle_files import load_particles, save_particles
from cryocv.simulate import simulate
from .conftest import blob_volume


def p(shared, *parts):
    return os.path.join(shared, "particles", *parts)


def test_relion31_star_with_images(shared_data):
    parts = load_particles(p(shared_data, "relion31", "relion31.star"))
    assert len(parts) == 5 and parts.box_size == 256 and parts.pixel_size_A == pytest.approx(2.806)
    np.testing.assert_allclose(parts.euler_deg[0], [-102.30296, 82.318041, 124.706463], atol=1e-5)
    assert parts.ctf.defocus_u_A[0] == pytest.approx(13108.082418)
    assert parts.ctf.voltage_kV[0] == 300 and parts.ctf.cs_mm[0] == pytest.approx(0.01)
    parts.check_images()
    images = parts.read_images()
    assert images.shape == (5, 256, 256) and np.isfinite(images).all() and images.std() > 0


def test_relion31_six_optics_groups(shared_data):
    parts = load_particles(p(shared_data, "relion31", "relion31.6opticsgroups.star"))
    assert len(parts) == 139 and parts.box_size == 196
    assert set(np.unique(parts.optics_group)) <= set(range(1, 7))
    # Cs comes from each particle's optics group (group 4 has Cs 2.6)
    cs_by_group = {g: parts.ctf.cs_mm[parts.optics_group == g][0] for g in np.unique(parts.optics_group)}
    if 4 in cs_by_group:
        assert cs_by_group[4] == pytest.approx(2.6)
    np.testing.assert_allclose(parts.origin_A[0], [13.284554, -3.21701])


def test_relion5_and_aspire_and_empiar(shared_data):
    r5 = load_particles(p(shared_data, "relion31", "relion5.star"))
    assert len(r5) == 17 and r5.pixel_size_A == pytest.approx(0.89) and r5.box_size == 448
    aspire = load_particles(p(shared_data, "aspire_sample", "sample_particles_relion31.star"))
    assert len(aspire) == 17 and aspire.box_size == 200 and aspire.pixel_size_A == pytest.approx(1.4)
    assert set(aspire.ctf.voltage_kV) == {300.0, 200.0}  # two optics groups with different voltages
    assert aspire.read_images().shape == (17, 200, 200)
    old = load_particles(p(shared_data, "empiar_10076", "empiar_10076_7.star"))
    assert old.pixel_size_A == pytest.approx(5 * 1e4 / 38168)  # detector pixel / magnification
    assert not old.has_alignment and old.read_images().shape == (7, 320, 320)
    cs = load_particles(p(shared_data, "empiar_10076", "empiar_10076_7.cs"))
    np.testing.assert_allclose(cs.ctf.defocus_u_A, old.ctf.defocus_u_A, rtol=1e-6)
    np.testing.assert_allclose(cs.ctf.defocus_angle_deg, old.ctf.defocus_angle_deg, atol=1e-4)
    np.testing.assert_allclose(cs.read_images(), old.read_images())


def test_cryosparc_files(shared_data):
    j24 = load_particles(p(shared_data, "cryosparc", "cryosparc_P12_J24_001_particles.cs"))
    assert len(j24) == 2019 and j24.box_size == 180 and j24.pixel_size_A == pytest.approx(2.95)
    # pose → Euler as pyem's csparc2star gives it; shift in pixels × psize, same sign
    np.testing.assert_allclose(j24.euler_deg[0], [-157.808, 118.791, 34.683], atol=2e-3)
    np.testing.assert_allclose(j24.origin_A[0], np.array([11.334375, -1.828125]) * 2.95, rtol=1e-5)
    assert set(np.unique(j24.half_set)) == {1, 2}
    exported = load_particles(p(shared_data, "cryosparc", "cryosparc_J2_particles_exported.cs"))
    assert len(exported) == 22 and exported.box_size == 300 and not exported.has_alignment
    assert ">" not in exported.stack_paths[0]  # '>' = relative to the .cs folder
    assert exported.stack_paths[0].startswith(os.path.join(os.path.dirname(p(shared_data, "cryosparc", "x")), "J1"))


@pytest.fixture
def simulated(tmp_path):
    vol = blob_volume(24, seed=0)
    return simulate(vol, 2.0, 40, str(tmp_path / "sim"), snr=1.0, seed=3, progress=False)


def test_star_cs_star_roundtrip_keeps_everything(simulated, tmp_path):
    star = load_particles(simulated.source)
    save_particles(star, str(tmp_path / "out" / "p.cs"))
    cs = load_particles(str(tmp_path / "out" / "p.cs"))
    save_particles(cs, str(tmp_path / "again.star"))
    back = load_particles(str(tmp_path / "again.star"))
    for other in (cs, back):
        assert np.max(angular_distance_deg(euler_to_matrix(other.euler_deg), euler_to_matrix(star.euler_deg))) < 0.01
        # Euler angles themselves (not only the rotation) survive to 0.01°
        diff = (other.euler_deg - star.euler_deg + 180) % 360 - 180
        assert np.abs(diff).max() < 0.01
        assert np.abs(other.origin_A - star.origin_A).max() < 0.01
        assert np.abs(other.ctf.defocus_u_A - star.ctf.defocus_u_A).max() < 0.1
        assert np.abs(other.ctf.defocus_v_A - star.ctf.defocus_v_A).max() < 0.1
        assert np.abs(other.ctf.defocus_angle_deg - star.ctf.defocus_angle_deg).max() < 0.01
        np.testing.assert_array_equal(other.half_set, star.half_set)
        np.testing.assert_array_equal(other.read_images(), star.read_images())


def test_our_cs_loads_in_cryosparc_tools(simulated, tmp_path):
    dataset_mod = pytest.importorskip("cryosparc.dataset")
    path = str(tmp_path / "p.cs")
    save_particles(load_particles(simulated.source), path)
    ds = dataset_mod.Dataset.load(path)
    assert len(ds) == 40
    np.testing.assert_array_equal(ds["blob/idx"], np.arange(40))
    assert np.allclose(ds["alignments3D/shift"] * ds["alignments3D/psize_A"][:, None], simulated.origin_A, atol=1e-3)
    assert set(np.unique(ds["alignments3D/split"])) == {0, 1}


def test_star_written_for_relion_31(simulated):
    import starfile
    blocks = starfile.read(simulated.source, always_dict=True)
    assert set(blocks) == {"optics", "particles"}
    assert {"rlnImagePixelSize", "rlnImageSize", "rlnVoltage"} <= set(blocks["optics"].columns)
    # outside the working (project) directory, a stack beside the STAR file is named relative to it
    assert blocks["particles"]["rlnImageName"][0] == "000001@particles.mrcs"


def test_star_text_columns_written_as_starfile_would(simulated, tmp_path):
    """Passthrough text columns: a value with a space is quoted, an empty one is "", a missing one
    is <NA> (not "None"), and they read back as written; floats keep six decimals."""
    import starfile
    particles = load_particles(simulated.source)
    n = len(particles)
    table = particles.extra["particles_table"].copy()
    table["rlnGroupName"] = ["group 1", "", None] + ["g"] * (n - 3)
    table["rlnLogLikeliContribution"] = np.linspace(0, 1, n) / 3
    particles.extra["particles_table"] = table
    path = str(tmp_path / "p.star")
    save_particles(particles, path)
    lines = open(path).read().splitlines()
    particle_lines = lines[lines.index("data_particles"):]
    header = [line.split()[0] for line in particle_lines if line.startswith("_rln")]
    rows = [line.split("\t") for line in particle_lines if "@" in line]
    column = header.index("_rlnGroupName")
    assert [r[column] for r in rows[:4]] == ['"group 1"', '""', "<NA>", "g"]
    back = starfile.read(path, always_dict=True)["particles"]
    assert back["rlnGroupName"][0] == "group 1" and back["rlnGroupName"][3] == "g"
    assert np.abs(back["rlnLogLikeliContribution"] - np.linspace(0, 1, n) / 3).max() <= 5e-7


def test_image_paths_relative_to_the_project_directory(simulated, tmp_path, monkeypatch):
    """Written under the working directory: relative to it (RELION's rule, and cryoSPARC's for
    blob/path); read back from another working directory through the folders above the file;
    input names kept unchanged when they still point at the same images."""
    import starfile
    project = tmp_path / "project"
    (project / "Extract" / "job001").mkdir(parents=True)
    stack = project / "Extract" / "job001" / "particles.mrcs"
    os.link(os.path.join(os.path.dirname(simulated.source), "particles.mrcs"), stack)
    monkeypatch.chdir(project)
    particles = load_particles(simulated.source)
    particles.stack_paths = np.array([str(stack)] * len(particles), dtype=object)
    save_particles(particles, "Extract/job001/particles.star")
    save_particles(particles, "Extract/job001/particles.cs")
    names = starfile.read("Extract/job001/particles.star", always_dict=True)["particles"]["rlnImageName"]
    assert names[0] == "000001@Extract/job001/particles.mrcs"
    assert np.load("Extract/job001/particles.cs")["blob/path"][0] == b"Extract/job001/particles.mrcs"
    # a hand-written name style survives a rewrite from the project directory
    table = starfile.read("Extract/job001/particles.star", always_dict=True)
    table["particles"]["rlnImageName"] = [f"{i + 1}@Extract/job001/particles.mrcs" for i in range(len(particles))]
    starfile.write(table, "Extract/job001/handmade.star", overwrite=True)
    os.makedirs("Refine3D/job002")
    save_particles(load_particles("Extract/job001/handmade.star"), "Refine3D/job002/run_data.star")
    rewritten = starfile.read("Refine3D/job002/run_data.star", always_dict=True)["particles"]["rlnImageName"]
    assert rewritten[0] == "1@Extract/job001/particles.mrcs"
    monkeypatch.chdir(tmp_path)  # elsewhere: found through the project folder above the file
    for path in ("project/Refine3D/job002/run_data.star", "project/Extract/job001/particles.cs"):
        again = load_particles(path)
        assert again.stack_paths[0] == str(stack)
        np.testing.assert_array_equal(again.read_images(np.arange(3)), particles.read_images(np.arange(3)))


def test_bad_inputs_give_clear_errors(tmp_path, simulated):
    with pytest.raises(CryocvError, match="file not found"):
        load_particles(str(tmp_path / "missing.star"))
    bad = tmp_path / "nocols.star"
    bad.write_text("data_particles\n\nloop_\n_rlnDefocusU #1\n10000\n")
    with pytest.raises(CryocvError, match="rlnImageName"):
        load_particles(str(bad))
    nopx = tmp_path / "nopx.star"
    nopx.write_text("data_particles\n\nloop_\n_rlnImageName #1\n1@x.mrcs\n")
    with pytest.raises(CryocvError, match="pixel size"):
        load_particles(str(nopx))
    negpx = tmp_path / "negpx.star"
    negpx.write_text("data_particles\n\nloop_\n_rlnImageName #1\n_rlnImagePixelSize #2\n1@x.mrcs -1\n")
    with pytest.raises(CryocvError, match="bad pixel size"):
        load_particles(str(negpx))
    # a stack with the wrong box size, and NaN images
    parts = load_particles(simulated.source)
    write_stack(parts.stack_paths[0], np.zeros((40, 20, 20), np.float32), 2.0)
    with pytest.raises(CryocvError, match="20×20"):
        load_particles(simulated.source).check_images()
    nan = np.zeros((40, 24, 24), np.float32)
    nan[5, 3, 3] = np.nan
    write_stack(parts.stack_paths[0], nan, 2.0)
    with pytest.raises(CryocvError, match="NaN"):
        load_particles(simulated.source).read_images()
    os.remove(parts.stack_paths[0])
    with pytest.raises(CryocvError, match="not found"):
        load_particles(simulated.source).check_images()


def test_map_io_is_atomic_and_keeps_pixel_size(tmp_path):
    vol = blob_volume(24)
    path = str(tmp_path / "m.mrc")
    write_map(path, vol, 1.7)
    back, px = read_map(path)
    np.testing.assert_array_equal(back, vol)
    assert px == pytest.approx(1.7)
    assert [f for f in os.listdir(tmp_path) if f.startswith(".")] == []
    assert oct(os.stat(path).st_mode & 0o777) != oct(0o600)


def test_cs_keeps_unknown_half_sets_unknown_and_uids_stable(simulated, tmp_path):
    """STAR without rlnRandomSubset -> .cs -> STAR: half-sets stay unknown (not all half-set 1);
    uids made for particles without any are the same in two processes (no salted hash)."""
    import subprocess
    import sys
    import starfile
    blocks = starfile.read(simulated.source, always_dict=True)
    blocks["particles"] = blocks["particles"].drop(columns=["rlnRandomSubset"])
    blocks["particles"]["rlnImageName"] = blocks["particles"]["rlnImageName"].str.replace(
        "@particles", "@" + os.path.join(os.path.dirname(simulated.source), "particles"))
    star = str(tmp_path / "nohalf.star")
    starfile.write(blocks, star)
    uids = []
    for name in ("a.cs", "b.cs"):
        r = subprocess.run([sys.executable, "-m", "cryocv", "convert", star, str(tmp_path / name)],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        array = np.load(str(tmp_path / name))
        assert "alignments3D/split" not in array.dtype.names
        uids.append(array["uid"])
    np.testing.assert_array_equal(uids[0], uids[1])
    assert len(np.unique(uids[0])) == len(uids[0])
    back = load_particles(str(tmp_path / "a.cs"))
    assert np.all(back.half_set == 0)
    save_particles(back, str(tmp_path / "back.star"))
    assert "rlnRandomSubset" not in starfile.read(str(tmp_path / "back.star"), always_dict=True)["particles"]


def test_micrograph_names_and_coordinates_survive_conversions(simulated, tmp_path):
    """.cs (location/*) -> STAR -> .cs and STAR -> .cs -> STAR keep micrograph names and particle
    coordinates (pixels: fraction × micrograph size); STAR holds no micrograph size, so a .cs written
    from STAR has names but no fractional centres."""
    import starfile
    particles = load_particles(simulated.source)
    n = len(particles)
    rng = np.random.default_rng(0)
    particles.micrograph_names = np.array([f"J3/motioncorrected/mic_{i % 4:03d}.mrc" for i in range(n)], dtype=object)
    particles.micrograph_shape = np.tile([3838, 3710], (n, 1))
    particles.coordinates_px = rng.uniform(100, 3500, (n, 2)).round(1)
    save_particles(particles, str(tmp_path / "a.cs"))
    star = str(tmp_path / "b.star")
    save_particles(load_particles(str(tmp_path / "a.cs")), star)
    table = starfile.read(star, always_dict=True)["particles"]
    assert list(table["rlnMicrographName"]) == list(particles.micrograph_names)
    np.testing.assert_allclose(table[["rlnCoordinateX", "rlnCoordinateY"]].to_numpy(), particles.coordinates_px,
                               rtol=1e-5)
    save_particles(load_particles(star), str(tmp_path / "c.cs"))
    again = load_particles(str(tmp_path / "c.cs"))
    assert list(again.micrograph_names) == list(particles.micrograph_names)
    assert again.coordinates_px is None          # no micrograph size in STAR: no fractional centres
    save_particles(again, str(tmp_path / "d.star"))
    assert list(starfile.read(str(tmp_path / "d.star"), always_dict=True)["particles"]["rlnMicrographName"]) == \
        list(particles.micrograph_names)
    back = load_particles(star)                  # STAR -> STAR keeps coordinates
    save_particles(back, str(tmp_path / "e.star"))
    np.testing.assert_allclose(load_particles(str(tmp_path / "e.star")).coordinates_px, particles.coordinates_px,
                               rtol=1e-5)


def test_background_plotter_draws_the_same_figures_as_inline(tmp_path):
    """Figures drawn by the helper process are the ones drawn here (same PNG bytes), all of them
    are written by ``wait()``, a helper that died is replaced by drawing here, and a drawing
    error in the helper is raised, not lost."""
    from cryocv.plot_worker import BackgroundPlotter, InlinePlotter
    rng = np.random.default_rng(0)
    euler = np.column_stack([rng.uniform(-180, 180, 500), np.degrees(np.arccos(rng.uniform(-1, 1, 500))),
                             rng.uniform(-180, 180, 500)])
    history = [{"iteration": 1, "resolution_A": 6.0}, {"iteration": 2, "resolution_A": 5.0}]
    rotation_change, shift_change = rng.uniform(0, 5, 500), rng.uniform(0, 3, 500)
    for name, plotter in (("inline", InlinePlotter()), ("helper", BackgroundPlotter())):
        plotter.plot("plot_poses", euler, str(tmp_path / f"{name}_poses.png"), history, title="t")
        plotter.plot("plot_pose_change", rotation_change, shift_change, 20.0, 10.0,
                     str(tmp_path / f"{name}_change.png"), "t")
        plotter.wait()
    for kind in ("poses", "change"):
        assert (tmp_path / f"helper_{kind}.png").read_bytes() == (tmp_path / f"inline_{kind}.png").read_bytes()
    dead = BackgroundPlotter()
    dead._process.kill()
    dead._process.wait()
    dead.plot("plot_poses", euler, str(tmp_path / "dead.png"), history, title="t")
    dead.wait()
    assert (tmp_path / "dead.png").read_bytes() == (tmp_path / "inline_poses.png").read_bytes()
    failing = BackgroundPlotter()
    failing.plot("plot_poses", euler[:, :1], str(tmp_path / "bad.png"))      # one column: cannot be drawn
    with pytest.raises(RuntimeError, match="drawing a figure failed"):
        failing.wait()
    assert not (tmp_path / "bad.png").exists()


def test_a_failed_job_stops_its_plot_helper():
    """A job that raises stops the helper processes of its plotters at once (a long-lived Python
    process, pytest or an in-process Scipion run, keeps no idle helper)."""
    from cryocv.jobs.checkpoints import finishes_writes_on_error
    from cryocv.plot_worker import BackgroundPlotter
    plotters = []

    @finishes_writes_on_error
    def job():
        plotters.append(BackgroundPlotter())
        raise ValueError("stopped")
    with pytest.raises(ValueError, match="stopped"):
        job()
    assert plotters[0]._process.poll() is not None
