"""Scipion viewers of cryocv (installed as ``cryocv.viewers``)."""
from .viewer_cryocv import (CryocvViewer, abinitioPlotter, fscPlotter, poseChangePlotter, posesPlotter,
                            relaxationPlotter)

__all__ = ["CryocvViewer", "abinitioPlotter", "fscPlotter", "poseChangePlotter", "posesPlotter",
           "relaxationPlotter"]
