#!/usr/bin/env python
"""Golden outputs of LEAP at fixed seeds, to prove a refactor changes no number (bit for bit).

    python tools/golden.py record golden-before.pt      # on the old tree
    python tools/golden.py record golden-after.pt       # on the new tree
    python tools/golden.py compare golden-before.pt golden-after.pt

Recorded: the angular statistics (every buffer and the returned angles, all readings of Eq. 3 /
Eq. 4, with and without a reference), alpha draws (torch RNG and keyed), the margin logits of
Eq. 7 / 8 and their gradients, the InsightFace loss's losses and gradients over a few steps inside
arcface_torch's real ``PartialFC_V2`` (found as the face tools find it,
``leap_plugin.insightface.host.locate_arcface_torch``; skipped, saying so, otherwise), and a short
FastReID run's training log values and final metrics (``tools/train_net.py`` on the Omniglot
long-tailed split, CPU, 3 epochs). ``compare`` exits 1
unless every entry of the first file exists in the second and is bitwise equal.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def stats_outputs(out):
    from leap_plugin.core import AngularStats
    for weights in ("batch_mean", "previous_center"):
        for angles_to in ("updated_center", "previous_center"):
            for use_ref in (False, True):
                gen = torch.Generator().manual_seed(1)
                counts = torch.randint(1, 9, (23,), generator=gen)
                stats = AngularStats(counts, 16, memory_factor=2, center_rate=0.1, sync=False,
                                     center_rate_weights=weights, angles_to=angles_to)
                name = f"stats/{weights}/{angles_to}/{'ref' if use_ref else 'centre'}"
                for step in range(12):
                    feats = torch.randn(19, 16, generator=gen)
                    labels = torch.randint(-1, 23, (19,), generator=gen)
                    feats[3] = feats[2]
                    labels[3] = labels[2]  # an exact repeat
                    ref = torch.randn(19, 16, generator=gen) if use_ref else None
                    out[f"{name}/angles{step}"] = stats.update(feats, labels, ref)
                for key, value in stats.state_dict().items():
                    out[f"{name}/state/{key}"] = value
                out[f"{name}/var"], out[f"{name}/mean"] = stats.var, stats.mean


def cloud_outputs(out):
    from leap_plugin.core import AngularStats, FeatureCloud
    gen = torch.Generator().manual_seed(2)
    counts = torch.tensor([9, 9, 8, 3, 3, 2, 2, 1, 9, 4])
    stats = AngularStats(counts, 8, sync=False)
    for _ in range(20):
        stats.update(torch.randn(16, 8, generator=gen), torch.randint(0, 10, (16,), generator=gen))
    labels = torch.tensor([0, 3, 4, 5, 6, 7, -1, 9, 1, 2])
    for version, threshold in (("full", None), ("vanilla", 5)):
        for per_logit in (True, False):
            for target_only in (False, True):
                for signed in (True, False):
                    cloud = FeatureCloud(version, threshold, per_logit, target_only, signed)
                    key = f"cloud/{version}/{per_logit}/{target_only}/{signed}"
                    out[key + "/ref"] = cloud.reference_var(stats)
                    out[key + "/std"] = cloud.std(stats, labels)
                    out[key + "/alpha"] = cloud.sample(stats, labels, torch.Generator().manual_seed(3))


def logits_outputs(out):
    from leap_plugin.core import leap_logits
    gen = torch.Generator().manual_seed(4)
    for margin, value in (("cos", 0.35), ("arc", 0.5)):
        for shape in ((6, 1), (6, 9), None):
            for straight in (False, True):
                w = torch.nn.functional.normalize(torch.randn(9, 5, generator=gen), dim=1)
                x = torch.nn.functional.normalize(torch.randn(6, 5, generator=gen), dim=1)
                w.requires_grad_(True)
                cosine = x @ w.t()
                labels = torch.tensor([0, 8, -1, 3, 3, 5])
                alpha = None if shape is None else (torch.randn(*shape, generator=gen) * 0.7).requires_grad_(True)
                logits = leap_logits(cosine, labels, alpha, margin, 64.0, value, straight_through=straight)
                (logits * torch.randn(6, 9, generator=gen)).sum().backward()
                key = f"logits/{margin}/{shape}/{straight}"
                out[key] = logits.detach()
                out[key + "/grad_w"] = w.grad
                if alpha is not None:
                    out[key + "/grad_alpha"] = alpha.grad


def keyed_outputs(out):
    from leap_plugin.core.noise import keyed_normal
    out["keyed/table"] = keyed_normal(12345, torch.arange(7), torch.arange(100, 140))
    out["keyed/column"] = keyed_normal(2 ** 40 + 7, torch.arange(3, 11))


def face_outputs(out, arcface):
    from leap_plugin.insightface import LEAPMarginLoss, compat

    sys.path.insert(0, str(arcface))
    compat.apply()  # the host on this machine (CPU: PartialFC_V2's .cuda() calls stay on the CPU)
    from partial_fc_v2 import PartialFC_V2
    if not torch.distributed.is_initialized():  # PartialFC_V2 needs a process group: one gloo rank
        store = torch.distributed.HashStore()
        torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    cases = {"cv": dict(margin_list=(1.0, 0.0, 0.35), version="vanilla", head_threshold=4),
             "af_st": dict(margin_list=(1.0, 0.5, 0.0), straight_through=True),
             "af_weight": dict(margin_list=(1.0, 0.5, 0.0), angle_reference="weight", update_every=1),
             "cf_sampled": dict(margin_list=(1.0, 0.0, 0.35), sample_rate=0.5, update_every=2),
             "cf_target_unsigned": dict(margin_list=(1.0, 0.0, 0.35), target_only=True, signed_alpha=False,
                                        alpha_per_logit=False, angle_reference="updated_center",
                                        center_dtype="float32")}
    for name, options in cases.items():
        options = dict(options)
        margin_list, sample_rate = options.pop("margin_list"), options.pop("sample_rate", 1.0)
        torch.manual_seed(5)
        gen = torch.Generator().manual_seed(6)
        counts = torch.tensor([12] * 5 + [3] * 25)
        loss = LEAPMarginLoss.from_margin_list(margin_list, 64.0, counts, 16, start_epoch=1, seed=3, **options)
        pfc = PartialFC_V2(loss, 16, 30, sample_rate, False)
        loss.attach(pfc)
        backbone = torch.nn.Linear(24, 16)
        opt = torch.optim.SGD(list(backbone.parameters()) + list(pfc.parameters()), lr=0.1)
        for step in range(16):
            loss.set_epoch(step // 8)
            x = torch.randn(20, 24, generator=gen)
            y = torch.randint(0, 30, (20,), generator=gen)
            value = pfc(backbone(x), y)
            opt.zero_grad()
            value.backward()
            out[f"face/{name}/loss{step}"] = value.detach()
            out[f"face/{name}/grad{step}"] = backbone.weight.grad.clone()
            opt.step()
        for key, value in loss.state_dict().items():
            if torch.is_tensor(value):
                out[f"face/{name}/state/{key}"] = value
    sys.path.remove(str(arcface))


def fastreid_outputs(out):
    with tempfile.TemporaryDirectory() as tmp:
        config = REPO / "configs" / "fastreid" / "Omniglot_LT" / "leap_cf.yml"
        cmd = [sys.executable, str(REPO / "tools" / "train_net.py"), "--config-file", str(config),
               "SEED", "0", "DATASETS.LONG_TAIL.SEED", "0", "OUTPUT_DIR", tmp, "MODEL.DEVICE", "cpu",
               "SOLVER.MAX_EPOCH", "3", "MODEL.HEADS.LEAP.START_EPOCH", "1", "SOLVER.STEPS", "[2]",
               "TEST.EVAL_PERIOD", "3", "DATALOADER.NUM_WORKERS", "0"]
        env = dict(os.environ, FASTREID_DATASETS=os.environ.get("FASTREID_DATASETS", str(REPO / "datasets")))
        proc = subprocess.run(cmd, cwd=str(REPO), env=env, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"FastReID run failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
        with open(os.path.join(tmp, "metrics.json")) as f:
            for i, line in enumerate(f):
                for key, value in sorted(json.loads(line).items()):
                    if "time" not in key and "eta" not in key:
                        out[f"fastreid/log{i}/{key}"] = torch.tensor(value, dtype=torch.float64)
        with open(os.path.join(tmp, "final_results.json")) as f:
            for key, value in json.load(f).items():
                out[f"fastreid/final/{key}"] = torch.tensor(value, dtype=torch.float64)


def record(path, insightface_root, skip_fastreid):
    out = {}
    stats_outputs(out)
    cloud_outputs(out)
    logits_outputs(out)
    keyed_outputs(out)
    from leap_plugin.insightface.host import locate_arcface_torch
    try:
        face_outputs(out, locate_arcface_torch(insightface_root))
    except FileNotFoundError as error:
        print(f"face loss not recorded: {error}")
    if not skip_fastreid:
        fastreid_outputs(out)
    torch.save(out, path)
    print(f"{len(out)} entries -> {path}")


def _same(a, b) -> bool:
    """Equal dtype, shape and values, NaN where the other has NaN."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point():
        return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0))
    return torch.equal(a, b)


def compare(before, after):
    old, new = torch.load(before), torch.load(after)
    bad = [key for key in old if key not in new or not _same(old[key], new[key])]
    for key in bad[:40]:
        print("DIFFERS:", key, "missing" if key not in new else f"{old[key].flatten()[:4]} vs {new[key].flatten()[:4]}")
    print(f"{len(old) - len(bad)} of {len(old)} entries bit-identical")
    return 1 if bad else 0


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("record")
    rec.add_argument("path")
    rec.add_argument("--insightface-root", help="arcface_torch or an insightface checkout (default: "
                                                "$INSIGHTFACE_ROOT, else ~/.cache/leap-plugin/insightface)")
    rec.add_argument("--skip-fastreid", action="store_true")
    cmp = sub.add_parser("compare")
    cmp.add_argument("before")
    cmp.add_argument("after")
    args = parser.parse_args()
    if args.command == "record":
        record(args.path, args.insightface_root, args.skip_fastreid)
    else:
        sys.exit(compare(args.before, args.after))


if __name__ == "__main__":
    main()
