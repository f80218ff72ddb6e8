"""Soft masks: spherical and thresholded (dilated, cosine edge). Shapes (N, N, N) float32 in [0, 1]."""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from .backend import get_array_module, to_device, to_numpy


def _radius_grid(box_size: int, xp=np):
    c = xp.arange(box_size, dtype=xp.float32) - box_size // 2
    return xp.sqrt(c[:, None, None] ** 2 + c[None, :, None] ** 2 + c[None, None, :] ** 2)


def _cosine_edge(distance, width):
    """1 at distance <= 0, raised-cosine fall to 0 at distance >= width."""
    xp = get_array_module(distance)
    if width <= 0:
        return (distance <= 0).astype(xp.float32)
    t = xp.clip(distance / width, 0, 1)
    return (0.5 * (1 + xp.cos(np.pi * t))).astype(xp.float32)


def spherical_mask(box_size: int, radius_px: float, edge_px: float = 3.0, xp=np):
    """Sphere of ``radius_px`` around the box centre with a ``edge_px`` cosine edge."""
    return _cosine_edge(_radius_grid(box_size, xp) - radius_px, edge_px)


def threshold_mask(volume, threshold: float, dilation_px: float = 3.0, edge_px: float = 6.0):
    """Voxels above ``threshold``, dilated by ``dilation_px`` and softened by a cosine
    edge of ``edge_px``, from an exact Euclidean distance transform (scipy's on the CPU,
    cupyx's on a GPU: the same distances; 31 s on the CPU for a 512³ map on the H200's host)."""
    xp = get_array_module(volume)
    binary = volume > threshold
    if not bool(binary.any()):
        raise ValueError(f"threshold {threshold} leaves an empty mask")
    if xp is np:
        distance = ndimage.distance_transform_edt(~binary)
    else:
        try:
            from cupyx.scipy.ndimage import distance_transform_edt  # CuPy >= 13
            distance = distance_transform_edt(~binary)
        except Exception:  # pragma: no cover - older CuPy, or a failure there: the CPU's transform
            # (tests/test_gpu.py compares both; the GPU one has not yet run on a device)
            return to_device(threshold_mask(to_numpy(volume), threshold, dilation_px, edge_px), xp)
    return _cosine_edge(distance - dilation_px, edge_px)


def auto_threshold_mask(volume, pixel_size_A: float, fraction_of_max: float = 0.2,
                        near_A: float = 6.0, far_A: float = 14.0):
    """Solvent mask from a map: threshold at ``fraction_of_max`` of the maximum, hard
    out to ``near_A`` and soft to ``far_A`` (cryoSPARC's dynamic mask defaults)."""
    xp = get_array_module(volume)
    threshold = fraction_of_max * float(xp.max(volume))
    return threshold_mask(volume, threshold, near_A / pixel_size_A, (far_A - near_A) / pixel_size_A)


PROTEIN_A3_PER_DA = 1.21          # partial specific volume of protein: mass in a mask from its volume


def mask_report(mask, pixel_size_A: float) -> dict:
    """Mass in the mask (kDa of protein filling its volume where it is >= 0.5, an upper bound: masks
    are dilated) and the width of its soft edge (Å)."""
    volume_A3 = float(np.count_nonzero(mask >= 0.5)) * pixel_size_A ** 3
    box = (ndimage.find_objects((mask > 0.01).astype(np.int8)) or [(slice(0, 0),) * 3])[0]   # holds every core voxel
    core, edge = mask[box] >= 0.99, (mask[box] > 0.01) & (mask[box] < 0.99)
    width = float(np.percentile(ndimage.distance_transform_edt(~core)[edge], 95)) * pixel_size_A if edge.any() and core.any() else 0.0
    return {"mask_volume_A3": volume_A3, "mask_mass_kDa": volume_A3 / PROTEIN_A3_PER_DA / 1000,
            "mask_soft_edge_A": width}
