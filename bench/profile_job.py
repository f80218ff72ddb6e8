"""GPU kernel profile of one call of a job function inside a benchmark script: every CUDA kernel
the call launches (CuPy's included), grouped by name, with its count and device time, through
PyTorch's profiler (CUPTI), next to the call's wall time. The device time against the wall time
says whether the job waits on the GPU or on the host (Python, launches, reading).

    python bench/profile_job.py --function cryocv.jobs.local_refine:run --call 1 --out prof_local \\
        -- bench/bench_local_gpu.py --map trpv1_128.mrc --n 50000 --out /tmp/bl --results /tmp/bl.json

Writes OUT.md (the table) and OUT.json. ``--cprofile-call N`` also runs call N under cProfile
(host time per Python function, OUT_cprofile.txt).
"""
from __future__ import annotations

import argparse
import cProfile
import importlib
import io
import json
import os
import pstats
import runpy
import sys
import time


def kernel_table(profiler, wall_s: float, title: str) -> tuple[str, dict]:
    """Markdown table of the profiled kernels (device time, count, share) and a summary dict."""
    rows = []
    for event in profiler.key_averages():
        device_us = getattr(event, "device_time_total", None)
        if device_us is None:
            device_us = getattr(event, "cuda_time_total", 0)
        self_us = getattr(event, "self_device_time_total", getattr(event, "self_cuda_time_total", device_us))
        if self_us > 0:
            rows.append((event.key, int(event.count), self_us / 1e6))
    rows.sort(key=lambda row: -row[2])
    total = sum(row[2] for row in rows)
    lines = [f"### {title}", "", f"wall time of the call {wall_s:.2f} s; kernels and copies on the device "
             f"{total:.2f} s ({100 * total / max(wall_s, 1e-9):.0f} % of the wall time)", "",
             "| kernel | launches | device s | share of device time | µs per launch |", "|---|---|---|---|---|"]
    for name, count, seconds in rows[:40]:
        lines.append(f"| `{name[:90]}` | {count} | {seconds:.3f} | {100 * seconds / max(total, 1e-12):.1f} % | "
                     f"{1e6 * seconds / max(count, 1):.1f} |")
    summary = {"wall_s": round(wall_s, 3), "device_s": round(total, 3), "launches": sum(r[1] for r in rows),
               "kernels": [{"name": n, "launches": c, "device_s": round(t, 4)} for n, c, t in rows[:60]]}
    return "\n".join(lines) + "\n", summary


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--function", required=True, help="module:function to profile, e.g. cryocv.jobs.refine:run")
    parser.add_argument("--call", type=int, default=1, help="which call of it to profile (1 = the first)")
    parser.add_argument("--cprofile-call", type=int, default=None, help="also run this call under cProfile")
    parser.add_argument("--out", required=True, help="path prefix of the results")
    parser.add_argument("script", nargs=argparse.REMAINDER, help="-- SCRIPT ARGS...")
    args = parser.parse_args(argv)
    script = [a for a in args.script if a != "--"] if args.script[:1] == ["--"] else args.script
    module_name, function_name = args.function.split(":")
    module = importlib.import_module(module_name)
    original = getattr(module, function_name)
    calls = {"n": 0}

    def wrapped(*a, **kw):
        calls["n"] += 1
        if calls["n"] == args.call:
            import cupy as cp
            from torch.profiler import ProfilerActivity, profile
            cp.cuda.Device().synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as profiler:
                started = time.time()
                result = original(*a, **kw)
                cp.cuda.Device().synchronize()
                wall = time.time() - started
            text, summary = kernel_table(profiler, wall, f"{args.function}, call {calls['n']}")
            with open(args.out + ".md", "w") as handle:
                handle.write(text)
            with open(args.out + ".json", "w") as handle:
                json.dump(summary, handle, indent=1)
            print(text, flush=True)
            return result
        if calls["n"] == args.cprofile_call:
            host = cProfile.Profile()
            result = host.runcall(original, *a, **kw)
            stream = io.StringIO()
            pstats.Stats(host, stream=stream).sort_stats("cumulative").print_stats(60)
            with open(args.out + "_cprofile.txt", "w") as handle:
                handle.write(stream.getvalue())
            return result
        return original(*a, **kw)

    setattr(module, function_name, wrapped)
    sys.argv = script
    sys.path.insert(0, os.path.dirname(os.path.abspath(script[0])))
    runpy.run_path(script[0], run_name="__main__")


if __name__ == "__main__":
    main()
