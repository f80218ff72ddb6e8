"""A job's figures drawn in a helper process, so that matplotlib (about a second of drawing for a
50 000-particle job's plots, plus its import) overlaps the job's other work and outputs instead of
adding to its wall time.

    plotter = BackgroundPlotter()     # at the job's start: the helper imports matplotlib meanwhile
    plotter.plot("plot_fsc", report, path, title="...")     # a plot_* function of cryocv.plotting
    plotter.wait()                    # every figure written, or the first drawing error raised

Each call's arguments are pickled to a temporary file and its name sent to the helper, which draws
the figures in order (each PNG written atomically, as :mod:`cryocv.plotting` does). When the helper
cannot start or dies, the figures not yet drawn are drawn in this process: they are always written
or an error is raised. :class:`InlinePlotter` draws at once, in this process.
"""
from __future__ import annotations

import os
import pickle
import subprocess
import sys
import tempfile
import traceback
import weakref

from . import plotting


class InlinePlotter:
    """Draws each figure when asked, in this process."""

    def plot(self, name: str, *args, **kwargs):
        getattr(plotting, name)(*args, **kwargs)

    def wait(self):
        pass


def _stop(process, folder):
    """Finalizer: the helper is stopped and the temporary folder removed (a job that failed)."""
    if process is not None and process.poll() is None:
        process.kill()
        process.wait()
    for name in os.listdir(folder):
        os.remove(os.path.join(folder, name))
    os.rmdir(folder)


class BackgroundPlotter:
    """Draws figures in a helper Python process (``python -m cryocv.plot_worker``)."""

    def __init__(self):
        self._folder = tempfile.mkdtemp(prefix="cryocv_plots_")
        self._pending = []               # (name, args, kwargs) not yet confirmed drawn by the helper
        package_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [package_parent] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
        try:
            self._process = subprocess.Popen([sys.executable, "-m", "cryocv.plot_worker"], stdin=subprocess.PIPE,
                                             stdout=subprocess.PIPE, env=env)
        except OSError:
            self._process = None
        self._finalizer = weakref.finalize(self, _stop, self._process, self._folder)

    def plot(self, name: str, *args, **kwargs):
        getattr(plotting, name)                          # an unknown name fails here, not in the helper
        self._pending.append((name, args, kwargs))
        if self._process is None:
            return
        message = os.path.join(self._folder, f"{len(self._pending):04d}.pickle")
        with open(message, "wb") as handle:
            pickle.dump((name, args, kwargs), handle, protocol=pickle.HIGHEST_PROTOCOL)
        try:
            self._process.stdin.write(message.encode() + b"\n")
            self._process.stdin.flush()
        except (BrokenPipeError, OSError):
            self._process = None                         # drawn here in wait()

    def wait(self):
        """Every figure asked for is written (here, for those the helper did not draw); raises the
        first drawing error."""
        drawn = 0
        if self._process is not None:
            try:
                self._process.stdin.close()
                output = self._process.stdout.read()
                self._process.wait()
                drawn, error = pickle.loads(output) if output else (0, None)
            except (OSError, pickle.UnpicklingError, EOFError, ValueError):
                drawn, error = 0, None
            if error is not None:
                self._finalizer()
                raise RuntimeError(f"drawing a figure failed in the helper process:\n{error}")
        for name, args, kwargs in self._pending[drawn:]:  # the helper died or never started
            getattr(plotting, name)(*args, **kwargs)
        self._pending = []
        self._finalizer()


def main():
    """The helper: one message file name per stdin line; at EOF, (figures drawn, first error or None)
    pickled to stdout."""
    drawn, error = 0, None
    for line in sys.stdin.buffer:
        path = line.decode().strip()
        if error is not None or not path:
            continue
        try:
            with open(path, "rb") as handle:
                name, args, kwargs = pickle.load(handle)
            os.remove(path)
            getattr(plotting, name)(*args, **kwargs)
            drawn += 1
        except Exception:
            error = traceback.format_exc()
    sys.stdout.buffer.write(pickle.dumps((drawn, error)))
    sys.stdout.buffer.flush()


if __name__ == "__main__":
    main()
