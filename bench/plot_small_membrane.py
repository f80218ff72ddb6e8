"""Data-efficiency plot of bench_small_membrane.py results (Punjani, Zhang & Fleet 2020, Fig. 6 style):
per SNR, the protein's FSC 0.5 vs truth (1/Å) and the median pose error (after one global
rotation) against the particle count, one line per variant, the oracle and the truth-aligned
floor where present.

    python bench/plot_small_membrane.py RESULTS.json [RESULTS.json ...] --out PLOT.png
"""
from __future__ import annotations

import argparse
import json


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", help="RESULTS.json of bench_small_membrane.py")
    parser.add_argument("--out", required=True, help="PNG")
    args = parser.parse_args(argv)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs = {}
    for path in args.results:
        with open(path) as handle:
            for snr, by_count in json.load(handle)["runs"].items():
                for count, rows in by_count.items():      # several files may hold rows of one count
                    runs.setdefault(snr, {}).setdefault(count, {}).update(rows)
    fig, axes = plt.subplots(2, len(runs), figsize=(5 * len(runs), 7.5), dpi=110, squeeze=False)
    every = sorted({name for by_count in runs.values() for rows in by_count.values() for name in rows})
    color = {name: f"C{i % 10}" for i, name in enumerate(n for n in every if n not in ("oracle", "aligned to the truth"))}
    for col, (snr, by_count) in enumerate(sorted(runs.items())):
        counts = sorted(by_count, key=int)
        names = sorted({name for rows in by_count.values() for name in rows})
        for name in names:
            xs = [int(c) for c in counts if name in by_count[c]]
            rows = [by_count[c][name] for c in counts if name in by_count[c]]
            style = {"oracle": "k:", "aligned to the truth": "k--"}.get(name, "o-")
            kw = {"color": color[name]} if name in color else {}
            axes[0, col].plot(xs, [1 / r["fsc05_A"] for r in rows], style, label=name, **kw)
            if name != "oracle":      # runs from before the one-global-rotation error: the raw error, marked so
                axes[1, col].plot(xs, [r.get("pose_error_joint_registered_median_deg", r["pose_error_median_deg"])
                                       for r in rows], style, **kw,
                                  label=name if "pose_error_joint_registered_median_deg" in rows[0] else name + " (raw)")
        for row, label in ((0, "protein FSC 0.5 vs truth (1/Å)"), (1, "median pose error after one global rotation (°)")):
            axes[row, col].set_xscale("log")
            axes[row, col].set_xlabel("particles")
            axes[row, col].set_ylabel(label)
            axes[row, col].set_title(f"SNR {snr}")
            axes[row, col].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out)


if __name__ == "__main__":
    main()
