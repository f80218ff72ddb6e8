"""Hostile-user fuzzing of the CLI: many malformed inputs to reconstruct, refine, convert and fsc
(built in a temporary folder from a small simulated dataset), each judged by what a user sees:
exit status, a traceback, a message of more than one line, and outputs left in --out.

    python bench/fuzz_cli.py --out bench/results/fuzz_cli.md

A case passes when the command exits with 2 and one line without a traceback and leaves --out
absent (or as it was), or, for the cases marked "ok", finishes with status 0.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

import numpy as np
import starfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from cryocv.io.mrc import write_map, write_stack  # noqa: E402
from cryocv.io.particle_files import load_particles, save_particles  # noqa: E402
from cryocv.simulate import simulate  # noqa: E402

BOX, PIXEL, N = 24, 2.0, 40


def blob(n: int, seed: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    grid = np.indices((n,) * 3).astype(np.float32) - n // 2
    volume = np.zeros((n,) * 3, np.float32)
    for centre in rng.uniform(-n / 5, n / 5, size=(6, 3)):
        volume += np.exp(-((grid - centre[:, None, None, None]) ** 2).sum(0) / (2 * (n / 12) ** 2))
    return volume


def build(root: str) -> dict:
    """Inputs, good and malformed; returns {name: path}."""
    files = {"map": os.path.join(root, "truth.mrc")}
    write_map(files["map"], blob(BOX), PIXEL)
    good = simulate(blob(BOX), PIXEL, N, os.path.join(root, "sim"), snr=1.0, seed=1, progress=False)
    files["star"] = good.source
    images = load_particles(good.source).read_images()

    def star_variant(name, edit_images=None, edit_table=None, text=None):
        path = os.path.join(root, f"{name}.star")
        if text is not None:
            open(path, "w").write(text)
            files[name] = path
            return
        particles = load_particles(good.source)
        stack = os.path.join(root, f"{name}.mrcs")
        write_stack(stack, images if edit_images is None else edit_images(images.copy()), PIXEL)
        particles.stack_paths = np.array([stack] * N, dtype=object)
        save_particles(particles, path)
        if edit_table is not None:
            blocks = starfile.read(path, always_dict=True)
            edit_table(blocks)
            starfile.write(blocks, path, overwrite=True)
        files[name] = path

    def column(name, value, row=None, table="particles"):
        def edit(blocks):
            values = blocks[table][name].to_numpy().astype(object if isinstance(value, str) else float)
            if row is None:
                values[:] = value
            else:
                values[row] = value
            blocks[table][name] = values
        return edit

    star_variant("blank", edit_images=lambda x: x * 0)
    star_variant("overflow", edit_images=lambda x: x * np.float32(1e36))
    star_variant("one_nan_image", edit_images=lambda x: (x.__setitem__((5, 0, 0), np.nan), x)[1])
    star_variant("voltage0", edit_table=column("rlnVoltage", 0.0, table="optics"))
    star_variant("cs_negative", edit_table=column("rlnSphericalAberration", -2.7, table="optics"))
    star_variant("q0_one", edit_table=column("rlnAmplitudeContrast", 1.0, table="optics"))
    star_variant("pixel0", edit_table=column("rlnImagePixelSize", 0.0, table="optics"))
    star_variant("nan_defocus", edit_table=column("rlnDefocusU", np.nan, row=3))
    star_variant("nan_angle", edit_table=column("rlnAngleRot", np.nan, row=7))
    star_variant("inf_origin", edit_table=column("rlnOriginXAngst", np.inf, row=2))
    star_variant("subset_3", edit_table=column("rlnRandomSubset", 3, row=0))
    star_variant("one_half", edit_table=column("rlnRandomSubset", 1))
    star_variant("bad_name", edit_table=column("rlnImageName", "x@nowhere.mrcs"))
    star_variant("missing_stack", edit_table=column("rlnImageName", "000001@missing.mrcs"))
    star_variant("index_past_end", edit_table=column("rlnImageName", f"000999@{root}/sim/particles.mrcs", row=0))
    star_variant("empty_file", text="")
    star_variant("no_particles", text="data_particles\n\nloop_\n_rlnImageName #1\n")
    star_variant("not_star", text="hello world\n" * 5)
    star_variant("no_image_name", text="data_particles\n\nloop_\n_rlnAngleRot #1\n1.0\n")
    for name, content in (("text.mrcs", "not an image stack\n" * 20), ("text_ref.mrc", "hello" * 400),
                          ("text.cs", "uid,blob/path\n1,x\n")):
        files[name] = os.path.join(root, name)
        open(files[name], "w").write(content)
    star_variant("text_stack", edit_table=column("rlnImageName", f"000001@{files['text.mrcs']}"))
    star_variant("cut_stack")
    with open(os.path.join(root, "cut_stack.mrcs"), "r+b") as handle:
        handle.truncate(os.path.getsize(os.path.join(root, "cut_stack.mrcs")) - 1000)
    files["cut_ref"] = os.path.join(root, "cut_ref.mrc")
    write_map(files["cut_ref"], blob(BOX), PIXEL)
    with open(files["cut_ref"], "r+b") as handle:
        handle.truncate(os.path.getsize(files["cut_ref"]) - 4000)
    for name, volume, pixel in (("small_ref", blob(16), PIXEL), ("other_pixel_ref", blob(BOX), 3.0),
                                ("zero_ref", np.zeros((BOX,) * 3, np.float32), PIXEL),
                                ("nan_ref", np.full((BOX,) * 3, np.nan, np.float32), PIXEL),
                                ("flat_ref", np.zeros((BOX, BOX, BOX - 2), np.float32), PIXEL)):
        files[name] = os.path.join(root, f"{name}.mrc")
        write_map(files[name], volume, pixel)
    cs = os.path.join(root, "nan_pose.cs")
    save_particles(load_particles(good.source), cs)
    array = np.load(cs)
    array["alignments3D/pose"][4] = np.nan
    with open(cs, "wb") as handle:
        np.save(handle, array)
    files["nan_pose.cs"] = cs
    files["a_file"] = os.path.join(root, "a_file")
    open(files["a_file"], "w").write("x")
    return files


def cases(f: dict, root: str) -> list:
    """(name, argv, expectation) with expectation "error" or "ok"; {out} is a fresh folder."""
    rec = lambda star, *extra: ["reconstruct", "--particles", star, "--out", "{out}", "--device", "cpu", "--quiet",  # noqa: E731
                                *extra]
    ref = lambda star, reference, *extra: ["refine", "--particles", star, "--ref", reference, "--out", "{out}",  # noqa: E731
                                           "--device", "cpu", "--max-iterations", "1", "--quiet", *extra]
    out = []
    for name in ("blank", "overflow", "voltage0", "cs_negative", "q0_one", "pixel0", "nan_defocus", "nan_angle",
                 "inf_origin", "subset_3", "one_half", "bad_name", "missing_stack", "index_past_end", "empty_file",
                 "no_particles", "not_star", "no_image_name", "text_stack", "cut_stack"):
        out.append((f"reconstruct {name}", rec(f[name]), "error"))
        if name not in ("one_half",):
            out.append((f"refine {name}", ref(f[name], f["map"]), "error"))
    out += [("reconstruct one NaN image among 40", rec(f["one_nan_image"]), "ok"),
            ("reconstruct one NaN image, --strict", rec(f["one_nan_image"], "--strict"), "error"),
            ("reconstruct text .cs", rec(f["text.cs"]), "error"),
            ("reconstruct --out is a file", ["reconstruct", "--particles", f["star"], "--out", f["a_file"]], "error"),
            ("reconstruct bad --sym", rec(f["star"], "--sym", "Q7"), "error"),
            ("reconstruct --batch-size 0", rec(f["star"], "--batch-size", "0"), "error"),
            ("reconstruct mask of another size", rec(f["star"], "--mask", f["small_ref"]), "error"),
            ("reconstruct text mask", rec(f["star"], "--mask", f["text_ref.mrc"]), "error")]
    for name in ("small_ref", "other_pixel_ref", "zero_ref", "nan_ref", "flat_ref", "cut_ref", "text_ref.mrc"):
        out.append((f"refine reference {name}", ref(f["star"], f[name]), "error"))
    for flag, value in (("--max-iterations", "0"), ("--initial-lowpass-A", "-5"), ("--fine-step-deg", "30"),
                        ("--candidates", "0"), ("--nu-cutoffs", "1"), ("--max-shift-A", "-1"),
                        ("--batch-size", "0"), ("--sym", "X7"), ("--regularizer", "magic")):
        out.append((f"refine {flag} {value}", ref(f["star"], f["map"], flag, value), "error"))
    out += [("refine without --ref", ["refine", "--particles", f["star"], "--out", "{out}"], "error"),
            ("refine --continue of nothing", ["refine", "--continue", os.path.join(root, "nothing")], "error"),
            ("convert NaN pose .cs", ["convert", f["nan_pose.cs"], "{out}/p.star"], "error"),
            ("convert text .cs", ["convert", f["text.cs"], "{out}/p.star"], "error"),
            ("convert to .txt", ["convert", f["star"], "{out}/p.txt"], "error"),
            ("convert missing input", ["convert", os.path.join(root, "none.star"), "{out}/p.cs"], "error"),
            ("fsc maps of different size", ["fsc", f["map"], f["small_ref"]], "error"),
            ("fsc text map", ["fsc", f["map"], f["text_ref.mrc"]], "error"),
            ("fsc truncated map", ["fsc", f["map"], f["cut_ref"]], "error"),
            ("fsc non-cubic map", ["fsc", f["flat_ref"], f["flat_ref"]], "error"),
            ("fsc --pixel-size-A -1", ["fsc", f["map"], f["map"], "--pixel-size-A", "-1"], "error"),
            ("fsc NaN map", ["fsc", f["map"], f["nan_ref"]], "error")]
    return out


def judge(name, argv, expectation, root, index):
    out = os.path.join(root, f"out_{index:03d}")
    argv = [a.replace("{out}", out) for a in argv]
    r = subprocess.run([sys.executable, "-m", "cryocv", *argv], capture_output=True, text=True, timeout=600)
    lines = [line for line in r.stderr.strip().splitlines() if line.strip()]
    traceback = "Traceback" in r.stderr
    left = os.path.isdir(out) and bool(os.listdir(out))
    if expectation == "ok":
        good = r.returncode == 0 and not traceback
    else:
        good = r.returncode == 2 and len(lines) == 1 and not traceback and not left
    return {"case": name, "status": r.returncode, "traceback": traceback, "lines": len(lines),
            "outputs_left": left, "message": lines[-1][:160] if lines else "", "pass": good}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="markdown table (default: print only)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as root:
        files = build(root)
        results = [judge(name, cmd, expect, root, i) for i, (name, cmd, expect) in enumerate(cases(files, root))]
    lines = ["| case | status | traceback | stderr lines | outputs left | message | pass |", "|---" * 7 + "|"]
    for r in results:
        lines.append(f"| {r['case']} | {r['status']} | {'yes' if r['traceback'] else ''} | {r['lines']} | "
                     f"{'yes' if r['outputs_left'] else ''} | {r['message'].replace('|', '/')} | "
                     f"{'yes' if r['pass'] else '**no**'} |")
    summary = (f"{len(results)} cases: {sum(r['pass'] for r in results)} pass; "
               f"{sum(r['traceback'] for r in results)} tracebacks, "
               f"{sum(r['status'] == 0 for r in results if not r['pass'])} wrongly finished, "
               f"{sum(r['lines'] > 1 and not r['traceback'] for r in results)} multi-line messages, "
               f"{sum(r['outputs_left'] for r in results if not r['pass'])} with outputs left")
    text = "\n".join(lines) + "\n\n" + summary + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write("# CLI fuzzing (`bench/fuzz_cli.py`)\n\n" + text)


if __name__ == "__main__":
    main()
