"""cryocv: GPU-accelerated cryo-EM 3D refinement (numpy on CPU, CuPy on GPU).

``import cryocv`` never imports Scipion: the Scipion ``Plugin`` class is built
on first access (PEP 562 module ``__getattr__``).
"""
import os as _os

__version__ = "0.1.0"

# In a source checkout protocols/, viewers/ and tests/ sit beside this folder; setup.py installs
# them as cryocv.protocols, cryocv.viewers and cryocv.tests. When the checkout's own cryocv/ is
# imported (e.g. ``python -m pytest`` from the checkout puts it first on sys.path), let those
# subpackages resolve there as well. An installed cryocv has them inside and skips this.
_checkout = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if (not _os.path.isdir(_os.path.join(__path__[0], "protocols"))
        and _os.path.isfile(_os.path.join(_checkout, "setup.py"))
        and _os.path.isfile(_os.path.join(_checkout, "protocols", "__init__.py"))):
    __path__.append(_checkout)


def __getattr__(name):
    if name in ("Plugin", "_references"):
        from . import scipion_plugin
        return getattr(scipion_plugin, name)
    raise AttributeError(f"module 'cryocv' has no attribute {name!r}")
