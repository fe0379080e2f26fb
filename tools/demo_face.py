"""The face main job (``tools/demo.py --face``): CosFace vs LEAP-CV trained by arcface_torch's own
``train_v2.py`` on a long-tailed Omniglot face set, 3 seeds, verification on unseen characters.

    python tools/demo.py --face [--val] [--seeds 0 1 2] [--out results/demo-face] [--force]

Data (``leap_plugin.insightface.omniglot``): characters are identities, drawings their images at
112 x 112; ``train.rec`` holds the training characters, cut per seed by the paper's <H, T> rule
(``make_longtail_rec``: the H largest identities whole, the next T cut to 5 images, the rest left
out); the ``.bin`` holds same / different pairs of characters never trained on (test characters, or
with ``--val`` validation characters, where the settings below were chosen). Each run is
``tools/train_arcface_leap.py`` (train_v2.py unmodified); then the 10-fold verification accuracy and
TAR at FAR 1% of the final ``model.pt`` on the pairs (flip-augmented embeddings, as arcface_torch).
Finished runs are skipped on a re-run (``--force`` reruns them).
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from tqdm import tqdm

from leap_plugin.analysis import mean_ci, mean_std
from leap_plugin.insightface.host import load_backbone, locate_arcface_torch, write_config
from leap_plugin.insightface.ms1m import make_longtail_rec
from leap_plugin.insightface.omniglot import make_omniglot_face
from leap_plugin.insightface.verification import embed, load_bin, tar_at_far, verification_accuracy

REPO = Path(__file__).resolve().parents[1]
NUM_HEAD, NUM_TAIL, TAIL_IMAGES = 20, 40, 5  # <H20, T40>, 5 images per tail character
FAR = 0.01
#: arcface_torch settings of every run (train_v2 fixes s = 64); the rest is its configs/base.py
TRAIN = dict(network="mbf", embedding_size=128, batch_size=32, optimizer="sgd", lr=0.1, weight_decay=5e-4,
             num_epoch=3, warmup_epoch=0, fp16=False, sample_rate=1.0, frequent=6, verbose=10 ** 9,
             save_all_states=True, num_workers=2, dali=False, margin_list=(1.0, 0.0, 0.35))
#: LEAP-CV (the paper's face version: vanilla, CosFace); start_epoch chosen on validation characters
LEAP = dict(version="vanilla", head_threshold=TAIL_IMAGES, update_every=1, memory_factor=1, center_rate=0.1,
            angle_reference="previous_center")
START_EPOCH = 2  # validation characters, seed 0: accuracy 76.7 (start 2) vs 75.3 (start 1), CosFace 78.0
VAL_START_EPOCHS = (1, 2)


def face_data(out: Path, split: str, seed: int):
    """(long-tailed train.rec folder of this seed, .bin path)."""
    source = make_omniglot_face(out / "data" / f"{split}_source", split)
    lt = out / "data" / f"{split}_H{NUM_HEAD}_T{NUM_TAIL}_seed{seed}"
    if not (lt / "train.idx").is_file():
        make_longtail_rec(source["rec"], lt, num_head=NUM_HEAD, num_tail=NUM_TAIL, tail_images=TAIL_IMAGES,
                          seed=seed, progress=False)
    return lt, Path(source["bin"])


def train(run_dir: Path, rec: Path, seed: int, leap, force: bool, arcface: Path) -> Path:
    """One train_v2 run through tools/train_arcface_leap.py; returns its model.pt."""
    done = run_dir / "model.pt"
    if done.is_file() and (run_dir / "train.done").is_file() and not force:
        return done
    run_dir.mkdir(parents=True, exist_ok=True)
    config = write_config(run_dir / "face_config.py", **TRAIN, seed=seed, rec=str(rec), output=str(run_dir),
                          num_classes=NUM_HEAD + NUM_TAIL, num_image=None, val_targets=[], leap=leap)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    with open(run_dir / "train.log", "w") as log:
        proc = subprocess.run([sys.executable, str(REPO / "tools" / "train_arcface_leap.py"),
                               "--insightface-root", str(arcface), str(config)],
                              stdout=log, stderr=subprocess.STDOUT, env=env, cwd=run_dir)
    if proc.returncode != 0:
        raise SystemExit(f"training in {run_dir} failed (exit {proc.returncode}); see {run_dir / 'train.log'}")
    (run_dir / "train.done").write_text("")
    return done


def evaluate(model_path: Path, bin_path: Path, arcface: Path) -> dict:
    """10-fold accuracy and TAR@FAR of the trained backbone on the .bin pairs (flip-augmented)."""
    model = load_backbone(arcface, TRAIN["network"], TRAIN["embedding_size"], model_path)
    images, issame = load_bin(bin_path)
    embeddings = embed(model, images)
    tar, far = tar_at_far(embeddings, issame, FAR)
    return {"accuracy": 100 * verification_accuracy(embeddings, issame).accuracy, "tar": 100 * tar,
            "far": 100 * far}


def runs_of(val: bool, seeds):
    """(name, method, leap options or None, seed) of every run of the grid."""
    grid = [("cosface", "cosface", None)]
    for start in (VAL_START_EPOCHS if val else (START_EPOCH,)):
        grid.append((f"leap_cv_start{start}", "leap_cv", dict(LEAP, start_epoch=start)))
    return [(name, method, leap, seed) for seed in seeds for name, method, leap in grid]


def main(out, seeds, val: bool, force: bool) -> None:
    out = Path(out + ("-val" if val else ""))
    try:
        arcface = locate_arcface_torch()
    except FileNotFoundError as error:
        raise SystemExit(f"demo --face: {error}") from None
    split = "val" if val else "test"
    results = {}
    start = time.time()
    with tqdm(runs_of(val, seeds), desc="face runs", unit="run") as bar:
        for name, method, leap, seed in bar:
            bar.set_postfix_str(f"{name} seed {seed}")
            rec, bin_path = face_data(out, split, seed)
            run_dir = out / "runs" / name / f"seed{seed}"
            scores = run_dir / "scores.json"
            if force or not scores.is_file():
                model = train(run_dir, rec, seed, leap, force, arcface)
                scores.write_text(json.dumps(evaluate(model, bin_path, arcface)))
            results[name, seed] = json.loads(scores.read_text())
    report(out, split, seeds, results, time.time() - start)


def _label(name: str) -> str:
    return "CosFace" if name == "cosface" else f"LEAP-CV, cloud from epoch {name.rsplit('start', 1)[1]}"


def _ci(half: float, mean: float) -> str:
    return "n/a (1 seed)" if half != half else f"[{mean - half:+.1f}, {mean + half:+.1f}]"


def report(out: Path, split: str, seeds, results: dict, seconds: float) -> str:
    names = sorted({name for name, _ in results}, key=lambda n: (n != "cosface", n))
    metrics = (("accuracy", "accuracy (%)"), ("tar", f"TAR@FAR={FAR:.0%} (%)"))
    lines = ["| method | " + " | ".join(label for _, label in metrics) + " |", "|---|---|---|"]
    for name in names:
        cells = [("{:.1f} ± {:.1f}".format(*mean_std([results[name, s][key] for s in seeds]))) for key, _ in metrics]
        lines.append(f"| {_label(name)} | " + " | ".join(cells) + " |")
    lines += ["", "Per seed, LEAP-CV minus CosFace (seeds " + " / ".join(map(str, seeds))
              + "; mean and 95% t-interval over the paired seeds):", "",
              "| method | metric | differences | mean | 95% CI |", "|---|---|---|---|---|"]
    for name in names[1:]:
        for key, label in metrics:
            diffs = [results[name, s][key] - results["cosface", s][key] for s in seeds]
            mean, half, _ = mean_ci(diffs)
            lines.append(f"| {_label(name)} | {label} | " + " / ".join(f"{d:+.1f}" for d in diffs)
                         + f" | {mean:+.1f} | {_ci(half, mean)} |")
    text = (f"# Face job: Omniglot {split} characters, <H{NUM_HEAD}, T{NUM_TAIL}> (tail: {TAIL_IMAGES} "
            f"images), arcface_torch train_v2, mean ± std over seeds {list(seeds)}\n\n" + "\n".join(lines)
            + f"\n\nWall time {seconds / 60:.1f} min.\n")
    print("\n" + text)
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps(
        {"split": split, "seeds": list(seeds), "far": FAR,
         "runs": {f"{name}/seed{seed}": value for (name, seed), value in results.items()}}, indent=1))
    return text
