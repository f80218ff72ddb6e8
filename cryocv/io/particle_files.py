"""Particle metadata files by extension: RELION STAR (``.star``) or cryoSPARC ``.cs``."""
from __future__ import annotations

import os

from ..errors import CryocvError
from ..particles import Particles
from .cs import read_cs, write_cs
from .star import read_star, write_star


def load_particles(path: str, datadir: str | None = None) -> Particles:
    """Load a RELION STAR or cryoSPARC .cs particle file."""
    if not os.path.exists(path):
        raise CryocvError(f"file not found: {path}")
    if path.endswith(".cs"):
        return read_cs(path, datadir)
    if path.endswith(".star"):
        return read_star(path, datadir)
    raise CryocvError(f"unknown particle file type: {path} (expected .star or .cs)")


def save_particles(particles: Particles, path: str):
    """Write particles as RELION 3.1 STAR or cryoSPARC .cs (chosen by extension)."""
    if path.endswith(".cs"):
        return write_cs(particles, path)
    if path.endswith(".star"):
        return write_star(particles, path)
    raise CryocvError(f"unknown particle file type: {path} (expected .star or .cs)")
