"""Scipion protocols of cryocv (installed as ``cryocv.protocols``)."""
from .protocol_abinitio import ProtCryocvAbinitio
from .protocol_local_refine import ProtCryocvLocalRefine
from .protocol_reconstruct import ProtCryocvReconstruct
from .protocol_refine import ProtCryocvRefine
from .protocol_subtract import ProtCryocvSubtract

__all__ = ["ProtCryocvAbinitio", "ProtCryocvLocalRefine", "ProtCryocvReconstruct", "ProtCryocvRefine",
           "ProtCryocvSubtract"]
