"""Bad input never passes silently and a damaged job never crashes (issue 11): each case is built
in a temporary folder; the job must exit with status 2, print one line that names the problem,
no traceback, and leave its output folder absent or untouched."""
import os
import subprocess
import sys

import numpy as np
import pytest
import starfile

from cryocv.errors import CryocvError
from cryocv.io.mrc import write_map, write_stack
from cryocv.io.particle_files import load_particles, save_particles
from cryocv.simulate import simulate
from .conftest import blob_volume

BOX, PIXEL, N = 24, 2.0, 60


def cryocv(*args):
    return subprocess.run([sys.executable, "-m", "cryocv", *args, "--quiet"] if args[0] in ("reconstruct", "refine")
                          else [sys.executable, "-m", "cryocv", *args], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    truth = blob_volume(BOX, seed=3)
    write_map(str(root / "truth.mrc"), truth, PIXEL)
    simulate(truth, PIXEL, N, str(root / "sim"), snr=1.0, seed=1, progress=False)
    return root


def variant(data, tmp_path, name, edit_images=None, edit_table=None):
    """A copy of the simulated particles with edited images and/or STAR table."""
    particles = load_particles(str(data / "sim" / "particles.star"))
    images = particles.read_images()
    if edit_images is not None:
        images = edit_images(images)
    stack = str(tmp_path / f"{name}.mrcs")
    write_stack(stack, images, PIXEL)
    particles.stack_paths = np.array([stack] * len(particles), dtype=object)
    star = str(tmp_path / f"{name}.star")
    save_particles(particles, star)
    if edit_table is not None:
        blocks = starfile.read(star, always_dict=True)
        edit_table(blocks)
        starfile.write(blocks, star, overwrite=True)
    return star


def zero_all(images):
    return np.zeros_like(images)


def blow_up(images):
    return images * np.float32(1e36)


def voltage_zero(blocks):
    blocks["optics"]["rlnVoltage"] = 0.0


def one_line_error(r, *words):
    assert r.returncode == 2, (r.returncode, r.stdout[-500:], r.stderr[-2000:])
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    for word in words:
        assert word in r.stderr, (word, r.stderr)


@pytest.mark.parametrize("job", ["reconstruct", "refine"])
@pytest.mark.parametrize("case,words", [
    ("blank", ["60 of 60 images are unusable", "blank"]),
    ("voltage0", ["rlnVoltage", "must be positive"]),
    ("overflow", ["unusable", "beyond"]),
])
def test_degenerate_inputs_stop_before_any_output(data, tmp_path, job, case, words):
    edits = {"blank": dict(edit_images=zero_all), "voltage0": dict(edit_table=voltage_zero),
             "overflow": dict(edit_images=blow_up)}[case]
    star = variant(data, tmp_path, case, **edits)
    out = str(tmp_path / "out")
    args = [job, "--particles", star, "--out", out, "--device", "cpu"]
    if job == "refine":
        args += ["--ref", str(data / "truth.mrc"), "--max-iterations", "1"]
    one_line_error(cryocv(*args), *words)
    assert not os.path.exists(out)


def test_a_few_bad_images_are_left_out_with_a_count_or_stop_a_strict_job(data, tmp_path):
    def spoil(images):
        images[[3, 10]] = 0
        images[20, 0, 0] = np.nan
        return images
    star = variant(data, tmp_path, "spoilt", edit_images=spoil)
    out = str(tmp_path / "out")
    r = cryocv("reconstruct", "--particles", star, "--out", out, "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert "left out 3 of 60 particles" in r.stdout + r.stderr
    assert len(load_particles(os.path.join(out, "particles.star"))) == 57
    r = cryocv("reconstruct", "--particles", star, "--out", str(tmp_path / "strict"), "--device", "cpu", "--strict")
    one_line_error(r, "3 of 60 images are unusable", "--strict")
    assert not os.path.exists(str(tmp_path / "strict"))


def test_nan_pose_in_a_cs_file_does_not_convert(data, tmp_path):
    cs = str(tmp_path / "p.cs")
    save_particles(load_particles(str(data / "sim" / "particles.star")), cs)
    array = np.load(cs)
    array["alignments3D/pose"][5] = np.nan
    with open(cs, "wb") as handle:
        np.save(handle, array)
    r = cryocv("convert", cs, str(tmp_path / "p.star"))
    one_line_error(r, "particle 6", "non-finite")
    assert not os.path.exists(str(tmp_path / "p.star"))


@pytest.mark.parametrize("what", ["text.mrcs", "truncated.mrcs", "corrupt_header.mrcs", "text.cs", "text_ref.mrc", "truncated_ref.mrc",
                                  "out_is_a_file", "other_box_ref"])
def test_damaged_files_are_named_with_what_is_wrong(data, tmp_path, what):
    star, ref, out = str(data / "sim" / "particles.star"), str(data / "truth.mrc"), str(tmp_path / "out")
    if what == "text.mrcs":
        star = variant(data, tmp_path, "text")
        open(str(tmp_path / "text.mrcs"), "w").write("not an image stack\n" * 10)
        expected = ["text.mrcs"]
    elif what == "truncated.mrcs":
        star = variant(data, tmp_path, "cut")
        size = os.path.getsize(str(tmp_path / "cut.mrcs"))
        with open(str(tmp_path / "cut.mrcs"), "r+b") as handle:
            handle.truncate(size - 1000)
        expected = ["truncated", f"the file has {size - 1000} bytes"]
    elif what == "corrupt_header.mrcs":
        star = variant(data, tmp_path, "corrupt")
        with open(str(tmp_path / "corrupt.mrcs"), "r+b") as handle:
            handle.seek(12)
            handle.write(np.array([77], np.int32).tobytes())      # MODE 77 does not exist
        expected = ["corrupt.mrcs", "not an MRC image file"]
    elif what == "text.cs":
        star = str(tmp_path / "text.cs")
        open(star, "w").write("uid,blob/path\n1,x\n")
        expected = ["not a cryoSPARC .cs file"]
    elif what in ("text_ref.mrc", "truncated_ref.mrc"):
        ref = str(tmp_path / what)
        if what == "text_ref.mrc":
            open(ref, "w").write("hello" * 400)
            expected = [what]
        else:
            write_map(ref, blob_volume(BOX, seed=3), PIXEL)
            with open(ref, "r+b") as handle:
                handle.truncate(os.path.getsize(ref) - 4000)
            expected = ["truncated"]
    elif what == "out_is_a_file":
        open(out, "w").write("x")
        expected = ["is a file, not a folder"]
    else:
        ref = str(tmp_path / "small.mrc")
        write_map(ref, blob_volume(16, seed=3), PIXEL)
        expected = ["16 px", f"{BOX} px"]
    before = sorted(os.listdir(str(tmp_path)))
    r = cryocv("refine", "--particles", star, "--ref", ref, "--out", out, "--device", "cpu", "--max-iterations", "1")
    one_line_error(r, *expected)
    assert sorted(os.listdir(str(tmp_path))) == before   # nothing created, --out untouched


def test_continue_skips_a_damaged_checkpoint(data, tmp_path, monkeypatch):
    """A refinement killed after its second checkpoint whose newest checkpoint was then damaged
    (state.json cut short, checkpoint.json emptied) continues from the intact one before it."""
    from cryocv.jobs import checkpoints
    from cryocv.jobs.refine import RefineParams, run
    out = str(tmp_path / "job")
    original = checkpoints.CheckpointStore.save

    def save_then_die(self, state, *args, **kwargs):
        original(self, state, *args, **kwargs)
        if state.iteration == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(checkpoints.CheckpointStore, "save", save_then_die)
    params = RefineParams(regularizer="uniform", initial_lowpass_A=12.0, max_iterations=2)
    with pytest.raises(KeyboardInterrupt):
        run(str(data / "sim" / "particles.star"), str(data / "truth.mrc"), out, params, device="cpu", progress=False)
    monkeypatch.setattr(checkpoints.CheckpointStore, "save", original)
    with open(os.path.join(out, "iterations", "iter_002", "state.json"), "r+") as handle:
        handle.truncate(20)
    open(os.path.join(out, "checkpoint.json"), "w").close()
    report = run(None, None, out, resume=True, progress=False)
    assert [h["iteration"] for h in report["iterations"]] == [1, 2, 3] and report["iterations"][-1]["final"]
    log = open(os.path.join(out, "run.log")).read()
    assert "skipped the damaged or unfinished checkpoint iterations/iter_002" in log
    assert "continuing from the checkpoint of iteration 1" in log
    with pytest.raises(CryocvError, match="--overwrite"):   # the finished job is kept unless asked
        run(str(data / "sim" / "particles.star"), str(data / "truth.mrc"), out, params, device="cpu", progress=False)


def test_job_hygiene_pruned_checkpoints_no_stale_temp_files_and_provenance(data, tmp_path, monkeypatch):
    """Only the newest iteration checkpoints stay (and a continue still works from them); the
    temporary files of a job killed during its final writes are gone after --continue; job.json
    says what produced the map."""
    import json
    import glob
    from cryocv.jobs import jobdir
    from cryocv.jobs.refine import RefineParams, run
    out = str(tmp_path / "job")
    original = jobdir.write_results

    def die_while_writing(job_dir, *args, **kwargs):
        open(os.path.join(job_dir, ".map.abc123.tmp.mrc"), "w").write("half")   # an interrupted atomic write
        raise KeyboardInterrupt

    monkeypatch.setattr(jobdir, "write_results", die_while_writing)
    params = RefineParams(regularizer="uniform", initial_lowpass_A=12.0, max_iterations=3)
    with pytest.raises(KeyboardInterrupt):
        run(str(data / "sim" / "particles.star"), str(data / "truth.mrc"), out, params, device="cpu", progress=False)
    monkeypatch.setattr(jobdir, "write_results", original)
    folders = sorted(os.listdir(os.path.join(out, "iterations")))
    assert len(folders) == 2 and folders[-1] == "iter_004", folders          # 4 passes, the newest 2 kept
    report = run(None, None, out, resume=True, progress=False)
    assert not glob.glob(os.path.join(out, "**", ".*.tmp*"), recursive=True)
    assert os.path.isfile(os.path.join(out, "map.mrc"))
    record = json.load(open(os.path.join(out, "job.json")))
    assert record["result"]["resolution_A"] == pytest.approx(report["resolution_A"])
    assert record["started"] <= record["finished"] and record["wall_time_s"] >= 0
    assert record["device"] == "cpu" and record["device_name"].startswith("CPU")
    assert record["cryocv_version"] and "git_commit" in record
    assert record["parameters"]["keep_checkpoints"] == 2 and record["parameters"]["resumed"] is True


def test_resolutions_at_nyquist_are_one_line_errors_before_any_output(data, tmp_path):
    """--join-halves-A at or beyond Nyquist would make the two half-references one map, and
    --staged-start-res-A there would cap nothing: one-line errors, and no job folder."""
    r = cryocv("refine", "--particles", str(data / "sim" / "particles.star"), "--ref", str(data / "truth.mrc"),
               "--out", str(tmp_path / "out"), "--device", "cpu", "--max-iterations", "1",
               "--join-halves-A", str(1.5 * PIXEL))
    one_line_error(r, "--join-halves-A", "Nyquist")
    assert not (tmp_path / "out").exists()                  # checked before anything is written
    r = cryocv("refine", "--particles", str(data / "sim" / "particles.star"), "--ref", str(data / "truth.mrc"),
               "--out", str(tmp_path / "out"), "--device", "cpu", "--staged-start-res-A", str(1.5 * PIXEL))
    one_line_error(r, "--staged-start-res-A", "Nyquist")
    assert not (tmp_path / "out").exists()
