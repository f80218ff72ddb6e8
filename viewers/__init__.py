"""Scipion viewers of cryocv (installed as ``cryocv.viewers``)."""
from .viewer_cryocv import CryocvViewer, fscPlotter, posesPlotter

__all__ = ["CryocvViewer", "fscPlotter", "posesPlotter"]
