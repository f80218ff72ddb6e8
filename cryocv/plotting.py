"""Figures: FSC curves and pose diagnostics.

``draw_*`` fill a matplotlib Figure given by the caller (a Scipion viewer passes
one from its interactive backend); ``plot_*`` draw into a new off-screen
Figure and save it as PNG. Neither touches pyplot's global backend.
"""
from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .io.mrc import atomic_path

FSC_FIGSIZE = (6.4, 4.2)


def poses_figsize(with_change: bool) -> tuple:
    """Figure size for :func:`draw_poses` (2 or 3 panels)."""
    return (4.6 * (3 if with_change else 2), 3.8)


def _save(fig: Figure, path: str):
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


def plot_fsc(report: dict, path: str, title: str = "Gold-standard FSC"):
    """Plot the curves of a :func:`cryocv.fsc.gold_standard_fsc` report to ``path`` (PNG)."""
    fig = Figure(figsize=FSC_FIGSIZE, dpi=110)
    draw_fsc(fig, report, title)
    _save(fig, path)


def draw_fsc(fig, report: dict, title: str = "Gold-standard FSC"):
    """Half-map FSC curves of ``report`` (unmasked, masked, phase-randomized, corrected;
    frequencies in 1/Å) with the 0.143 line and the resolution, into ``fig``."""
    freq = np.asarray(report["frequency_per_A"])
    ax = fig.add_subplot(1, 1, 1)
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


def plot_poses(euler_deg, path: str, history=None, change_vs_input_deg=None, title: str = "Poses",
               registration=None):
    """Pose diagnostics (see :func:`draw_poses`) to ``path`` (PNG)."""
    fig = Figure(figsize=poses_figsize(change_vs_input_deg is not None), dpi=110)
    draw_poses(fig, euler_deg, history, change_vs_input_deg, title, registration)
    _save(fig, path)


def draw_poses(fig, euler_deg, history=None, change_vs_input_deg=None, title: str = "Poses",
               registration=None):
    """Pose diagnostics into ``fig``: viewing-direction distribution of ``euler_deg``
    (n, 3) RELION ZYZ (rot/tilt, Hammer projection), per-iteration resolution and
    median pose change from ``history`` (refinement iterations), with ``registration``
    [(iteration, angle °, moved)] of the half-sets' registration when given (filled: half-set
    2 was moved), and the histogram of per-particle pose change (°) from the input alignment
    when given."""
    euler = np.asarray(euler_deg, dtype=float)
    panels = 2 + (change_vs_input_deg is not None)
    ax = fig.add_subplot(1, panels, 1, projection="hammer")
    lon = np.deg2rad((euler[:, 0] + 180) % 360 - 180)
    lat = np.deg2rad(90 - euler[:, 1])
    counts, xedges, yedges = np.histogram2d(lon, lat, bins=[72, 36], range=[[-np.pi, np.pi], [-np.pi / 2, np.pi / 2]])
    mesh = ax.pcolormesh(xedges, yedges, counts.T, cmap="viridis", shading="flat")
    fig.colorbar(mesh, ax=ax, orientation="horizontal", pad=0.08, fraction=0.05, label="particles")
    ax.set_title("viewing directions (rot, 90−tilt)", fontsize=9)
    # few, small latitude labels at the edge; longitude labels would sit on the data
    ax.set_yticks(np.deg2rad([-60, -30, 0, 30, 60]))
    ax.set_xticks(np.deg2rad([-120, -60, 0, 60, 120]))
    ax.set_xticklabels([])
    ax.tick_params(labelsize=7)
    ax = fig.add_subplot(1, panels, 2)
    if history:
        iters = [h["iteration"] for h in history]
        resolution = [h["resolution_A"] for h in history]
        ax.plot(iters, resolution, "o-", color="tab:blue", label="gold-standard")
        aligned = [h.get("alignment_resolution_A") for h in history]
        if all(a is not None for a in aligned):
            ax.plot(iters, aligned, ":", color="tab:blue", alpha=0.6, label="aligned to")
            ax.legend(loc="upper right", fontsize=7)
        # a range that matters: changes of a few hundredths of an Å should look like what they are
        low, high = min(resolution + [a for a in aligned if a is not None]), max(resolution + [a for a in aligned if a])
        span = max(high - low, 0.25 * high)
        ax.set_ylim(max(0.0, (low + high) / 2 - 0.6 * span), (low + high) / 2 + 0.6 * span)
        ax.annotate(f"{resolution[-1]:.2f} Å", (iters[-1], resolution[-1]), textcoords="offset points",
                    xytext=(-4, 6), ha="right", fontsize=8, color="tab:blue")
        ax.set_xlabel("iteration")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("resolution (Å)", color="tab:blue")
        twin = ax.twinx()
        changes = [(h["iteration"], h["pose_change_median_deg"]) for h in history if "pose_change_median_deg" in h]
        if changes:
            twin.plot(*zip(*changes), "s--", color="tab:red", label="median pose change")
            twin.set_ylabel("median pose change (°)", color="tab:red")
        if registration:
            iteration, angle, moved = (np.asarray(v) for v in zip(*registration))
            moved = moved.astype(bool)
            twin.plot(iteration[moved], angle[moved], "v", color="tab:orange", label="half-set 2 moved by")
            twin.plot(iteration[~moved], angle[~moved], "v", mfc="none", color="tab:orange",
                      label="half-sets apart (not moved)")
            twin.set_ylabel("° (red: pose change, orange: registration)")
            twin.legend(loc="center right", fontsize=6)
        ax.set_title("convergence", fontsize=9)
    if change_vs_input_deg is not None:
        ax = fig.add_subplot(1, panels, 3)
        change = np.asarray(change_vs_input_deg)
        ax.hist(change, bins=np.linspace(0, max(float(np.percentile(change, 99)), 1.0), 50), color="tab:gray")
        ax.axvline(np.median(change), color="tab:red", ls=":")
        ax.set_xlabel("pose change from input alignment (°)")
        ax.set_ylabel("particles")
        ax.set_title(f"median {np.median(change):.2f}°", fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()


POSE_CHANGE_FIGSIZE = (8.5, 3.4)


def plot_pose_change(rotation_change_deg, shift_change_A, rotation_extent_deg: float, shift_extent_A: float,
                     path: str, title: str = "Change from the input poses"):
    """Pose-change histograms (see :func:`draw_pose_change`) to ``path`` (PNG)."""
    fig = Figure(figsize=POSE_CHANGE_FIGSIZE, dpi=110)
    draw_pose_change(fig, rotation_change_deg, shift_change_A, rotation_extent_deg, shift_extent_A, title)
    _save(fig, path)


def draw_pose_change(fig, rotation_change_deg, shift_change_A, rotation_extent_deg: float, shift_extent_A: float,
                     title: str = "Change from the input poses"):
    """Histograms of each particle's rotation (°) and shift (Å) change from its input pose with
    the search extents marked (particles piled at an extent: the extents are too small), into ``fig``."""
    for i, (values, extent, label) in enumerate(((rotation_change_deg, rotation_extent_deg, "rotation change (°)"),
                                                 (shift_change_A, shift_extent_A, "shift change of the fulcrum (Å)"))):
        ax = fig.add_subplot(1, 2, i + 1)
        values = np.asarray(values, dtype=float)
        top = max(extent, float(values.max()) if values.size else 0.0, 1e-3) * 1.05
        ax.hist(values, bins=np.linspace(0, top, 42), color="tab:gray")
        ax.axvline(extent, color="tab:red", ls="--", label="extent")
        ax.axvline(np.median(values), color="tab:blue", ls=":", label=f"median {np.median(values):.2f}")
        at_limit = float(np.mean(values >= 0.95 * extent)) if values.size and extent > 0 else 0.0
        ax.set_title(f"{100 * at_limit:.1f}% at the extent", fontsize=9)
        ax.set_xlabel(label)
        ax.set_ylabel("particles")
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()


ABINITIO_FIGSIZE = (7.0, 4.2)


def draw_abinitio(fig, sgd_history, em_history=None, title: str = "Ab-initio"):
    """Resolution against iteration into ``fig``: per half-set the SGD's alignment resolution
    and its own quarter-set FSC resolution, the FSC of the two aligned half-maps (records of
    ``sgd_history``: ``iteration``, ``cutoff_A``, ``quarter_resolution_A`` (two each),
    ``half_map_resolution_A``), then the E/M refinement's gold-standard resolution
    (``em_history`` records of the refinement loop), placed after the last SGD iteration."""
    ax = fig.add_subplot(1, 1, 1)
    if sgd_history:
        it = [h["iteration"] for h in sgd_history]
        for half, color in ((0, "tab:blue"), (1, "tab:orange")):
            ax.plot(it, [h["cutoff_A"][half] for h in sgd_history], "-", color=color,
                    label=f"half-set {half + 1}: aligned to")
            ax.plot(it, [h["quarter_resolution_A"][half] for h in sgd_history], ":", color=color,
                    label=f"half-set {half + 1}: own quarter-set FSC")
        ax.plot(it, [h["half_map_resolution_A"] for h in sgd_history], "k.-", label="FSC of the aligned half-maps")
    last = sgd_history[-1]["iteration"] if sgd_history else 0
    if em_history:
        step = max(1, last // 20)
        x = [last + step * (i + 1) for i in range(len(em_history))]
        ax.plot(x, [h["resolution_A"] for h in em_history], "s-", color="tab:green",
                label="E/M refinement (gold-standard)")
        ax.annotate(f"{em_history[-1]['resolution_A']:.2f} Å", (x[-1], em_history[-1]["resolution_A"]),
                    textcoords="offset points", xytext=(-4, 6), ha="right", fontsize=8, color="tab:green")
        ax.axvline(last + step / 2, color="gray", lw=0.5)
    ax.set_yscale("log")
    ax.set_xlabel("SGD iteration (then E/M iterations)")
    ax.set_ylabel("resolution (Å)")
    ax.legend(fontsize=7, loc="upper right")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()


def plot_abinitio(sgd_history, path: str, em_history=None, title: str = "Ab-initio"):
    """:func:`draw_abinitio` to ``path`` (PNG)."""
    fig = Figure(figsize=ABINITIO_FIGSIZE, dpi=110)
    draw_abinitio(fig, sgd_history, em_history, title)
    _save(fig, path)


RELAX_FIGSIZE = (11.0, 3.6)


def draw_relaxation(fig, difference_map, change_deg=None, occupancy=None, group: str = "",
                    title: str = "Symmetry relaxation", mode_switch=None, agreement=None):
    """Into ``fig``: the central orthogonal slices of ``difference_map`` (N, N, N: the relaxed
    map minus its symmetrized version, red positive / blue negative), the histogram of each
    particle's angle between its relaxed and its input pose (``change_deg``), the fraction
    of particles in each of the group's modes (``occupancy``) and the fraction that changed mode
    at each iteration (``mode_switch``: [(iteration, fraction)]) with the agreement of the two
    half-maps' asymmetric parts (``agreement``: [(iteration, correlation)]): the convergence the
    job waits for (switching stopped falling, agreement stopped rising)."""
    d = np.asarray(difference_map)
    n = d.shape[0]
    limit = float(np.abs(d).max()) or 1.0
    panels = 3 + (change_deg is not None) + (occupancy is not None) + bool(mode_switch or agreement)
    for i, (plane, label) in enumerate(((d[n // 2], "xy (z = centre)"), (d[:, n // 2], "xz"), (d[:, :, n // 2], "yz"))):
        ax = fig.add_subplot(1, panels, i + 1)
        ax.imshow(plane, cmap="RdBu_r", vmin=-limit, vmax=limit, origin="lower")
        ax.set_title(f"difference map {label}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    k = 4
    if change_deg is not None:
        ax = fig.add_subplot(1, panels, k)
        change = np.asarray(change_deg)
        ax.hist(change, bins=np.linspace(0, 180, 61), color="tab:gray")
        ax.set_xlabel("relaxed vs input pose (°)")
        ax.set_ylabel("particles")
        ax.set_title(f"median {np.median(change):.1f}°", fontsize=8)
        k += 1
    if occupancy is not None:
        ax = fig.add_subplot(1, panels, k)
        ax.bar(np.arange(len(occupancy)), occupancy, color="tab:blue")
        ax.set_xlabel(f"{group} operator (mode)")
        ax.set_ylabel("fraction of particles")
        ax.set_title("mode occupancy", fontsize=8)
        k += 1
    if mode_switch or agreement:
        ax = fig.add_subplot(1, panels, k)
        if mode_switch:
            iterations, fractions = zip(*mode_switch)
            ax.plot(iterations, 100 * np.asarray(fractions), "o-", color="tab:red")
        ax.set_xlabel("iteration")
        ax.set_ylabel("particles that changed mode (%)", color="tab:red")
        ax.set_ylim(bottom=0)
        ax.set_title("mode switching, half-map agreement", fontsize=8)
        if agreement:
            twin = ax.twinx()
            iterations, values = zip(*agreement)
            twin.plot(iterations, values, "s--", color="tab:green")
            twin.set_ylabel("asymmetric parts' correlation", color="tab:green")
            twin.set_ylim(min(0.0, min(values)), 1.0)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()


def history_series(history: list, key: str) -> list:
    """[(iteration, value of ``key``)] from a job's per-iteration history, where recorded (e.g.
    ``mode_switch_fraction``, ``asymmetric_agreement``)."""
    return [(h["iteration"], h[key]) for h in history if key in h]


def plot_relaxation(difference_map, change_deg, occupancy, group: str, path: str,
                    title: str = "Symmetry relaxation", mode_switch=None, agreement=None):
    """:func:`draw_relaxation` to ``path`` (PNG)."""
    fig = Figure(figsize=RELAX_FIGSIZE, dpi=110)
    draw_relaxation(fig, difference_map, change_deg, occupancy, group, title, mode_switch, agreement)
    _save(fig, path)
