"""Memory of the LEAP statistics against the classifier weight, per rank, up to a million classes.

What a rank holds for LEAP (InsightFace ``LEAPMarginLoss`` under PartialFC_V2's class split):

* ``AngularStats`` over its own class block ``class_block(C, rank, R)`` (``sync=False``):
  centres [n, D] (float16 by default, ``--center-dtype``), the angle memory sum(K_i * P) + 1
  float32, and per-class counters (class_counts, memory_size, memory_offset, num_written: int64;
  angle_sum, angle_sq_sum: float64);
* nothing over all C classes: the reference variance and the rows' sigma_y are all-reduced per
  step (2 B + 2 numbers), not kept.

FastReID's ``LEAPHead`` is the single-rank case (R = 1; float32 centres unless
MODEL.HEADS.LEAP.CENTER_DTYPE says otherwise).

The sizes come from a formula whose per-buffer element sizes are read off a real
``LEAPMarginLoss`` and which is checked, buffer by buffer, against real instances for small C
before anything is printed (a buffer added later makes the check fail until this script knows it).
The classifier weight per rank is n x D float32 (PartialFC_V2's ``weight``); the last column also
counts what PartialFC_V2 really keeps per class under arcface_torch's SGD: weight + gradient +
momentum, 3 x n x D float32.

Class sizes K_i (classes in a seeded random order, so the blocks of the ranks are alike; the
table gives the rank with the most bytes):

* ``ms1m``: MS1M-like, K_i ~ lognormal (sigma 0.8) rounded, >= 2, mean ~70 images per class
  (MS1MV2: 5.8M images / 85.7K identities = 68);
* ``lt``: the paper's long-tailed <H5K, T20K> shape scaled to C: 1/5 of the classes are head
  classes with 200 images (assumed: the 5K largest MS1M identities hold a few hundred each),
  4/5 are tail classes with 5 images (paper, Section 4.1); mean 44.

Usage: python benchmarks/bench_memory.py [--dim 512] [--memory-factor 1] [--ranks 1 8 64]
           [--classes 1000 10000 100000 1000000] [--dist ms1m lt] [--center-dtype float16]
"""
import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine_info  # noqa: E402

from leap_plugin.core import AngularStats  # noqa: E402
from leap_plugin.insightface.loss import LEAPMarginLoss, class_block  # noqa: E402

STATS_BUFFERS = {"class_counts", "memory_size", "memory_offset", "centers", "memory", "num_written",
                 "angle_sum", "angle_sq_sum"}
LOSS_BUFFERS = set()  # LEAPMarginLoss's own, besides stats.*: none spans all classes
MB = 2 ** 20


def layout(dim, memory_factor, center_dtype):
    """Bytes per class, per class and feature, per angle slot, fixed -- from real buffers' dtypes."""
    loss = LEAPMarginLoss(torch.tensor([1, 2]), dim, memory_factor=memory_factor, center_dtype=center_dtype)
    own = {n for n, _ in loss.named_buffers() if not n.startswith("stats.")}
    if own != LOSS_BUFFERS:
        raise SystemExit(f"LEAPMarginLoss buffers changed: {sorted(own ^ LOSS_BUFFERS)}; update this script")
    buffers = dict(loss.stats.named_buffers())
    if set(buffers) != STATS_BUFFERS:
        raise SystemExit(f"AngularStats buffers changed: {sorted(set(buffers) ^ STATS_BUFFERS)}; update this script")
    per_class = sum(b.element_size() for n, b in buffers.items() if n not in ("centers", "memory"))
    return dict(per_class=per_class, centre=buffers["centers"].element_size() * dim,
                slot=buffers["memory"].element_size(), fixed=buffers["memory"].element_size())


def stats_bytes(lay, num_classes, num_images, memory_factor):
    """AngularStats bytes for num_classes classes holding num_images images in all."""
    return (num_classes * (lay["per_class"] + lay["centre"]) + num_images * memory_factor * lay["slot"]
            + lay["fixed"])


def verify(lay, dim, memory_factor, center_dtype):
    """The formula against real AngularStats and LEAPMarginLoss buffers (small C)."""
    gen = torch.Generator().manual_seed(0)
    for num_classes in (1, 7, 1000):
        counts = torch.randint(1, 50, (num_classes,), generator=gen)
        want = stats_bytes(lay, num_classes, int(counts.sum()), memory_factor)
        real = sum(b.nbytes for b in AngularStats(counts, dim, memory_factor, center_dtype=center_dtype).buffers())
        assert real == want, (num_classes, real, want)
        loss = LEAPMarginLoss(counts, dim, memory_factor=memory_factor, center_dtype=center_dtype)  # one rank
        real = sum(b.nbytes for b in loss.buffers())
        assert real == want, (num_classes, real, want)


def class_counts(dist, num_classes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    if dist == "ms1m":
        sigma = 0.8
        mu = math.log(70) - sigma ** 2 / 2  # lognormal with mean 70
        k = torch.exp(mu + sigma * torch.randn(num_classes, generator=gen, dtype=torch.float64))
        return k.round().clamp(min=2).long()
    counts = torch.full((num_classes,), 5, dtype=torch.long)
    counts[: max(1, num_classes // 5)] = 200
    return counts[torch.randperm(num_classes, generator=gen)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dim", type=int, default=512, help="D (arcface_torch: 512; FastReID R50: 2048)")
    ap.add_argument("--memory-factor", type=int, default=1, help="P of Eq. 5")
    ap.add_argument("--ranks", nargs="+", type=int, default=[1, 8, 64])
    ap.add_argument("--classes", nargs="+", type=int, default=[1000, 10_000, 100_000, 1_000_000])
    ap.add_argument("--dist", nargs="+", choices=("ms1m", "lt"), default=["ms1m", "lt"])
    ap.add_argument("--center-dtype", choices=("float16", "bfloat16", "float32"), default="float16",
                    help="centre storage (LEAPMarginLoss default float16; FastReID default float32)")
    args = ap.parse_args(argv)
    center_dtype = getattr(torch, args.center_dtype)
    lay = layout(args.dim, args.memory_factor, center_dtype)
    verify(lay, args.dim, args.memory_factor, center_dtype)
    print(machine_info())
    print(f"D={args.dim} P={args.memory_factor}, centres {args.center_dtype}; bytes per class: centre "
          f"{lay['centre']}, counters {lay['per_class']}; {lay['slot']} per angle slot; nothing per class "
          f"of other ranks. Formula checked against real buffers.")
    print("stats = this rank's LEAPMarginLoss buffers; weight = n x D float32; "
          "w+g+m = weight + grad + SGD momentum")
    print(f"\n| {'K_i':<5} | {'C':>9} | {'R':>3} | {'n/rank':>9} | {'weight MB':>9} | {'centres':>8} | "
          f"{'angles':>7} | {'counters':>8} | {'stats MB':>9} | {'stats/weight':>12} | "
          f"{'stats/(w+g+m)':>13} |")
    print(f"|{'-' * 7}|{'-' * 10}:|{'-' * 4}:|{'-' * 10}:|{'-' * 10}:|{'-' * 9}:|{'-' * 8}:|{'-' * 9}:|"
          f"{'-' * 10}:|{'-' * 13}:|{'-' * 14}:|")
    for dist in args.dist:
        for num_classes in args.classes:
            counts = class_counts(dist, num_classes)
            for ranks in args.ranks:
                if ranks > num_classes:
                    continue
                worst = None
                for rank in range(ranks):
                    start, local = class_block(num_classes, rank, ranks)
                    images = int(counts[start: start + local].sum())
                    stats = stats_bytes(lay, local, images, args.memory_factor)
                    weight = local * args.dim * 4
                    if worst is None or stats / weight > worst[0] / worst[1]:
                        worst = (stats, weight, local, images)
                stats, weight, local, images = worst
                angles = (images * args.memory_factor + 1) * lay["slot"]
                print(f"| {dist:<5} | {num_classes:>9,} | {ranks:>3} | {local:>9,} | {weight / MB:>9.1f} | "
                      f"{local * lay['centre'] / MB:>8.1f} | {angles / MB:>7.1f} | "
                      f"{local * lay['per_class'] / MB:>8.2f} | {stats / MB:>9.1f} | "
                      f"{stats / weight:>12.3f} | {stats / (3 * weight):>13.3f} |")
        print(f"(K_i = {dist}: mean {counts.double().mean():.1f} images per class at C = {num_classes:,})")


if __name__ == "__main__":
    main()
