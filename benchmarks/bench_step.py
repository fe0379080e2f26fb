"""Training-step time of LEAPHead against FastReID's own EmbeddingHead, side by side.

Two parts, each printed as one table (configuration, host ms, LEAP ms, ratio):

* ``step``: a full FastReID training step -- Baseline forward (backbone, head, losses, in an
  EventStorage), backward, optimizer step (FastReID's own build_optimizer: Adam, contiguous
  params) -- of ``EmbeddingHead + CosSoftmax`` (configs/fastreid/cosface.yml) against LEAP-CF
  (leap_cf.yml), and ``ArcSoftmax`` (arcface.yml) against LEAP-AF (leap_af.yml), for ResNet-18
  and ResNet-50 at batch 64 on 256x128 images, 751 classes (Market-1501).
* ``head``: the head alone -- pooling + BN neck + classifier + margin + fastreid's cross-entropy,
  forward and backward -- on a [B, D, h, w] feature map, for B in {64, 256}, D in {512, 2048},
  C in {751, 10000, 100000}.

Both sides of a row start from identical weights and see identical inputs; the LEAP side has the
cloud active (set_epoch(START_EPOCH)), class counts set (20% head classes with 20 images, the
rest 5, as the paper's long-tailed splits) and statistics pre-filled (every class has >= 2
angles, so every tail sample draws a real alpha). The calls alternate A B A B after a warm-up;
the table gives the medians, their ratio, and the median of the per-pair ratios ("paired",
robust to load that drifts during the run).

Usage (run from the repository root):
    python benchmarks/bench_step.py                       # everything, 20 repeats
    python benchmarks/bench_step.py --quick               # a few minutes: the target rows, 5 repeats
    python benchmarks/bench_step.py --only step --depth 50 --repeats 20
    python benchmarks/bench_step.py --only head --batch 256 --dim 2048 --classes 10000
Options --margin cos arc, --threads N, --device cpu|cuda, --fmap 16x8 (head input map).

On the 2-core CPU of benchmarks/README.md the full default run takes about 1.5 to 2 h (ResNet-50
at batch 64 is ~15-30 s per step there); on a GPU it takes minutes.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine_info, median, paired_ratio, side_by_side  # noqa: E402

import leap_plugin.fastreid  # noqa: E402,F401  (compat patches + LEAPHead registration first)
from fastreid.config import get_cfg  # noqa: E402
from fastreid.modeling import build_model  # noqa: E402
from fastreid.modeling.heads import EmbeddingHead  # noqa: E402
from fastreid.modeling.losses import cross_entropy_loss  # noqa: E402
from fastreid.solver.build import build_optimizer  # noqa: E402
from fastreid.utils.events import EventStorage  # noqa: E402
from leap_plugin.fastreid import LEAPHead, add_leap_config, find_leap_head  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "configs", "fastreid")
PAIRS = {"cos": ("cosface.yml", "leap_cf.yml"), "arc": ("arcface.yml", "leap_af.yml")}
FEAT_DIM = {18: 512, 34: 512, 50: 2048, 101: 2048}


def make_cfg(config, device, num_classes, depth=50, feat_dim=None):
    cfg = get_cfg()
    add_leap_config(cfg)
    cfg.merge_from_file(os.path.join(CONFIGS, config))
    cfg.MODEL.DEVICE = device
    cfg.MODEL.BACKBONE.PRETRAIN = False
    cfg.MODEL.BACKBONE.DEPTH = f"{depth}x"
    cfg.MODEL.BACKBONE.FEAT_DIM = feat_dim or FEAT_DIM[depth]
    cfg.MODEL.HEADS.NUM_CLASSES = num_classes
    return cfg


def long_tail_counts(num_classes, head_fraction=0.2, head_images=20, tail_images=5):
    """K_i: the first 20% of the classes are head classes with 20 images, the others have 5."""
    counts = torch.full((num_classes,), tail_images, dtype=torch.long)
    counts[: max(1, int(num_classes * head_fraction))] = head_images
    return counts


@torch.no_grad()
def prefill(head, chunk=4096, seed=0):
    """Two random angles for every class, so every class has a variance (the cloud is real)."""
    stats = head.stats
    gen = torch.Generator(device=stats.centers.device).manual_seed(seed)
    labels = torch.arange(stats.num_classes, device=stats.centers.device).repeat(2)
    for start in range(0, labels.numel(), chunk):
        part = labels[start: start + chunk]
        stats.update(torch.randn(part.numel(), stats.feat_dim, device=part.device, generator=gen), part)


def activate(head, counts):
    head.set_class_counts(counts)
    head.set_epoch(head.leap_options.start_epoch)
    prefill(head)
    assert head.leap.cloud_active


def identity_batch(batch, num_classes, device, gen):
    """Labels as FastReID's NaiveIdentitySampler draws them: batch / 4 identities x 4 images."""
    ids = torch.randperm(num_classes, generator=gen)[: max(1, batch // 4)]
    return ids.repeat_interleave(4)[:batch].to(device)


def bench_step(args, margin, depth, device):
    host_config, leap_config = PAIRS[margin]
    torch.manual_seed(0)
    host = build_model(make_cfg(host_config, device, args.step_classes, depth))
    leap_cfg = make_cfg(leap_config, device, args.step_classes, depth)
    leap = build_model(leap_cfg)
    missing, unexpected = leap.load_state_dict(host.state_dict(), strict=False)
    assert not unexpected and not missing, (missing, unexpected)
    activate(find_leap_head(leap), long_tail_counts(args.step_classes))
    gen = torch.Generator().manual_seed(1)
    images = (torch.rand(args.step_batch, 3, 256, 128, generator=gen) * 255).to(device)
    targets = identity_batch(args.step_batch, args.step_classes, device, gen)
    batch = {"images": images, "targets": targets}
    host.train(), leap.train()
    opt_host = build_optimizer(make_cfg(host_config, device, args.step_classes, depth), host)[0]
    opt_leap = build_optimizer(leap_cfg, leap)[0]

    def step(model, optimizer):
        def run():
            losses = model(batch)
            loss = sum(losses.values())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return run

    fns, peaks = with_peak([step(host, opt_host), step(leap, opt_leap)], device)
    with EventStorage(0):
        return side_by_side(fns, args.repeats, device, args.warmup), peaks


def bench_head(args, margin, batch, dim, classes, device):
    host_config, leap_config = PAIRS[margin]
    torch.manual_seed(0)
    host = EmbeddingHead(make_cfg(host_config, device, classes, feat_dim=dim)).to(device)
    leap = LEAPHead(make_cfg(leap_config, device, classes, feat_dim=dim)).to(device)
    leap.load_state_dict(host.state_dict(), strict=False)
    activate(leap, long_tail_counts(classes))
    h, w = args.fmap
    gen = torch.Generator().manual_seed(1)
    fmap = torch.randn(batch, dim, h, w, generator=gen).to(device).requires_grad_()
    targets = identity_batch(batch, classes, device, gen)
    host.train(), leap.train()

    def step(head):
        def run():
            outputs = head(fmap, targets)
            loss = cross_entropy_loss(outputs["cls_outputs"], targets, 0.0, 0.2)
            head.zero_grad(set_to_none=True)
            fmap.grad = None
            loss.backward()
        return run

    fns, peaks = with_peak([step(host), step(leap)], device)
    return side_by_side(fns, args.repeats, device, args.warmup), peaks


def with_peak(fns, device):
    """Wrap the step functions to record each one's peak CUDA memory (MB); {} on CPU."""
    if torch.device(device).type != "cuda":
        return fns, {}
    peaks = {}

    def wrap(i, fn):
        def run():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            fn()
            torch.cuda.synchronize()
            peaks[i] = max(peaks.get(i, 0), torch.cuda.max_memory_allocated() / 2 ** 20)
        return run
    return [wrap(i, fn) for i, fn in enumerate(fns)], peaks


def row(name, times, peaks=None):
    a, b = times
    line = f"| {name:<34} | {median(a) * 1e3:>10.1f} | {median(b) * 1e3:>10.1f} | " \
           f"{median(b) / median(a):>6.3f} | {paired_ratio(a, b):>6.3f} |"
    if peaks:
        line += f" {peaks[0]:>11.0f} | {peaks[1]:>11.0f} |"
    return line


def header(device):
    text = f"| {'configuration':<34} | {'host ms':>10} | {'LEAP ms':>10} | {'ratio':>6} | {'paired':>6} |"
    rule = f"|{'-' * 36}|{'-' * 12}:|{'-' * 12}:|{'-' * 7}:|{'-' * 7}:|"
    if torch.device(device).type == "cuda":
        text += f" {'host peak MB':>11} | {'LEAP peak MB':>11} |"
        rule += f"{'-' * 13}:|{'-' * 13}:|"
    return text + "\n" + rule


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--only", choices=("step", "head"), help="run one part only")
    ap.add_argument("--quick", action="store_true",
                    help="the target rows only: ResNet-18 step (cos) and the head at B=256, D=2048, "
                         "C=10000 (cos, arc), 5 repeats, 1 warm-up")
    ap.add_argument("--margin", nargs="+", choices=tuple(PAIRS), default=list(PAIRS))
    ap.add_argument("--depth", nargs="+", type=int, choices=tuple(FEAT_DIM), default=[18, 50])
    ap.add_argument("--step-batch", type=int, default=64)
    ap.add_argument("--step-classes", type=int, default=751)
    ap.add_argument("--batch", nargs="+", type=int, default=[64, 256], help="head: batch sizes")
    ap.add_argument("--dim", nargs="+", type=int, default=[512, 2048], help="head: feature dims")
    ap.add_argument("--classes", nargs="+", type=int, default=[751, 10_000, 100_000],
                    help="head: numbers of classes")
    ap.add_argument("--fmap", default="1x1", help="head: h x w of the input feature map (1x1, 16x8)")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    args.fmap = tuple(int(v) for v in args.fmap.lower().split("x"))
    if args.quick:
        args.repeats, args.warmup = min(args.repeats, 5), 1
        if "--depth" not in (argv or sys.argv):
            args.depth = [18]
        args.batch, args.dim, args.classes = [256], [2048], [10_000]
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    print(machine_info(device))
    print(f"repeats={args.repeats} warmup={args.warmup} (median ms; ratio = LEAP / host)", flush=True)

    if args.only in (None, "step"):
        print(f"\nfull training step (forward + backward + Adam), batch {args.step_batch}, 256x128, "
              f"{args.step_classes} classes\n{header(device)}", flush=True)
        margins = ["cos"] if args.quick and "--margin" not in (argv or sys.argv) else args.margin
        for depth in args.depth:
            for margin in margins:
                times, peaks = bench_step(args, margin, depth, device)
                print(row(f"ResNet-{depth} {margin}", times, peaks), flush=True)

    if args.only in (None, "head"):
        h, w = args.fmap
        print(f"\nhead alone (pool + neck + classifier + margin + CE, fwd + bwd) on [B, D, {h}, {w}]\n"
              f"{header(device)}", flush=True)
        for batch in args.batch:
            for dim in args.dim:
                for classes in args.classes:
                    for margin in args.margin:
                        times, peaks = bench_head(args, margin, batch, dim, classes, device)
                        print(row(f"B={batch} D={dim} C={classes} {margin}", times, peaks), flush=True)


if __name__ == "__main__":
    main()
