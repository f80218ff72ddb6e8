"""Scipion plugin class, imported only when ``cryocv.Plugin`` is accessed.

Variables (Scipion config or environment):

* ``CRYOCV_PYTHON``: the python that runs the ``cryocv`` core (default: the
  interpreter running Scipion). Point it at another environment's python when
  the GPU core (CuPy 14 wants numpy 2) lives apart from Scipion's numpy 1.26.
* ``CRYOCV_ACTIVATION``: optional shell command run first to enter that
  environment, e.g. ``source /opt/conda/bin/activate cryocv-gpu``; with it,
  ``CRYOCV_PYTHON`` is looked up after activation (default ``python``).
"""
import os
import sys

import pwem
import pyworkflow.utils as pwutils

_references = ["Punjani2017", "Punjani2020"]

PYTHON_VAR = "CRYOCV_PYTHON"
ACTIVATION_VAR = "CRYOCV_ACTIVATION"


class Plugin(pwem.Plugin):
    _url = "https://github.com/cryocv/cryocv"

    @classmethod
    def _defineVariables(cls):
        activation = os.environ.get(ACTIVATION_VAR, "")
        cls._defineVar(ACTIVATION_VAR, "", description="shell command that enters the environment of the cryocv "
                                                       "core before it runs (empty: none)")
        cls._defineVar(PYTHON_VAR, "python" if activation else sys.executable,
                       description="python interpreter that runs the cryocv core")

    @classmethod
    def getEnviron(cls):
        return pwutils.Environ(os.environ)

    @classmethod
    def defineBinaries(cls, env):
        """Nothing to build: the core is a Python package (``pip install cryocv[gpu]``)."""

    @classmethod
    def getProgram(cls, gpu: bool = False) -> str:
        """Shell prefix that runs the cryocv CLI; arguments follow it.

        With ``gpu`` the command sees only the protocol's GPUs: pyworkflow
        replaces ``%(GPU)s`` with the comma-separated GPU list (renumbered
        under a queue), so the core uses "its" first GPU.
        """
        python = cls.getVar(PYTHON_VAR) or sys.executable
        program = f"{python} -m cryocv.cli"
        if gpu:
            program = f"CUDA_VISIBLE_DEVICES=%(GPU)s {program}"
        activation = (cls.getVar(ACTIVATION_VAR) or "").strip()
        return f"{activation} && {program}" if activation else program


Plugin.__module__ = "cryocv"
