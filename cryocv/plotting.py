"""Figures (matplotlib, Agg backend): FSC curves."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .io.mrc import atomic_path  # noqa: E402


def plot_fsc(report: dict, path: str, title: str = "Gold-standard FSC"):
    """Plot the curves of a :func:`cryocv.fsc.gold_standard_fsc` report to ``path`` (PNG)."""
    freq = np.asarray(report["frequency_per_A"])
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    styles = [("fsc_unmasked", "unmasked", "tab:gray"), ("fsc_masked", "masked", "tab:blue"),
              ("fsc_phase_randomized", "phase-randomized (masked)", "tab:orange"),
              ("fsc_corrected", "corrected", "tab:green")]
    for key, label, color in styles:
        if key in report:
            ax.plot(freq, report[key], label=label, color=color, lw=1.6)
    ax.axhline(0.143, color="k", ls="--", lw=0.8)
    res = report["resolution_A"]
    ax.axvline(1 / res, color="tab:red", ls=":", lw=1.0)
    ax.text(1 / res, 0.9, f" {res:.2f} Å", color="tab:red")
    ax.set_xlim(0, freq[-1])
    ax.set_ylim(-0.1, 1.05)
    ax.set_xlabel("spatial frequency (1/Å)")
    ax.set_ylabel("FSC")
    ax.set_title(title)
    top = ax.secondary_xaxis("top", functions=(lambda f: f, lambda f: f))
    ticks = [t for t in ax.get_xticks() if 0 < t <= freq[-1]]
    top.set_xticks(ticks)
    top.set_xticklabels([f"{1 / t:.1f}" for t in ticks])
    top.set_xlabel("resolution (Å)")
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
