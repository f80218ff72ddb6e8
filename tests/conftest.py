"""Shared fixtures: the ``xp`` array module (numpy, and CuPy when a GPU is present),
the ../shared/data folder, RELION availability and small ground-truth maps."""
import atexit
import importlib.util
import os
import shutil
import sys
import tempfile

import numpy as np
import pytest

from cryocv.backend import gpu_available
from cryocv.scipion_env import headless_scipion


def _scipion_sandbox():
    """Headless Scipion for the plugin tests, set before anything imports pyworkflow
    (its Config reads the environment once): projects, logs and config in a temporary
    SCIPION_HOME / SCIPION_USER_DATA (never the user's), protocols run by this interpreter."""
    root = tempfile.mkdtemp(prefix="cryocv-scipion-")
    atexit.register(shutil.rmtree, root, True)
    for name in ("SCIPION_HOME", "SCIPION_USER_DATA", "SCIPION_HOSTS"):
        os.environ.pop(name, None)
    headless_scipion(home=root, user_data=os.path.join(root, "data"))
    os.environ["PYTHONDONTWRITEBYTECODE"] = "1"


_scipion_sandbox()

HERE = os.path.dirname(os.path.abspath(__file__))
_CANDIDATES = [os.environ.get("CRYOCV_SHARED_DATA", ""),
               os.path.join(HERE, "..", "..", "shared", "data"),
               os.path.join(os.getcwd(), "..", "shared", "data")]


def bench_module(name: str):
    """``bench/NAME.py`` imported by its path (the dataset builders: they need gemmi). Skips the
    test when gemmi is missing or bench/ is not beside the tests (an installed package)."""
    pytest.importorskip("gemmi")
    path = os.path.join(HERE, "..", "bench", f"{name}.py")
    if not os.path.isfile(path):
        pytest.skip("bench/ is not beside the tests (installed package)")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module                 # its dataclasses need the module registered
    spec.loader.exec_module(module)
    return module


def shared_data_dir():
    for cand in _CANDIDATES:
        if cand and os.path.isdir(os.path.join(cand, "particles")):
            return os.path.abspath(cand)
    return None


@pytest.fixture(scope="session")
def shared_data():
    path = shared_data_dir()
    if path is None:
        pytest.skip("../shared/data not found (set CRYOCV_SHARED_DATA)")
    return path


XP_PARAMS = [pytest.param("numpy", id="numpy"),
             pytest.param("cupy", id="cupy", marks=pytest.mark.skipif(not gpu_available(), reason="no GPU"))]


@pytest.fixture(params=XP_PARAMS)
def xp(request):
    if request.param == "numpy":
        return np
    import cupy
    return cupy


needs_relion = pytest.mark.skipif(shutil.which("relion_project") is None or shutil.which("relion_reconstruct") is None,
                                  reason="RELION 3.1 binaries not installed (apt-get install relion)")
needs_gpu = pytest.mark.skipif(not gpu_available(), reason="no CUDA GPU / CuPy")


def blob_volume(box_size: int, seed: int = 0, n_blobs: int = 8, extent: float = 0.25):
    """A smooth random test map: Gaussian blobs within ``extent``·box of the centre."""
    rng = np.random.default_rng(seed)
    grid = np.indices((box_size,) * 3).astype(np.float32) - box_size // 2
    vol = np.zeros((box_size,) * 3, np.float32)
    for _ in range(n_blobs):
        c = rng.uniform(-extent * box_size, extent * box_size, 3)
        s = rng.uniform(1.2, 2.5)
        vol += np.exp(-((grid[2] - c[0]) ** 2 + (grid[1] - c[1]) ** 2 + (grid[0] - c[2]) ** 2) / (2 * s * s))
    return vol


def asymmetric_map(n: int, seed: int = 5, n_atoms: int = 60, sigma_px: float = 0.9):
    """A pseudo-atomic map: sharp Gaussian "atoms" at random places within 0.3·N of
    the centre (a protein-like power spectrum, no symmetry, so poses are unique)."""
    rng = np.random.default_rng(seed)
    grid = np.indices((n,) * 3).astype(np.float32) - n // 2
    vol = np.zeros((n,) * 3, np.float32)
    for _ in range(n_atoms):
        c = rng.normal(0, 0.13 * n, 3).clip(-0.3 * n, 0.3 * n)
        vol += np.exp(-((grid - c[:, None, None, None]) ** 2).sum(0) / (2 * sigma_px ** 2))
    return vol


@pytest.fixture(scope="session")
def hemoglobin_map(shared_data):
    """Ground truth from the 5NI1 model: box 40, 2.4 Å pixels (numpy, pixel size)."""
    pytest.importorskip("gemmi")
    from cryocv.models import map_from_model
    return map_from_model(os.path.join(shared_data, "models", "5ni1_hemoglobin.cif"), 40, 2.4,
                          resolution_A=5.0), 2.4
