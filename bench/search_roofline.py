"""The pose search's work, counted level by level, against the machine's peaks (issue 17).

One batch of simulated particles goes through the search as the jobs run it: the global
branch-and-bound (:func:`cryocv.search.search_poses`: base grid, then subdivision levels) and the
local one of ``local-refine`` (a start grid inside the extents, then subdivision; the first pass
and a later, narrowed one). The search's functions are wrapped to synchronize the device and
record each stage's time, and per level the script counts, per particle:

- rotations × shifts scored and the Fourier coefficients M of each score (the level's cutoff);
- reference samples (one interpolated coefficient of one rotation's slice);
- arithmetic: 4 flops per coefficient per (rotation, shift) score (Re(a·conj p), accumulated),
  5 per coefficient per rotation (the norm Σ w·C²·|P|²), 6 per coefficient per shift (the phase
  ramp); the interpolation is not counted (texture units, or 8 loads in software);
- bytes from device memory, a lower bound: each image's terms (complex64 data and float32 C²)
  once, the reference's padded FT once, the scores once (the base level's GEMM operands too).

Both samplings run ("memory": the software twin of the CPU, the default before texture sampling;
"texture"), so the table shows before and after. Peaks are measured on the machine (a large
float32 GEMM, a device-to-device copy) next to the H200's datasheet figures.

    python bench/search_roofline.py --map trpv1_128.mrc --resolution-A 3 --out bench/results/search_roofline_128
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cryocv import backend, local_search, search  # noqa: E402
from cryocv.backend import resolve_xp  # noqa: E402
from cryocv.fourier import lowpass_map  # noqa: E402
from cryocv.io.mrc import read_map  # noqa: E402
from cryocv.io.particle_files import load_particles  # noqa: E402
from cryocv.jobs import local_refine  # noqa: E402
from cryocv.jobs.loop import alignment_cutoff_px  # noqa: E402
from cryocv.noise import noise_spectrum_from_images  # noqa: E402
from cryocv.projector import DEFAULT_PADDING, frequency_points, prepare_volume  # noqa: E402
from cryocv.simulate import simulate  # noqa: E402
from cryocv.source import ParticleSource  # noqa: E402

DATASHEET = {"fp32_TFLOPs": 67.0, "tf32_tensor_dense_TFLOPs": 495.0, "bf16_tensor_dense_TFLOPs": 989.0,
             "hbm_TBps": 4.8}
xp = np                      # the array module of the run (--device)


def synchronize():
    if xp is not np:
        xp.cuda.Device().synchronize()


WRAPPED = ("global_start", "local_start", "subdivide", "image_terms", "subdivision_scores", "score_poses")


class Recorder:
    """Wraps the search's stage functions in every module that holds them: each call synchronizes
    the device before and after and is recorded as (name, start s, end s, info)."""

    def __init__(self, box_size: int):
        self.box_size, self.events, self.originals = box_size, [], []
        for module in (search, local_search, local_refine):
            for name in WRAPPED:
                if hasattr(module, name):
                    original = getattr(module, name)
                    self.originals.append((module, name, original))
                    setattr(module, name, self._wrap(name, original))

    def _wrap(self, name, original):
        def wrapped(*args, **kwargs):
            synchronize()
            started = time.perf_counter()
            result = original(*args, **kwargs)
            synchronize()
            self.events.append((name, started, time.perf_counter(), self._info(name, args, kwargs)))
            return result
        return wrapped

    def _info(self, name, args, kwargs) -> dict:
        if name == "global_start":
            base = args[0]
            return {"R": int(base.rotations.shape[0]), "T": int(base.shifts.shape[0]), "M": int(base.points.kx.size),
                    "B": int(args[1].shape[0])}
        if name == "subdivision_scores":
            rotations, points = args[3], args[2]
            return {"B": int(rotations.shape[0]), "K": int(rotations.shape[1]), "M": int(points.kx.size)}
        if name == "score_poses":
            rotations, shifts, cutoff = args[4], args[5], args[6]
            return {"B": int(rotations.shape[0]), "R": int(rotations.shape[1]), "T": int(shifts.shape[1]),
                    "M": int(frequency_points(self.box_size, cutoff).kx.size)}
        return {}

    def restore(self):
        for module, name, original in self.originals:
            setattr(module, name, original)


def level_rows(events: list, box_size: int, padding: int) -> list[dict]:
    """Per stage: counts per particle, time, and the derived rates (see the module docstring)."""
    reference_bytes = (padding * box_size) ** 2 * (padding * box_size // 2 + 1) * 8
    rows = []
    sub = [e for e in events if e[0] == "subdivide"]
    for name, t0, t1, info in events:
        if name == "global_start":
            b, r, t, m = info["B"], info["R"], info["T"], info["M"]
            flops = 4 * m * t * r + 5 * m * r + 6 * m * t
            dram = b * m * 12 + r * m * 8 * 2 + b * t * m * 8 * 2 + b * t * r * 4
            rows.append(dict(stage="base grid (global)", rotations=r, shifts=t, M=m, seconds=t1 - t0, B=b,
                             scores=r * t, samples=0, flops=b * flops, bytes=dram, kernel_seconds=None))
        if name == "score_poses":
            b, r, t, m = info["B"], info["R"], info["T"], info["M"]
            flops = 4 * m * t * r + 5 * m * r + 6 * m * t
            starts = [e for e in events if e[0] == "local_start" and e[1] <= t0 and e[2] >= t1]
            seconds = starts[0][2] - starts[0][1] if starts else t1 - t0
            rows.append(dict(stage="local start grid", rotations=r, shifts=t, M=m, seconds=seconds, B=b,
                             scores=r * t, samples=r * m, flops=b * flops,
                             bytes=b * m * 12 + reference_bytes + b * r * t * 4, kernel_seconds=t1 - t0))
    for _, s0, s1, _ in sub:
        marks = [e for e in events if e[0] == "image_terms" and s0 <= e[1] <= s1]
        scores = [e for e in events if e[0] == "subdivision_scores" and s0 <= e[1] <= s1]
        for i, (mark, score) in enumerate(zip(marks, scores)):
            end = marks[i + 1][1] if i + 1 < len(marks) else s1
            b, k, m = score[3]["B"], score[3]["K"], score[3]["M"]
            flops = 4 * m * 32 * k + 5 * m * 8 * k + 6 * m * 4 * k
            rows.append(dict(stage=f"subdivision level {i + 1}", rotations=8 * k, shifts=4, M=m, seconds=end - mark[1], B=b,
                             scores=32 * k, samples=8 * k * m, flops=b * flops,
                             bytes=b * m * 12 + reference_bytes + b * 32 * k * 4, kernel_seconds=score[2] - score[1]))
    return rows


def measured_peaks() -> dict:
    """float32 GEMM (TF32 off) and device-to-device copy on this GPU."""
    size = 8192 if xp is not np else 1024
    a = xp.asarray(np.random.default_rng(0).standard_normal((size, size), dtype=np.float32))
    xp.matmul(a, a)
    synchronize()
    t0 = time.perf_counter()
    for _ in range(5):
        xp.matmul(a, a)
    synchronize()
    gemm = 5 * 2 * size ** 3 / (time.perf_counter() - t0) / 1e12
    x = xp.ones(1 << (29 if xp is not np else 24), dtype=xp.float32)             # 2 GiB on a GPU
    y = xp.empty_like(x)
    y[...] = x
    synchronize()
    t0 = time.perf_counter()
    for _ in range(5):
        y[...] = x
    synchronize()
    copy = 5 * 2 * x.nbytes / (time.perf_counter() - t0) / 1e12
    return {"fp32_gemm_TFLOPs": round(gemm, 1), "copy_TBps": round(copy, 2)}


def searcher(kind: str, volume, lowpassed, noise, cutoff, levels, params, base, make_local, particles):
    """A call that runs one E-step of ``kind`` on a batch (references prepared once, outside it)."""
    if kind == "global":
        return lambda batch: search.search_poses(volume, batch.images_ft, batch.ctf, noise, levels, params, base)
    state = SimpleNamespace(iteration=0 if kind == "local, first pass" else 1, euler_deg=particles.euler_deg,
                            origin_A=particles.origin_A)
    return make_local(SimpleNamespace(maps={1: lowpassed, 2: lowpassed}), noise, cutoff, state).find_poses


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--map", required=True, help="the true map (the reference is it low-passed)")
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--resolution-A", type=float, default=3.0, help="alignment limit (and reference low-pass)")
    parser.add_argument("--snr", type=float, default=0.05)
    parser.add_argument("--device", default="gpu", help="gpu, or cpu for a dry run")
    parser.add_argument("--out", required=True, help="path prefix: writes OUT.json and OUT.md")
    args = parser.parse_args(argv)
    global xp
    xp = resolve_xp(args.device)
    if xp is np:
        kernels = SimpleNamespace()                     # a dry run: one sampling, twice
    else:
        from cryocv import kernels                      # noqa: PLC0415 - CuPy only
    volume_map, px = read_map(args.map)
    n = volume_map.shape[0]
    folder = tempfile.mkdtemp(prefix="roofline_")
    simulate(volume_map, px, args.batch, folder, snr=args.snr, seed=1, xp=xp, progress=False)
    particles = load_particles(os.path.join(folder, "particles.star"))
    source = ParticleSource(particles, xp)
    batch = source.load(np.arange(len(particles)), 1)
    lowpassed = xp.asarray(lowpass_map(volume_map, px, args.resolution_A))
    volume = prepare_volume(lowpassed)
    noise = noise_spectrum_from_images(batch.images_ft)
    params = search.SearchParams()
    cutoff = alignment_cutoff_px(n, px, args.resolution_A, 3)
    levels = search.search_schedule(n, cutoff, params)
    base = search.BaseGrid(volume, n, levels[0], params)
    make_local = local_refine.local_search(local_refine.LocalRefineParams(), n, px, xp, np.zeros(3))
    peaks = measured_peaks()
    results = {"box": n, "pixel_size_A": px, "batch": args.batch, "resolution_A": args.resolution_A,
               "cutoff_px": cutoff, "products": backend.SCORE_PRODUCTS, "measured_peaks": peaks, "datasheet": DATASHEET, "runs": {}}
    for sampling in ("memory", "texture"):
        kernels.SAMPLING = sampling
        for kind in ("global", "local, first pass", "local, later pass"):
            find_poses = searcher(kind, volume, lowpassed, noise, cutoff, levels, params, base, make_local, particles)
            find_poses(batch)                                  # compiles the kernels, prepares the references
            synchronize()
            started = time.perf_counter()
            find_poses(batch)
            synchronize()
            unsynchronized = time.perf_counter() - started
            recorder = Recorder(n)
            started = time.perf_counter()
            try:
                find_poses(batch)
            finally:
                recorder.restore()
            results["runs"][f"{kind}, {sampling}"] = {"seconds": unsynchronized,
                                                      "seconds_synchronized_stages": time.perf_counter() - started,
                                                      "rows": level_rows(recorder.events, n, DEFAULT_PADDING)}
    with open(args.out + ".json", "w") as handle:
        json.dump(results, handle, indent=1, default=float)
    with open(args.out + ".md", "w") as handle:
        handle.write(markdown(results))
    print(markdown(results))


def markdown(results: dict) -> str:
    peaks, sheet = results["measured_peaks"], results["datasheet"]
    lines = [f"### Box {results['box']}, {results['pixel_size_A']:.2f} Å/px, alignment to {results['resolution_A']} Å "
             f"(cutoff {results['cutoff_px']:.1f} px), one batch of {results['batch']} particles, "
             f"{results.get('products', 'fp32')} matrix products",
             "",
             f"Measured peaks: float32 GEMM {peaks['fp32_gemm_TFLOPs']} TFLOP/s, device copy {peaks['copy_TBps']} TB/s "
             f"(datasheet: FP32 {sheet['fp32_TFLOPs']}, TF32 tensor {sheet['tf32_tensor_dense_TFLOPs']}, BF16 tensor "
             f"{sheet['bf16_tensor_dense_TFLOPs']} TFLOP/s dense; HBM3e {sheet['hbm_TBps']} TB/s).", ""]
    for name, run in results["runs"].items():
        rows = run["rows"]
        lines += [f"**{name}**: {run['seconds'] * 1e3:.0f} ms per batch ({results['batch'] / run['seconds']:,.0f} "
                  f"particles/s in the search alone; {run['seconds_synchronized_stages'] * 1e3:.0f} ms with the device "
                  f"synchronized around each stage, as timed below)", "",
                  "| stage | rotations × shifts per particle | coefficients M | samples per particle | ms | scoring kernel ms "
                  "| TFLOP/s (% FP32 GEMM peak) | G samples/s | GB/s from memory (% copy peak) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            tflops = r["flops"] / r["seconds"] / 1e12
            gbps = r["bytes"] / r["seconds"] / 1e9
            kernel = "" if r["kernel_seconds"] is None else f"{r['kernel_seconds'] * 1e3:.1f}"
            samples = r["B"] * r["samples"] / r["seconds"] / 1e9 if r["samples"] else 0
            lines.append(f"| {r['stage']} | {r['rotations']} × {r['shifts']} | {r['M']} | {r['samples']:,} | "
                         f"{r['seconds'] * 1e3:.1f} | {kernel} | {tflops:.2f} ({100 * tflops / peaks['fp32_gemm_TFLOPs']:.0f} %) | "
                         f"{samples:.1f} | {gbps:.0f} ({100 * gbps / (peaks['copy_TBps'] * 1e3):.1f} %) |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
