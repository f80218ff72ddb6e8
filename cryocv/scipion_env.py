"""Environment for running Scipion without its launcher (plain ``python``: scripts, tests).

pyworkflow reads its configuration from the environment once, when first imported, so
:func:`headless_scipion` must run before ``import pyworkflow``. It only fills in what is
unset: under ``scipion3 python`` (the launcher) nothing changes. No Scipion import here.
"""
from __future__ import annotations

import os
import sys

HOSTS_CONF = "[localhost]\nPARALLEL_COMMAND = mpirun -np %_(JOB_NODES)d %_(COMMAND)s\n"


def headless_scipion(home: str | None = None, user_data: str | None = None) -> dict:
    """Set what pyworkflow needs to create and run projects headless; returns the values.

    ``home``: SCIPION_HOME (default ``~/.cryocv/scipion``), given a ``config/hosts.conf``
    for the local machine if it has none. ``user_data``: SCIPION_USER_DATA, where
    projects go (default: pyworkflow's ``~/ScipionUserData``). Protocols run in
    subprocesses of this interpreter (SCIPION_PYTHON); the domain is pwem (EM).
    """
    if "SCIPION_HOME" not in os.environ:
        os.environ["SCIPION_HOME"] = os.path.abspath(home or os.path.expanduser(os.path.join("~", ".cryocv", "scipion")))
    hosts = os.path.join(os.environ["SCIPION_HOME"], "config", "hosts.conf")
    if "SCIPION_HOSTS" not in os.environ and not os.path.exists(hosts):
        os.makedirs(os.path.dirname(hosts), exist_ok=True)
        with open(hosts, "w") as handle:
            handle.write(HOSTS_CONF)
    if user_data is not None:
        os.environ.setdefault("SCIPION_USER_DATA", os.path.abspath(user_data))
    os.environ.setdefault("SCIPION_DOMAIN", "pwem")
    os.environ.setdefault("SCIPION_PYTHON", sys.executable)
    os.environ.setdefault("SCIPION_NOTIFY", "False")
    names = ("SCIPION_HOME", "SCIPION_USER_DATA", "SCIPION_DOMAIN", "SCIPION_PYTHON")
    return {name: os.environ[name] for name in names if name in os.environ}
