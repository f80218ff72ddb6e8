"""A job's figures drawn in a helper process, so that matplotlib (about a second of drawing for a
50 000-particle job's plots, plus its import) overlaps the job's other work and outputs instead of
adding to its wall time.

    plotter = BackgroundPlotter()     # at the job's start: the helper imports matplotlib meanwhile
    plotter.plot("plot_fsc", report, path, title="...")     # a plot_* function of cryocv.plotting
    plotter.wait()                    # every figure written, or the first drawing error raised

Each call's arguments are pickled and sent through the helper's stdin by a writer thread (the job
never waits for the helper to read); the helper draws the figures in order, each PNG written
atomically as :mod:`cryocv.plotting` does, and writes nothing else. When the helper cannot start
or dies, the figures not yet drawn are drawn in this process: they are always written or an error
is raised. :class:`InlinePlotter` draws at once, in this process.
"""
from __future__ import annotations

import os
import pickle
import queue
import subprocess
import sys
import threading
import traceback
import weakref

from . import plotting

_LENGTH_BYTES = 8


class InlinePlotter:
    """Draws each figure when asked, in this process."""

    def plot(self, name: str, *args, **kwargs):
        getattr(plotting, name)(*args, **kwargs)

    def wait(self):
        pass


def _stop(process):
    """Finalizer: the helper of a job that failed is stopped."""
    if process is not None and process.poll() is None:
        process.kill()
        process.wait()


class BackgroundPlotter:
    """Draws figures in a helper Python process (``python -m cryocv.plot_worker``)."""

    def __init__(self):
        self._pending = []               # (name, args, kwargs) not yet confirmed drawn by the helper
        package_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [package_parent] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
        try:
            self._process = subprocess.Popen([sys.executable, "-m", "cryocv.plot_worker"], stdin=subprocess.PIPE,
                                             stdout=subprocess.PIPE, env=env)
        except OSError:
            self._process = None
        self._messages = queue.SimpleQueue()
        self._writer = threading.Thread(target=self._send, daemon=True)
        if self._process is not None:
            self._writer.start()
        self._finalizer = weakref.finalize(self, _stop, self._process)

    def _send(self):
        """Writer thread: each message length-prefixed to the helper's stdin; None closes it."""
        stdin = self._process.stdin
        try:
            while (message := self._messages.get()) is not None:
                stdin.write(len(message).to_bytes(_LENGTH_BYTES, "little") + message)
                stdin.flush()
        except OSError:
            pass                                         # the helper died: wait() draws the rest here
        finally:
            try:
                stdin.close()
            except OSError:
                pass

    def plot(self, name: str, *args, **kwargs):
        getattr(plotting, name)                          # an unknown name fails here, not in the helper
        self._pending.append((name, args, kwargs))
        if self._process is not None:
            self._messages.put(pickle.dumps((name, args, kwargs), protocol=pickle.HIGHEST_PROTOCOL))

    def wait(self):
        """Every figure asked for is written (here, for those the helper did not draw); raises the
        first drawing error."""
        drawn, error = 0, None
        if self._process is not None:
            self._messages.put(None)
            self._writer.join()
            try:
                output = self._process.stdout.read()
                self._process.wait()
                drawn, error = pickle.loads(output) if output else (0, None)
            except (OSError, pickle.UnpicklingError, EOFError, ValueError):
                drawn, error = 0, None
        self._finalizer()
        if error is not None:
            raise RuntimeError(f"drawing a figure failed in the helper process:\n{error}")
        for name, args, kwargs in self._pending[drawn:]:  # the helper died or never started
            getattr(plotting, name)(*args, **kwargs)
        self._pending = []


def main():
    """The helper: length-prefixed pickled (name, args, kwargs) messages on stdin, drawn in order; at
    EOF, (figures drawn, first error or None) pickled to stdout."""
    stdin, drawn, error = sys.stdin.buffer, 0, None
    while len(header := stdin.read(_LENGTH_BYTES)) == _LENGTH_BYTES:
        message = stdin.read(int.from_bytes(header, "little"))
        if error is not None:
            continue
        try:
            name, args, kwargs = pickle.loads(message)
            getattr(plotting, name)(*args, **kwargs)
            drawn += 1
        except Exception:
            error = traceback.format_exc()
    try:
        sys.stdout.buffer.write(pickle.dumps((drawn, error)))
        sys.stdout.buffer.flush()
    except OSError:               # the job was stopped: nobody reads the answer
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())    # nor a flush at exit


if __name__ == "__main__":
    main()
