"""leap_logits (Eq. 7 / Eq. 8 with alpha) against FastReID's CosSoftmax / ArcSoftmax, side by side.

Forward + backward of the margin alone on the same [B, C] cosines (the host's way: its layer gets
``logits.clone()`` as EmbeddingHead passes it, then ``* s``), for alpha per logit [B, C], per
sample [B, 1] and None (before START_EPOCH), plus the per-logit alpha draw itself
(FeatureCloud.sample_from_std: torch.randn [B, C] * std). Medians of alternating calls.

Usage: python benchmarks/bench_logits.py [--batch 256] [--classes 10000] [--repeats 20] [--threads N]
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine_info, median, paired_ratio, side_by_side  # noqa: E402

import leap_plugin.fastreid  # noqa: E402,F401  (compat patches before fastreid)
from fastreid.layers.any_softmax import ArcSoftmax, CosSoftmax  # noqa: E402
from leap_plugin.core import FeatureCloud, leap_logits  # noqa: E402

HOSTS = {"cos": (CosSoftmax, 24.0), "arc": (ArcSoftmax, 16.0)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--classes", type=int, default=10_000)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, B, C = args.device, args.batch, args.classes
    gen = torch.Generator().manual_seed(0)
    cosine = ((torch.rand(B, C, generator=gen) * 2 - 1) * 0.95).to(device)
    labels = torch.randint(0, C, (B,), generator=gen).to(device)
    std = (torch.rand(B, generator=gen) * 0.3).to(device)
    grad = torch.randn(B, C, generator=gen).to(device)
    alphas = {"per logit": std[:, None] * torch.randn(B, C, generator=gen).to(device),
              "per sample": std[:, None] * torch.randn(B, 1, generator=gen).to(device), "none": None}
    print(machine_info(device))
    print(f"B={B} C={C} repeats={args.repeats} (median ms; ratio = LEAP / host)")
    print(f"| {'margin':<6} | {'alpha':<10} | {'host ms':>8} | {'LEAP ms':>8} | {'ratio':>6} | {'paired':>6} |")
    print(f"|{'-' * 8}|{'-' * 12}|{'-' * 9}:|{'-' * 9}:|{'-' * 7}:|{'-' * 7}:|")
    for margin, (host_cls, s) in HOSTS.items():
        host_layer = host_cls(C, s, 0.2)
        for name, alpha in alphas.items():
            def host():
                c = cosine.clone().requires_grad_()
                host_layer(c.clone(), labels).backward(grad)

            def leap():
                c = cosine.clone().requires_grad_()
                leap_logits(c, labels, alpha, margin, s, 0.2).backward(grad)
            a, b = side_by_side([host, leap], args.repeats, device)
            print(f"| {margin:<6} | {name:<10} | {median(a) * 1e3:>8.2f} | {median(b) * 1e3:>8.2f} | "
                  f"{median(b) / median(a):>6.2f} | {paired_ratio(a, b):>6.2f} |", flush=True)
    cloud = FeatureCloud("full")
    (t,) = side_by_side([lambda: cloud.sample_from_std(std, C)], args.repeats, device)
    print(f"\nalpha draw per logit, FeatureCloud.sample_from_std -> [{B}, {C}]: {median(t) * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
