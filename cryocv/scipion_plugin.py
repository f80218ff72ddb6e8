"""Scipion plugin class, imported only when ``cryocv.Plugin`` is accessed.

The protocols call the ``cryocv`` CLI through ``CRYOCV_PYTHON`` (default: the
interpreter running Scipion), so the GPU core may live in its own environment.
"""
import sys

import pwem

_references = ["Punjani2017", "Punjani2020"]


class Plugin(pwem.Plugin):
    _url = "https://github.com/cryocv/cryocv"

    @classmethod
    def _defineVariables(cls):
        cls._defineVar("CRYOCV_PYTHON", sys.executable)

    @classmethod
    def getCryocvCommand(cls):
        """Program and argument prefix that runs the cryocv CLI."""
        return cls.getVar("CRYOCV_PYTHON"), "-m cryocv.cli"


Plugin.__module__ = "cryocv"
