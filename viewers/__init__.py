"""Scipion viewers of cryocv (installed as ``cryocv.viewers``)."""
from .viewer_cryocv import CryocvViewer, fscPlotter, poseChangePlotter, posesPlotter

__all__ = ["CryocvViewer", "fscPlotter", "poseChangePlotter", "posesPlotter"]
