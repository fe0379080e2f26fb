"""AngularStats.update against a plain F.linear of the same shapes (B x D -> C), side by side.

Usage: python benchmarks/bench_stats.py [--batch 256] [--dim 2048] [--classes 10000] [--repeats 30]

Prints the median time of each, alternating A B A B after a warm-up, and the ratio. The update is
O(B * D) (no C-sized work per step), the linear layer O(B * D * C): the ratio shows what the
statistics add next to the classifier they sit beside. Also times the update at B = 64 .. 512,
whose growth must stay linear in B (no per-sample or per-class Python loop).
"""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from leap_plugin.core import AngularStats


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def side_by_side(fns, repeats, device, warmup=3):
    for fn in fns:
        for _ in range(warmup):
            fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for t, fn in zip(times, fns):
            t.append(timed(fn, device))
    return [statistics.median(t) for t in times]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--classes", type=int, default=10_000)
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()
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
    print(f"device={device.type} threads={torch.get_num_threads()} B={args.batch} D={args.dim} C={args.classes}")
    print(f"{'op':<28}{'median ms':>12}")
    print(f"{'AngularStats.update':<28}{upd * 1e3:>12.3f}")
    print(f"{'F.linear (B,D)x(D,C)':<28}{lin * 1e3:>12.3f}")
    print(f"ratio update / linear: {upd / lin:.3f}")
    print(f"\n{'B':>5}{'update ms':>12}{'per sample us':>16}")
    for size in (64, 128, 256, 512):
        f, y = batch(size)
        (t,) = side_by_side([lambda: stats.update(f, y)], args.repeats, device)
        print(f"{size:>5}{t * 1e3:>12.3f}{t / size * 1e6:>16.2f}")


if __name__ == "__main__":
    main()
