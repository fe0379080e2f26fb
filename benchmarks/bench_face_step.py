"""The face margin step: arcface_torch's CombinedMarginLoss against LEAPMarginLoss, side by side.

What a face user pays per step on one rank of PartialFC_V2: the margin loss on the
[B_global, C_cols] clamped cosines of this rank's classes (C_cols = sample_rate x C_local columns;
with sample_rate < 1 the LEAP loss is told the global class of each sampled column), then cross
entropy on its output, forward and backward. Three sides on the same cosines and labels:

* ``host``: arcface_torch's own ``CombinedMarginLoss`` (losses.py of an insightface checkout:
  --insightface-root, $INSIGHTFACE_ROOT or the fetched mirror; a faithful copy of its forward,
  labelled "reference copy" in the output, only when none is found);
* ``LEAP on``: ``LEAPMarginLoss`` with the cloud active, every class's variance known (two angles
  each), the paper's per-logit alpha, ``update_every=1`` (the statistics update and the all-reduce
  of the observe() pre-hook are in every timed call, D = 512);
* ``LEAP off``: the same loss before ``start_epoch`` (plain CosFace / ArcFace).

Margins: ``cos``, ``arc`` (LEAP's default: Eq. 8 differentiated) and ``arc-st`` (LEAP with
``straight_through=True``, the host's gradient, as configs/insightface ship it).

Time: warm-up, then the sides alternate (host, on, off, host, ...), each call timed on its own;
medians and their ratios to the host. Memory, measured apart from the timing: CPU, each side in a
fresh process (MALLOC_MMAP_THRESHOLD_ fixed, so freed buffers go back to the system), one warm-up
step, then the peak resident set of the next step above the resident set before it (VmHWM after
/proc/self/clear_refs "5"); CUDA, ``max_memory_allocated`` above the memory allocated before the
step. Memory is given in [B, C_cols] float32 buffers (B x C_cols x 4 bytes) and MB.

Usage: python benchmarks/bench_face_step.py [--batch 128 512] [--classes 10000 100000]
       [--sample-rate 1.0 0.1] [--margin cos arc arc-st] [--repeats 5] [--threads 1] [--no-memory]
"""
import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine_info, median, paired_ratio, side_by_side  # noqa: E402

from leap_plugin.insightface import LEAPMarginLoss  # noqa: E402

# arcface_torch's margin_list; "arc-st": LEAP's ArcFace with straight_through=True, as the shipped
# configs/insightface configs run it (the host's gradient through the margin)
MARGINS = {"cos": (1.0, 0.0, 0.4), "arc": (1.0, 0.5, 0.0), "arc-st": (1.0, 0.5, 0.0)}
SCALE = 64.0
DIM = 512
MIRROR = Path(os.environ.get("INSIGHTFACE_MIRROR", "/work/.mirror/deepinsight+insightface/repo"))
SIDES = ("host", "LEAP on", "LEAP off")


class ReferenceCombinedMarginLoss(torch.nn.Module):
    """A copy of arcface_torch's CombinedMarginLoss.forward (CosFace and ArcFace branches, no
    inter-class filtering), used only when no insightface checkout is found."""

    def __init__(self, s, m1, m2, m3):
        super().__init__()
        self.s, self.m1, self.m2, self.m3 = s, m1, m2, m3

    def forward(self, logits, labels):
        index_positive = torch.where(labels != -1)[0]
        target_logit = logits[index_positive, labels[index_positive].view(-1)]
        if self.m1 == 1.0 and self.m3 == 0.0:
            with torch.no_grad():
                target_logit.arccos_()
                logits.arccos_()
                final_target_logit = target_logit + self.m2
                logits[index_positive, labels[index_positive].view(-1)] = final_target_logit
                logits.cos_()
            logits = logits * self.s
        else:
            final_target_logit = target_logit - self.m3
            logits[index_positive, labels[index_positive].view(-1)] = final_target_logit
            logits = logits * self.s
        return logits


def host_loss_class(root):
    """(CombinedMarginLoss class, where it came from)."""
    text, where = None, None
    for folder in ([Path(root), Path(root) / "recognition" / "arcface_torch"] if root else []):
        if (folder / "losses.py").is_file():
            text, where = (folder / "losses.py").read_text(), str(folder / "losses.py")
            break
    if text is None and MIRROR.is_dir():
        command = ["git", "--git-dir", str(MIRROR), "show", "HEAD:recognition/arcface_torch/losses.py"]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode == 0:
            text, where = done.stdout, f"{MIRROR} HEAD:recognition/arcface_torch/losses.py"
    if text is None:
        return ReferenceCombinedMarginLoss, "reference copy (no insightface checkout found)"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "losses.py"
        path.write_text(text)
        spec = importlib.util.spec_from_file_location("arcface_torch_losses", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return module.CombinedMarginLoss, where


def class_counts(num_classes, gen):
    """K_i long-tailed as a face training set: 20% of the classes with 20-100 images, the rest 2-10."""
    counts = torch.randint(2, 11, (num_classes,), generator=gen)
    head = torch.randperm(num_classes, generator=gen)[: num_classes // 5]
    counts[head] = torch.randint(20, 101, (head.numel(),), generator=gen)
    return counts


class Config:
    """Inputs and the three sides' step functions of one configuration."""

    def __init__(self, margin, batch, classes, sample_rate, host_cls, device, seed=0):
        gen = torch.Generator().manual_seed(seed)
        cols = max(1, int(round(sample_rate * classes)))
        self.shape = (batch, cols)
        self.columns = torch.sort(torch.randperm(classes, generator=gen)[:cols]).values.to(device)
        # every 4th row's class lives on another rank (label -1); the others are sampled columns
        labels = torch.randint(0, cols, (batch,), generator=gen)
        labels[::4] = -1
        self.labels = labels.to(device)
        self.global_labels = torch.where(labels >= 0, self.columns.cpu()[labels.clamp(min=0)],
                                         torch.full_like(labels, -1)).to(device)
        self.cosine = ((torch.rand(batch, cols, generator=gen) * 2 - 1) * 0.9).to(device)
        self.embeddings = F.normalize(torch.randn(batch, DIM, generator=gen)).to(device)
        self.host = host_cls(SCALE, *MARGINS[margin]).to(device)
        counts = class_counts(classes, gen)
        self.leap = {}
        for side, start_epoch in (("LEAP on", 0), ("LEAP off", 1)):
            loss = LEAPMarginLoss.from_margin_list(MARGINS[margin], SCALE, counts, DIM, update_every=1,
                                                   start_epoch=start_epoch, seed=seed,
                                                   straight_through=margin == "arc-st").to(device).train()
            self.prefill(loss, gen)
            self.leap[side] = loss

    @torch.no_grad()
    def prefill(self, loss, gen, chunk=8192):
        """Two angles for every class: every class has a variance, every tail sample a cloud."""
        stats = loss.stats
        labels = torch.arange(stats.num_classes, device=stats.centers.device).repeat(2)
        for start in range(0, labels.numel(), chunk):
            part = labels[start: start + chunk]
            feats = torch.randn(part.numel(), DIM, generator=gen).to(part.device)
            stats.update(feats, part)

    def step(self, side):
        labels = self.labels

        def run():
            # PartialFC_V2 hands the margin loss the clamp's output: a fresh non-leaf tensor
            cosine = self.cosine.clone().requires_grad_()
            logits = cosine.clamp(-1, 1)
            if side == "host":
                out = self.host(logits, labels[:, None])
            else:
                loss = self.leap[side]
                loss.observe(self.embeddings, self.global_labels)
                out = loss(logits, labels[:, None], columns=self.columns)
            F.cross_entropy(out, labels, ignore_index=-1).backward()
        return run


def peak_bytes(step, device):
    """Transient bytes of one call of ``step`` (after one warm-up call)."""
    step()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before

    def status(field):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident set
    before = status("VmRSS:")
    step()
    return status("VmHWM:") - before


def memory_child(args):
    """Run in a fresh process: print the transient bytes of one side of one configuration."""
    margin, batch, classes, rate, side = args.child
    torch.set_num_threads(args.threads or torch.get_num_threads())
    cfg = Config(margin, int(batch), int(classes), float(rate), host_loss_class(args.insightface_root)[0],
                 args.device)
    print(json.dumps({"bytes": peak_bytes(cfg.step(side), args.device)}))


def measure_memory(args, key):
    """{side: transient bytes}, each side in a fresh process (CPU) or in this one (CUDA)."""
    result = {}
    for side in SIDES:
        command = [sys.executable, os.path.abspath(__file__), "--child", *map(str, key), side,
                   "--device", args.device, "--threads", str(args.threads)]
        if args.insightface_root:
            command += ["--insightface-root", args.insightface_root]
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            raise RuntimeError(f"memory run {key} {side} failed:\n{done.stderr[-2000:]}")
        result[side] = json.loads(done.stdout.strip().splitlines()[-1])["bytes"]
    return result


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--batch", nargs="+", type=int, default=[128, 512])
    ap.add_argument("--classes", nargs="+", type=int, default=[10_000, 100_000], help="C_local")
    ap.add_argument("--sample-rate", nargs="+", type=float, default=[1.0, 0.1])
    ap.add_argument("--margin", nargs="+", choices=tuple(MARGINS), default=["cos", "arc"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (0: torch's default)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--insightface-root", default=os.environ.get("INSIGHTFACE_ROOT"))
    ap.add_argument("--no-memory", action="store_true", help="time only")
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return memory_child(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    host_cls, where = host_loss_class(args.insightface_root)
    print(machine_info(args.device))
    print(f"host: CombinedMarginLoss from {where}")
    print(f"repeats={args.repeats} (median ms; ratio = LEAP / host; paired = median of per-pair ratios); "
          f"memory: transient MB above the state before the step, and in [B, C] float32 buffers")
    print("| margin | B | C_local | rate | host ms | LEAP on ms | ratio | paired | LEAP off ms | ratio |"
          " host MB | on MB | off MB | host [B,C] | on [B,C] | off [B,C] |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for margin in args.margin:
        for batch in args.batch:
            for classes in args.classes:
                for rate in args.sample_rate:
                    cfg = Config(margin, batch, classes, rate, host_cls, args.device)
                    host, on, off = side_by_side([cfg.step(side) for side in SIDES], args.repeats,
                                                 args.device, args.warmup)
                    del cfg
                    line = (f"| {margin} | {batch} | {classes} | {rate:g} | {median(host) * 1e3:.0f} | "
                            f"{median(on) * 1e3:.0f} | {median(on) / median(host):.2f} | "
                            f"{paired_ratio(host, on):.2f} | {median(off) * 1e3:.0f} | "
                            f"{median(off) / median(host):.2f} |")
                    if not args.no_memory:
                        mem = measure_memory(args, (margin, batch, classes, rate))
                        buffer = batch * max(1, int(round(rate * classes))) * 4
                        line += "".join(f" {mem[s] / 2 ** 20:.0f} |" for s in SIDES)
                        line += "".join(f" {mem[s] / buffer:.2f} |" for s in SIDES)
                    print(line, flush=True)


if __name__ == "__main__":
    main()
