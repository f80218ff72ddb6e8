import subprocess
import sys


def test_import_does_not_pull_in_scipion_or_gpu_libraries():
    code = ("import sys, cryocv, cryocv.cli, cryocv.reconstruct, cryocv.particles; "
            "print(any(m.split('.')[0] in ('pyworkflow', 'pwem') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_plugin_is_lazy():
    import cryocv
    assert "Plugin" not in vars(cryocv)  # only built on first access (PEP 562)
    try:
        import pwem  # noqa: F401
    except ImportError:
        return
    assert cryocv.Plugin.__module__ == "cryocv"
