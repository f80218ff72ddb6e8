"""Print the resolution where the FSC of two maps crosses 0.143 and 0.5."""
from __future__ import annotations

import json

from ..errors import CryocvError
from ..fsc import fsc_curve, resolution_at
from ..io.mrc import read_map
from .common import check_cubic, check_pixel_size

HELP = "FSC between two maps"


def add_args(p):
    p.add_argument("map1")
    p.add_argument("map2")
    p.add_argument("--mask", help="mask (MRC) applied to both maps")
    p.add_argument("--pixel-size-A", dest="pixel_size_A", type=float,
                   help="pixel size in Å (default: from the headers)")
    p.add_argument("--json", action="store_true", help="print the whole curve as JSON")


def main(args) -> int:
    result = run(args.map1, args.map2, args.mask, args.pixel_size_A)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"FSC=0.143: {result['resolution_0.143_A']:.2f} Å")
        print(f"FSC=0.5:   {result['resolution_0.5_A']:.2f} Å")
    return 0


def run(map1_path: str, map2_path: str, mask_path=None, pixel_size_A=None) -> dict:
    """FSC of two maps: resolutions at 0.143 and 0.5 and the curve."""
    check_pixel_size(pixel_size_A)
    map1, px1 = read_map(map1_path)
    map2, px2 = read_map(map2_path)
    if map1.shape != map2.shape:
        raise CryocvError(f"maps differ in size: {map1_path} is {map1.shape}, {map2_path} is {map2.shape}")
    check_cubic(map1, map1_path)
    pixel = pixel_size_A or px1 or px2
    if not pixel:
        raise CryocvError("the maps have no pixel size in their headers: pass --pixel-size-A")
    if px1 and px2 and abs(px1 - px2) > 1e-3 * px1 and not pixel_size_A:
        raise CryocvError(f"pixel sizes differ: {px1:.4f} Å vs {px2:.4f} Å")
    mask = None
    if mask_path:
        mask, _ = read_map(mask_path)
        if mask.shape != map1.shape:
            raise CryocvError(f"mask {mask_path} has shape {mask.shape}, maps have {map1.shape}")
    curve = fsc_curve(map1, map2, mask)
    n = map1.shape[0]
    return {"resolution_0.143_A": resolution_at(curve, 0.143, n, pixel),
            "resolution_0.5_A": resolution_at(curve, 0.5, n, pixel), "pixel_size_A": pixel,
            "fsc": curve.tolist()}
