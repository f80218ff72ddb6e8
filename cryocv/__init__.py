"""cryocv: GPU-accelerated cryo-EM 3D refinement (numpy on CPU, CuPy on GPU).

``import cryocv`` never imports Scipion: the Scipion ``Plugin`` class is built
on first access (PEP 562 module ``__getattr__``).
"""
__version__ = "0.1.0"


def __getattr__(name):
    if name in ("Plugin", "_references"):
        from . import scipion_plugin
        return getattr(scipion_plugin, name)
    raise AttributeError(f"module 'cryocv' has no attribute {name!r}")
