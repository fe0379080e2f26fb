"""Every benchmark script runs to its table at tiny sizes (a smoke test: the speed and memory goals
are read from full runs, benchmarks/README.md, never timed here). A refactor that renames what a
benchmark calls fails here instead of at the next measurement."""
import os
import subprocess
import sys

import pytest

from leap_plugin.insightface.host import locate_arcface_torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(script, *args, env=None):
    proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", script), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=600, env=dict(os.environ, **(env or {})))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.parametrize("script,args,expect", [
    ("bench_stats.py", ["--batch", "16", "--dim", "8", "--classes", "50", "--repeats", "1"], "ratio update / linear"),
    ("bench_logits.py", ["--batch", "8", "--classes", "60", "--repeats", "1"], "| cos    | per logit"),
    ("bench_memory.py", ["--classes", "1000", "--ranks", "1", "2"], "| ms1m  |     1,000 |   2 |"),
    ("bench_step.py", ["--only", "head", "--batch", "8", "--dim", "16", "--classes", "20", "--repeats", "1",
                       "--warmup", "0"], "B=8 D=16 C=20 cos"),
])
def test_benchmark_runs(script, args, expect):
    assert expect in _run(script, *args)


def test_face_step_benchmark_runs():
    try:
        root = locate_arcface_torch()
    except FileNotFoundError as error:
        pytest.skip(f"no arcface_torch checkout for the host's CombinedMarginLoss: {error}")
    out = _run("bench_face_step.py", "--batch", "16", "--classes", "200", "--sample-rate", "1.0", "--margin", "cos",
               "--repeats", "1", env={"INSIGHTFACE_ROOT": str(root)})
    assert "| cos | 16 | 200 | 1 |" in out
