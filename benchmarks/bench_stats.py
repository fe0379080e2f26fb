"""AngularStats.update against a plain F.linear of the same shapes (B x D -> C), side by side.

Usage: python benchmarks/bench_stats.py [--batch 256] [--dim 2048] [--classes 10000] [--repeats 30]
           [--threads N]

Prints the median time of each, alternating A B A B after a warm-up, and the ratio. The update is
O(B * D) (no C-sized work per step), the linear layer O(B * D * C): the ratio shows what the
statistics add next to the classifier they sit beside. Also times the update at B = 64 .. 1024,
whose growth must stay linear in B (no per-sample or per-class Python loop), with the minor page
faults per update (each fresh [B, D] buffer is first-touched memory on CPU).
"""
import argparse
import os
import resource
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine_info, median, side_by_side  # noqa: E402

from leap_plugin.core import AngularStats  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--classes", type=int, default=10_000)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gen = torch.Generator(device=device).manual_seed(0)
    counts = torch.randint(2, 40, (args.classes,), generator=torch.Generator().manual_seed(0))
    stats = AngularStats(counts, args.dim, memory_factor=2).to(device)
    weight = torch.randn(args.classes, args.dim, device=device, generator=gen)

    def batch(size):
        feats = torch.randn(size, args.dim, device=device, generator=gen)
        labels = torch.randint(0, args.classes, (size,), device=device, generator=gen)
        return feats, labels

    feats, labels = batch(args.batch)
    upd, lin = side_by_side([lambda: stats.update(feats, labels), lambda: F.linear(feats, weight)],
                            args.repeats, device)
    print(machine_info(device.type))
    print(f"device={device.type} B={args.batch} D={args.dim} C={args.classes} repeats={args.repeats}")
    print(f"| {'op':<28} | {'median ms':>10} |\n|{'-' * 30}|{'-' * 11}:|")
    print(f"| {'AngularStats.update':<28} | {median(upd) * 1e3:>10.3f} |")
    print(f"| {'F.linear (B,D)x(D,C)':<28} | {median(lin) * 1e3:>10.3f} |")
    print(f"ratio update / linear: {median(upd) / median(lin):.3f}")
    print(f"\n| {'B':>5} | {'update ms':>10} | {'per sample us':>13} | {'page faults':>11} |\n"
          f"|{'-' * 6}:|{'-' * 11}:|{'-' * 14}:|{'-' * 12}:|")
    for size in (64, 128, 256, 512, 1024):
        f, y = batch(size)
        (t,) = side_by_side([lambda: stats.update(f, y)], args.repeats, device)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        stats.update(f, y)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
        print(f"| {size:>5} | {median(t) * 1e3:>10.3f} | {median(t) / size * 1e6:>13.2f} | {faults:>11} |")


if __name__ == "__main__":
    main()
