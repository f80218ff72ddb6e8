"""Host side of the first pass: how fast batches of images come off the stacks and onto the device.

For batches of a particle STAR file, one stage at a time (median seconds per batch, GB/s of
float32 images): read into ordinary host memory, read into page-locked memory, copy to the
device from each (CuPy stages an ordinary array through its own page-locked pool), and the
centred FT on the device.

    python bench/bench_read.py --particles /tmp/b128/sim/particles.star --batch-size 4096 --out read.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cryocv.backend import empty_pinned, resolve_xp, upload_async  # noqa: E402
from cryocv.fourier import ft2_centered  # noqa: E402
from cryocv.io.particle_files import load_particles  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--particles", required=True)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    xp = resolve_xp("gpu")
    particles = load_particles(args.particles)
    n = particles.box_size
    batches = [np.arange(i, min(i + args.batch_size, len(particles)))
               for i in range(0, len(particles), args.batch_size)][:args.batches]
    pinned = empty_pinned((args.batch_size, n, n), np.float32, xp)
    stages = {name: [] for name in ("read_pageable", "read_pinned", "to_device_pageable", "to_device_pinned",
                                    "ft_on_device")}

    def timed(name, call):
        xp.cuda.Device().synchronize()
        t0 = time.perf_counter()
        value = call()
        xp.cuda.Device().synchronize()
        stages[name].append(time.perf_counter() - t0)
        return value

    for index in batches:
        images = timed("read_pageable", lambda: particles.read_images(index))
        view = pinned[:index.size]
        timed("read_pinned", lambda: particles.read_images(index, out=view))
        timed("to_device_pageable", lambda: xp.asarray(images))
        device = timed("to_device_pinned", lambda: upload_async(view, xp)[0])
        timed("ft_on_device", lambda: ft2_centered(device).astype(xp.complex64, copy=False))
    batch_bytes = args.batch_size * n * n * 4
    result = {"particles": args.particles, "box": n, "batch_size": args.batch_size, "batches": len(batches),
              "cpu_count": os.cpu_count(),
              "seconds_per_batch_median": {k: round(float(np.median(v[1:] or v)), 4) for k, v in stages.items()},
              "GB_per_s": {k: round(batch_bytes / float(np.median(v[1:] or v)) / 1e9, 2) for k, v in stages.items()}}
    with open(args.out, "w") as handle:
        json.dump(result, handle, indent=1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
