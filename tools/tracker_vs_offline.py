#!/usr/bin/env python
"""The tracker's sigma_i^2 at the end of training against the offline truth, per Eq. 4 reading.

    python tools/tracker_vs_offline.py RUNS_DIR [--out docs/tracker_vs_offline.png]

RUNS_DIR is a ``tools/ablate.py`` output's ``runs/`` folder: every ``VARIANT/seedN`` with a
``model_final.pth`` (LEAPHead's statistics are in it) and ``analysis/analysis.json`` (the
offline variance of the angles of ALL the class's training features to their mean, the paper's
ideal, from ``leap_plugin.analysis``). Prints, per variant, the mean tracker/offline ratio of
the head and tail classes over seeds, and plots tracker vs offline per class.
"""
import argparse
import glob
import json
import os

import matplotlib
import numpy as np
import torch

from leap_plugin.core import AngularStats

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def tracker_var(checkpoint):
    """[C] sigma_i^2 (``AngularStats.var``) of LEAPHead's statistics in ``checkpoint``."""
    prefix = "heads.stats."
    state = {k[len(prefix):]: v for k, v in
             torch.load(checkpoint, map_location="cpu", weights_only=False)["model"].items() if k.startswith(prefix)}
    counts = state["class_counts"]
    memory_factor = (state["memory"].numel() - 1) // int(counts.sum())  # Eq. 5: sum K_i * P slots + scratch
    stats = AngularStats(counts, state["centers"].shape[1], memory_factor, center_dtype=state["centers"].dtype)
    stats.load_state_dict(state)
    return stats.var.numpy()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs")
    ap.add_argument("--out", default="docs/tracker_vs_offline.png")
    args = ap.parse_args()
    variants = sorted(d for d in os.listdir(args.runs)
                      if glob.glob(os.path.join(args.runs, d, "seed*", "model_final.pth")))
    rows = {}
    for name in variants:
        with open(os.path.join(args.runs, name, "seed0", "config.yaml")) as f:
            if "LEAPHead" not in f.read():
                continue
        points, ratios = [], []
        for run in sorted(glob.glob(os.path.join(args.runs, name, "seed*"))):
            with open(os.path.join(run, "analysis", "analysis.json")) as f:
                classes = json.load(f)["classes"]
            offline = np.array(classes["var"], dtype=float)
            head = np.array(classes["is_head"], dtype=bool)
            tracked = tracker_var(os.path.join(run, "model_final.pth"))[np.array(classes["label"])]
            points.append((offline, tracked, head))
            ratios.append([np.nanmean(tracked[h]) / np.nanmean(offline[h]) for h in (head, ~head)])
        rows[name] = (np.array(ratios), points)
    print("| variant | tracker / offline, head | tracker / offline, tail | head/tail ratio, tracker / offline |")
    print("|---|---|---|---|")
    for name, (r, _) in rows.items():
        print(f"| {name} | {r[:, 0].mean():.2f} ({', '.join(f'{x:.2f}' for x in r[:, 0])}) | "
              f"{r[:, 1].mean():.2f} ({', '.join(f'{x:.2f}' for x in r[:, 1])}) | {(r[:, 0] / r[:, 1]).mean():.2f} |")
    fig, axes = plt.subplots(1, len(rows), figsize=(4.2 * len(rows), 4), squeeze=False)
    for ax, (name, (_, points)) in zip(axes[0], rows.items()):
        for seed, (offline, tracked, head) in enumerate(points):
            ax.scatter(offline[head], tracked[head], s=8, c="tab:red", alpha=0.6, label=None if seed else "head")
            ax.scatter(offline[~head], tracked[~head], s=8, c="tab:green", alpha=0.6,
                       label=None if seed else "tail")
        top = max(np.nanmax(p[0]) for p in points) * 1.1
        ax.plot([0, top], [0, top], "k--", lw=0.8, label="y = x")
        ax.set(title=name.replace("_", " "), xlabel="offline sigma_i^2 (all features, rad^2)",
               ylabel="tracker sigma_i^2 at the end (rad^2)")
    axes[0][0].legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
