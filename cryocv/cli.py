"""The ``cryocv`` command line: one subcommand per :mod:`cryocv.jobs` module (its docstring is
the subcommand's description). Errors the user can fix print one line and exit 2."""
from __future__ import annotations

import argparse
import sys

from . import __version__
from .errors import CryocvError
from .jobs import abinitio, convert, demo, fsc, local_refine, reconstruct, refine, simulate, subtract

_EPILOG = "Conventions follow RELION 3.1 (ZYZ Euler angles, rlnOriginXAngst, optics groups). See README.md."
COMMANDS = {"simulate": simulate, "reconstruct": reconstruct, "refine": refine, "local-refine": local_refine,
            "subtract": subtract, "abinitio": abinitio, "fsc": fsc, "convert": convert, "demo": demo}


class _Parser(argparse.ArgumentParser):
    """Usage mistakes, like every other error, in one line (the usage is one --help away)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="cryocv", description="GPU-accelerated cryo-EM refinement.", epilog=_EPILOG)
    parser.add_argument("--version", action="version", version=f"cryocv {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in COMMANDS.items():
        p = sub.add_parser(name, help=module.HELP, description=module.__doc__)
        module.add_args(p)
        p.set_defaults(job=module)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.job.main(args)
    except CryocvError as exc:
        print(f"cryocv {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # e.g. --out names an existing file, disk full, permission denied
        print(f"cryocv {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except MemoryError:
        print(f"cryocv {args.command}: error: out of memory; lower --batch-size", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cryocv {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
