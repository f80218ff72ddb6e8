"""Convert IN to OUT (by extension: .star or .cs) keeping poses, shifts, CTF and half-sets.
Image paths are written relative to the working directory (the project directory) when the
stacks lie under it, else relative to OUT's folder when under that, else absolute."""
from __future__ import annotations

from ..io.particle_files import load_particles, save_particles

HELP = "convert particles between RELION STAR and cryoSPARC .cs"


def add_args(p):
    p.add_argument("input", metavar="IN")
    p.add_argument("output", metavar="OUT")
    p.add_argument("--datadir", help="extra folder to look for image stacks in")


def main(args) -> int:
    n = run(args.input, args.output, args.datadir)
    print(f"converted {n} particles: {args.input} -> {args.output}")
    return 0


def run(in_path: str, out_path: str, datadir=None) -> int:
    """Convert particles between RELION STAR and cryoSPARC .cs; returns the count."""
    particles = load_particles(in_path, datadir)
    particles.check_metadata()
    save_particles(particles, out_path)
    return len(particles)
