"""Ground-truth map of an atomic model (gemmi, :func:`cryocv.models.map_from_model`), centred, at
a given box and pixel size: the maps the GPU benchmarks simulate particles from.

    python bench/make_map.py ../shared/data/models/3j5p_trpv1_c4.pdb --box 128 --pixel-size-A 1.2 --out trpv1_128.mrc
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cryocv.io.mrc import write_map  # noqa: E402
from cryocv.models import map_from_model  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="PDB or mmCIF file")
    parser.add_argument("--box", type=int, required=True)
    parser.add_argument("--pixel-size-A", type=float, required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    volume = map_from_model(args.model, args.box, args.pixel_size_A)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    write_map(args.out, volume, args.pixel_size_A)
    print(f"{args.out}: {args.box}³ at {args.pixel_size_A} Å/px, max {volume.max():.3g}")


if __name__ == "__main__":
    main()
