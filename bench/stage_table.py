"""Per-stage seconds of refinement jobs, from their fsc.json (per-iteration ``stage_seconds``,
written by ``cryocv refine``) and job.json (wall time): one markdown table per job, the
iterations as rows, plus particle-iterations/s in the passes and end to end.

    python bench/stage_table.py JOB_DIR [JOB_DIR ...] [--label NAME ...] --out TABLE.md
"""
from __future__ import annotations

import argparse
import json
import os
import re


def _outside_passes(job_dir: str) -> dict:
    """The startup, setup and output lines of run.log (seconds per step), where the job logs them."""
    found = {}
    path = os.path.join(job_dir, "run.log")
    if not os.path.exists(path):
        return found
    for line in open(path):
        text = line.split("  ", 1)[-1].strip()
        for key in ("startup:", "setup:"):
            if text.startswith(key):
                found[key[:-1]] = text[len(key):].strip()
        if text.startswith("done:") and "written in" in text:
            found["outputs"] = text.split("written in", 1)[1].split("; job")[0].strip()
    return found


def _seconds(text: str) -> float:
    """Sum of the 'N.NN s' figures in a run.log step line."""
    return sum(float(x) for x in re.findall(r"(\d+(?:\.\d+)?) s\b", text))


def job_table(job_dir: str, label: str) -> str:
    with open(os.path.join(job_dir, "fsc.json")) as handle:
        report = json.load(handle)
    with open(os.path.join(job_dir, "job.json")) as handle:
        wall = json.load(handle)["wall_time_s"]
    iterations = report["iterations"]
    stages = []
    for it in iterations:
        stages += [name for name in it.get("stage_seconds", {}) if name not in stages]
    lines = [f"### {label}", "", f"{report['n_particles']} particles, {report['regularizer']}, {report['symmetry']}, "
             f"{len(iterations)} passes; job wall time {wall:.1f} s", "",
             "| iteration | pass (s) | " + " | ".join(stages) + " |", "|---" * (len(stages) + 2) + "|"]
    for it in iterations:
        row = [str(it["iteration"]) + (" (final)" if it["final"] else ""), f"{it['pass_seconds']:.2f}"]
        row += [f"{it.get('stage_seconds', {}).get(name, 0):.2f}" for name in stages]
        lines.append("| " + " | ".join(row) + " |")
    outside = _outside_passes(job_dir)
    if outside:
        lines += ["", "Outside the iterations: " + "; ".join(f"{k}: {v}" for k, v in outside.items())]
    pass_s = sum(it["pass_seconds"] for it in iterations)
    staged = sum(sum(it.get("stage_seconds", {}).values()) for it in iterations)
    outside_s = sum(_seconds(outside.get(key, "")) for key in ("startup", "setup"))
    outputs = re.match(r"\s*(\d+(?:\.\d+)?) s", outside.get("outputs", ""))   # its total comes first
    outside_s += float(outputs.group(1)) if outputs else 0.0
    lines += ["", f"Not in any timed step: {wall - staged - outside_s:.1f} s of the job's {wall:.1f} s "
                  f"(timed: {staged:.1f} s in the iterations, {outside_s:.1f} s before and after them)"]
    n = report["n_particles"] * len(iterations)
    lines += ["", f"particle-iterations/s: {n / pass_s:.0f} in the passes, {n / wall:.0f} end to end "
                  f"({100 * pass_s / wall:.0f} % of the job in the passes)", ""]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("jobs", nargs="+")
    parser.add_argument("--label", action="append", help="one per job (default: the folder)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    labels = args.label or [os.path.basename(os.path.normpath(j)) for j in args.jobs]
    text = "\n".join(job_table(job, label) for job, label in zip(args.jobs, labels))
    with open(args.out, "w") as handle:
        handle.write(text)
    print(text)


if __name__ == "__main__":
    main()
