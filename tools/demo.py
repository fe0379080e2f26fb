#!/usr/bin/env python
"""The main job: FastReID's CosFace baseline vs LEAP-CF on a real long-tailed split, 3 seeds.

    python tools/demo.py [--out results/demo] [--seeds 0 1 2] [--arcface] [--val] [--force]
    python tools/demo.py --face [--val] ...    # the face job: arcface_torch's train_v2 (tools/demo_face.py)

Each run is ``tools/train_net.py`` with a config from configs/fastreid/Omniglot_LT/ (FastReID's
trainer, sampler and evaluator; the seed sets both the long-tailed split and the training RNGs, so
baseline and LEAP of one seed train on the same images). Finished runs are skipped on a re-run
(``--force`` reruns them; an interrupted run resumes from its last checkpoint). Then the
angular analysis of each trained model on its training classes (paper Section 1), and
``results.md``, ``results.json`` and PNG plots in the output folder.

``--val`` runs the same grid on the validation protocol (OmniglotVal_LT: query/gallery from
validation characters carved out of the training characters): that is where hyper-parameters are
chosen, never on the test characters.
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tools"))

from leap_plugin.analysis import mean_std  # noqa: E402

METHODS = {"cosface": "CosFace", "leap_cf": "LEAP-CF", "arcface": "ArcFace", "leap_af": "LEAP-AF"}
METRICS = ("Rank-1", "mAP", "mINP")
_ITER = re.compile(r"epoch/iter: (\d+)/(\d+)")


def run_opts(seed, out_dir, val):
    opts = ["SEED", str(seed), "DATASETS.LONG_TAIL.SEED", str(seed), "OUTPUT_DIR", out_dir,
            "MODEL.DEVICE", "cuda" if torch.cuda.is_available() else "cpu"]
    if val:
        opts += ["DATASETS.NAMES", '("OmniglotVal_LT",)', "DATASETS.TESTS", '("OmniglotVal",)']
    return opts


def train(method, seed, out_dir, val, force, bar, extra_opts=()):
    """Train + evaluate one run with tools/train_net.py; returns its final_results.json.

    ``extra_opts``: more KEY VALUE config overrides (tools/ablate.py's options).
    """
    done = os.path.join(out_dir, "final_results.json")
    if force and os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    if not os.path.exists(done):
        os.makedirs(out_dir, exist_ok=True)
        config = os.path.join(REPO, "configs", "fastreid", "Omniglot_LT", f"{method}.yml")
        resume = ["--resume"] if os.path.exists(os.path.join(out_dir, "last_checkpoint")) else []
        cmd = [sys.executable, os.path.join(REPO, "tools", "train_net.py"), "--config-file", config, *resume,
               *run_opts(seed, out_dir, val), *extra_opts]
        with open(os.path.join(out_dir, "train.log"), "w") as log:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
            for line in proc.stdout:
                log.write(line)
                match = _ITER.search(line)
                if match:
                    bar.set_postfix_str(f"{METHODS[method]} seed {seed} iter {int(match.group(2)) + 1}")
            if proc.wait() != 0:
                raise SystemExit(f"training {METHODS[method]} seed {seed} failed (exit {proc.returncode}); "
                                 f"see {log.name}")
        for name in os.listdir(out_dir):  # keep model_final.pth only (45 MB each)
            if name.startswith("model_") and name != "model_final.pth":
                os.remove(os.path.join(out_dir, name))
    with open(done) as f:
        return json.load(f)


def analyse(method, seed, run_dir, val, extra_opts=()):
    """Angular statistics of a trained model on its training classes (tools/analyze.py)."""
    from leap_plugin.fastreid.analysis import analyze_run, setup
    summary_path = os.path.join(run_dir, "analysis", "analysis.json")
    if not os.path.exists(summary_path):
        config = os.path.join(REPO, "configs", "fastreid", "Omniglot_LT", f"{method}.yml")
        cfg = setup(config, [*run_opts(seed, run_dir, val), *extra_opts])
        analyze_run(cfg, os.path.join(run_dir, "model_final.pth"), os.path.join(run_dir, "analysis"))
    with open(summary_path) as f:
        return json.load(f)


def fmt(values, scale=1.0, digits=1):
    m, s = mean_std([v * scale for v in values])
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="output folder (default results/demo, --face: results/demo-face)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--arcface", action="store_true", help="also ArcFace and LEAP-AF")
    ap.add_argument("--val", action="store_true", help="validation protocol (hyper-parameter choice)")
    ap.add_argument("--force", action="store_true", help="rerun finished runs")
    ap.add_argument("--face", action="store_true",
                    help="the face job instead: CosFace vs LEAP-CV with arcface_torch's train_v2 (demo_face.py)")
    args = ap.parse_args()
    if args.face:
        import demo_face
        return demo_face.main(args.out or os.path.join(REPO, "results", "demo-face"), args.seeds, args.val,
                              args.force)
    args.out = args.out or os.path.join(REPO, "results", "demo")
    out = os.path.abspath(args.out + ("-val" if args.val else ""))
    os.makedirs(out, exist_ok=True)
    os.environ.setdefault("FASTREID_DATASETS", os.path.join(REPO, "datasets"))

    import leap_plugin.fastreid  # noqa: F401  (prepares Omniglot once, before the runs)
    from fastreid.data.datasets import DATASET_REGISTRY
    DATASET_REGISTRY.get("Omniglot")(root=os.environ["FASTREID_DATASETS"])

    methods = ["cosface", "leap_cf"] + (["arcface", "leap_af"] if args.arcface else [])
    runs = [(m, s) for s in args.seeds for m in methods]
    results, analyses = {}, {}
    start = time.time()
    with tqdm(runs, desc="training", unit="run") as bar:
        for method, seed in bar:
            run_dir = os.path.join(out, "runs", method, f"seed{seed}")
            results[method, seed] = train(method, seed, run_dir, args.val, args.force, bar)
            analyses[method, seed] = analyse(method, seed, run_dir, args.val)

    report(out, methods, args.seeds, results, analyses, args.val, time.time() - start)


def report(out, methods, seeds, results, analyses, val, seconds):
    from leap_plugin.analysis import plot_angle_distributions, plot_tsne, plot_variance_bars

    rows, table = [], {}
    for m in methods:
        head = [analyses[m, s]["summary"]["head"]["var_mean"] for s in seeds]
        tail = [analyses[m, s]["summary"]["tail"]["var_mean"] for s in seeds]
        entry = {k: [results[m, s][k] for s in seeds] for k in METRICS}
        entry.update(head_var=head, tail_var=tail)
        table[METHODS[m]] = entry
        rows.append([METHODS[m]] + [fmt(entry[k]) for k in METRICS] + [fmt(head, digits=3), fmt(tail, digits=3)])
    headers = ["method", "Rank-1 (%)", "mAP (%)", "mINP (%)", "head ang. var", "tail ang. var"]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    protocol = "OmniglotVal_LT (validation characters)" if val else "Omniglot_LT (test characters)"
    text = (f"# LEAP demo: {protocol}, <H20, S3>, mean ± std over seeds {seeds}\n\n" + "\n".join(lines)
            + f"\n\nRank-1 / mAP / mINP from FastReID's evaluator; angular variance (rad^2) of the "
            f"training classes' features around their class centres (head: the 20 whole classes, "
            f"tail: the classes cut to 3 images). Wall time {seconds / 60:.1f} min.\n")
    print("\n" + text)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"protocol": protocol, "seeds": seeds, "methods": table}, f, indent=1)

    first = seeds[0]
    npz = {m: np.load(os.path.join(out, "runs", m, f"seed{first}", "analysis", "angles.npz")) for m in methods}
    plot_angle_distributions({METHODS[m]: (npz[m]["angles"], npz[m]["is_head"]) for m in methods},
                             os.path.join(out, "angles.png"))
    plot_variance_bars({METHODS[m]: analyses[m, first]["summary"] for m in methods},
                       os.path.join(out, "variance.png"))
    for m in methods:
        plot_tsne(npz[m]["features"], npz[m]["labels"], npz[m]["class_is_head"],
                  os.path.join(out, f"tsne_{m}.png"))
    print(f"wrote {out}/results.md, results.json, angles.png, variance.png, tsne_*.png")


if __name__ == "__main__":
    main()
