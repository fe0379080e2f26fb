#!/usr/bin/env python
"""Settle LEAP's open choices by experiment: a grid of options through the demo harness.

    python tools/ablate.py [--out results/ablation] [--seeds 0 1 2] [--only NAME ...] [--test]

Every variant is the demo's LEAP-CF run (configs/fastreid/Omniglot_LT/leap_cf.yml) with a few
config overrides, trained with tools/train_net.py on the validation protocol (OmniglotVal_LT:
query/gallery from validation characters carved out of the training characters), over the same
seeds, and measured with FastReID's evaluator and the angular analysis. The choice of defaults is
made on this table only; ``--test`` reruns a grid on the test characters to report, not to choose.
Finished runs are skipped on a re-run. Writes ablation.md and ablation.json.
"""
import argparse
import json
import os
import sys
import time

from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from demo import METRICS, REPO, analyse, fmt, train  # noqa: E402

# name -> (method config, overrides, the question it answers)
VARIANTS = {
    "CosFace (no LEAP)": ("cosface", [], "baseline"),
    "LEAP-CF (defaults)": ("leap_cf", [], "the configs' defaults"),
    "alpha per sample": ("leap_cf", ["MODEL.HEADS.LEAP.ALPHA_PER_LOGIT", "False"],
                         "alpha per (sample, logit) vs one per sample"),
    "target logit only": ("leap_cf", ["MODEL.HEADS.LEAP.TARGET_ONLY", "True"],
                          "alpha on every logit (Eq. 7/8) vs the target logit only"),
    "|alpha|": ("leap_cf", ["MODEL.HEADS.LEAP.SIGNED_ALPHA", "False"], "signed alpha ~ N(0, s^2) vs |alpha|"),
    "P = 2, min angles 6": ("leap_cf", ["MODEL.HEADS.LEAP.MEMORY_FACTOR", "2", "MODEL.HEADS.LEAP.MIN_ANGLES", "6"],
                            "how many angles before a class's variance is trusted"),
    "P = 4": ("leap_cf", ["MODEL.HEADS.LEAP.MEMORY_FACTOR", "4"], "memory factor P (Eq. 5)"),
    "gamma = 0.5": ("leap_cf", ["MODEL.HEADS.LEAP.CENTER_RATE", "0.5"], "centre rate gamma (Eq. 4)"),
    "Eq. 4 as printed": ("leap_cf", ["MODEL.HEADS.LEAP.CENTER_RATE_WEIGHTS", "previous_center"],
                         "gamma weighs the previous centre (Eq. 4 as printed) vs the batch mean"),
    "angles to previous centre": ("leap_cf", ["MODEL.HEADS.LEAP.ANGLE_REFERENCE", "previous_center"],
                                  "Eq. 3's centre after vs before this batch's Eq. 4 update"),
    "start epoch 4": ("leap_cf", ["MODEL.HEADS.LEAP.START_EPOCH", "4"], "when the cloud starts (Fig. 5)"),
    "start epoch 14": ("leap_cf", ["MODEL.HEADS.LEAP.START_EPOCH", "14"], "when the cloud starts (Fig. 5)"),
    "angles to W_y": ("leap_cf", ["MODEL.HEADS.LEAP.ANGLE_REFERENCE", "weight"],
                      "angles to the EMA centre (Eq. 3) vs to the class weight W_y"),
    "centres float16": ("leap_cf", ["MODEL.HEADS.LEAP.CENTER_DTYPE", "float16"],
                        "16-bit centre storage (the InsightFace default) vs float32"),
    "vanilla, T = 5": ("leap_cv", [], "full (Eq. 9) vs vanilla (Eq. 6)"),
}
# the default grid: the open choices of docs/choices.md, within 60 min on the 2-core CPU (~98 s a
# run); the others run with --only
EXTRA = ("centres float16", "vanilla, T = 5")
GRID = [name for name in VARIANTS if name not in EXTRA]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(REPO, "results", "ablation"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--only", nargs="+", choices=sorted(VARIANTS),
                    help=f"these variants instead of the default grid (not in it: {', '.join(EXTRA)})")
    ap.add_argument("--test", action="store_true", help="test characters instead of validation")
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args()
    out = os.path.abspath(args.out + ("-test" if args.test else ""))
    os.environ.setdefault("FASTREID_DATASETS", os.path.join(REPO, "datasets"))
    val = not args.test
    names = args.only or GRID
    runs = [(name, seed) for seed in args.seeds for name in names]
    results, analyses = {}, {}
    start = time.time()
    with tqdm(runs, desc="ablation", unit="run") as bar:
        for name, seed in bar:
            method, opts, _ = VARIANTS[name]
            run_dir = os.path.join(out, "runs", name.replace(" ", "_").replace("=", ""), f"seed{seed}")
            results[name, seed] = train(method, seed, run_dir, val, args.force, bar, opts)
            analyses[name, seed] = analyse(method, seed, run_dir, val, opts)

    headers = ["variant", "question", *(f"{m} (%)" for m in METRICS), "head ang. var", "tail ang. var"]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    table = {}
    for name in names:
        row = {m: [results[name, s][m] for s in args.seeds] for m in METRICS}
        row["head_var"] = [analyses[name, s]["summary"]["head"]["var_mean"] for s in args.seeds]
        row["tail_var"] = [analyses[name, s]["summary"]["tail"]["var_mean"] for s in args.seeds]
        table[name] = row
        cells = [name, VARIANTS[name][2]]
        lines.append("| " + " | ".join([*(c.replace("|", "\\|") for c in cells), *(fmt(row[m]) for m in METRICS),
                                          fmt(row["head_var"], digits=4), fmt(row["tail_var"], digits=4)]) + " |")
    protocol = "OmniglotVal_LT (validation)" if val else "Omniglot_LT (test)"
    text = (f"# LEAP ablation: {protocol}, <H20, S3>, mean ± std over seeds {args.seeds}\n\n"
            + "\n".join(lines) + f"\n\nWall time {(time.time() - start) / 60:.1f} min.\n")
    print("\n" + text)
    with open(os.path.join(out, "ablation.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out, "ablation.json"), "w") as f:
        json.dump({"protocol": protocol, "seeds": args.seeds, "variants": table}, f, indent=1)


if __name__ == "__main__":
    main()
