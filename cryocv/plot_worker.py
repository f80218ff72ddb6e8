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

import json
import os
import pickle
import queue
import signal
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


WAIT_LIMIT_S = 600.0         # a helper that has not answered by then is stopped; the rest is drawn here


def _send(messages, stdin):
    """Writer thread: each message length-prefixed to the helper's stdin; None closes it."""
    try:
        while (message := messages.get()) is not None:
            stdin.write(len(message).to_bytes(_LENGTH_BYTES, "little") + message)
            stdin.flush()
    except (OSError, ValueError):
        pass                                             # the helper died: wait() draws the rest here
    finally:
        try:
            stdin.close()
        except OSError:
            pass


def _stop(process, messages):
    """Finalizer and :meth:`BackgroundPlotter.close`: the writer thread and the helper are stopped."""
    messages.put(None)
    if process is not None:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stdout.close()


class BackgroundPlotter:
    """Draws figures in a helper Python process (:func:`main`), which sees this process's
    ``sys.path`` exactly. Every plotter alive is in ``opened``: a job that fails closes them."""

    opened = weakref.WeakSet()

    def __init__(self):
        self._pending = []               # (name, args, kwargs) not yet confirmed drawn by the helper
        self._inline = []                # ... that the helper could not take: drawn here by wait()
        self._messages = queue.SimpleQueue()
        command = [sys.executable, "-c", "import sys, json; sys.path[:] = json.loads(sys.argv[1]); "
                   "from cryocv.plot_worker import main; main()", json.dumps(sys.path)]
        try:
            self._process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        except OSError:
            self._process = None
        self._writer = None
        if self._process is not None:    # the thread holds the queue and the pipe, not the plotter
            self._writer = threading.Thread(target=_send, args=(self._messages, self._process.stdin), daemon=True)
            self._writer.start()
        self._finalizer = weakref.finalize(self, _stop, self._process, self._messages)
        BackgroundPlotter.opened.add(self)

    def plot(self, name: str, *args, **kwargs):
        getattr(plotting, name)                          # an unknown name fails here, not in the helper
        try:
            message = pickle.dumps((name, args, kwargs), protocol=pickle.HIGHEST_PROTOCOL)
        except Exception:
            message = None                               # drawn here by wait(), after the helper's
        if message is None or not self._finalizer.alive:
            self._inline.append((name, args, kwargs))
            return
        self._pending.append((name, args, kwargs))
        self._messages.put(message)

    def close(self):
        """Stop the helper without waiting for its figures (a job that failed)."""
        self._finalizer()

    def wait(self):
        """Every figure asked for is written (here, for those the helper did not draw); raises the
        first drawing error."""
        drawn, error = 0, None
        if self._finalizer.alive and self._process is not None:
            self._messages.put(None)
            self._writer.join(WAIT_LIMIT_S)
            try:
                if self._writer.is_alive():
                    raise subprocess.TimeoutExpired("plot helper", WAIT_LIMIT_S)
                self._process.stdin = None               # the writer closed it; only the answer is left
                output, _ = self._process.communicate(timeout=WAIT_LIMIT_S)
                drawn, error = pickle.loads(output) if output else (0, None)
            except Exception:                            # no answer in time, or garbage: draw here
                drawn, error = 0, None
        self._finalizer()
        if error is not None:
            raise RuntimeError(f"drawing a figure failed in the helper process:\n{error}")
        for name, args, kwargs in self._pending[drawn:] + self._inline:
            getattr(plotting, name)(*args, **kwargs)     # the helper died, never started, or could not take them
        self._pending, self._inline = [], []


def _warm_up():
    """Pay matplotlib's first-use costs (fonts, text layout, projections, the PNG writer) on a
    throwaway figure while the job still runs; nothing is written."""
    import io
    from matplotlib.figure import Figure
    try:
        fig = Figure(figsize=(3, 2), dpi=40)
        ax = fig.add_subplot(1, 2, 1, projection="hammer")
        fig.colorbar(ax.pcolormesh([[0.0, 1.0]]), ax=ax, orientation="horizontal", label="x")
        ax = fig.add_subplot(1, 2, 2)
        ax.plot([0, 1], [0, 1], "o-", label="x")
        ax.hist([0.0, 1.0], bins=4)
        ax.legend(fontsize=7)
        ax.twinx().set_ylabel("x")
        ax.secondary_xaxis("top").set_xlabel("x")
        fig.suptitle("x")
        fig.tight_layout()
        fig.savefig(io.BytesIO(), format="png")
    except Exception:
        pass                      # the real figures will report any problem


def main():
    """The helper: length-prefixed pickled (name, args, kwargs) messages on stdin, drawn in order; at
    EOF, (figures drawn, first error or None) pickled to the original stdout (anything the drawing
    prints goes to stderr). Ctrl-C is the job's to handle: the helper ends when its input does."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    answer = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    _warm_up()
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
        answer.write(pickle.dumps((drawn, error)))
        answer.close()
    except OSError:               # the job was stopped: nobody reads the answer
        try:
            answer.close()
        except OSError:
            pass


if __name__ == "__main__":
    main()
