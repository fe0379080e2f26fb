"""Shared helpers of the benchmarks: side-by-side timing and a description of the machine.

Timing is done the same way everywhere: warm-up calls of every side first, then the sides run
alternately (A B A B ...) so that both see the same load, each call timed on its own (with a CUDA
synchronisation around it on a GPU), and the median is reported.
"""
import os
import platform
import statistics
import time

import torch

__all__ = ["timed", "side_by_side", "machine_info", "median", "paired_ratio"]


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device="cpu"):
    """Seconds one call of ``fn()`` takes (synchronised on CUDA)."""
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def side_by_side(fns, repeats, device="cpu", warmup=3):
    """Per-call times of each function, run alternately after ``warmup`` calls of each.

    Returns one list of ``repeats`` times (seconds) per function.
    """
    for fn in fns:
        for _ in range(warmup):
            fn()
    _sync(device)
    times = [[] for _ in fns]
    for _ in range(repeats):
        for t, fn in zip(times, fns):
            t.append(timed(fn, device))
    return times


def median(times):
    return statistics.median(times)


def paired_ratio(a, b):
    """Median over repeats of b[i] / a[i]: the two calls of a pair ran back to back."""
    return statistics.median(y / x for x, y in zip(a, b))


def machine_info(device="cpu") -> str:
    """One line: CPU model, cores, torch version, threads, GPU (where used)."""
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = (f"cpu={cpu!r} nproc={os.cpu_count()} torch={torch.__version__} "
            f"threads={torch.get_num_threads()} interop={torch.get_num_interop_threads()}")
    if torch.device(device).type == "cuda":
        info += f" gpu={torch.cuda.get_device_name()!r} cuda={torch.version.cuda}"
    try:
        info += f" load1={os.getloadavg()[0]:.2f}"
    except OSError:
        pass
    return info
