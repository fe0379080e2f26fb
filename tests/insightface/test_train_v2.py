"""arcface_torch's own, unmodified ``train_v2.py`` through ``tools/train_arcface_leap.py``, end to
end on CPU (the environment the README installs: no GPU, no mxnet, torch 2.x, scipy 1.17).

On a tiny long-tailed ``train.rec`` made by ``tools/make_longtail_rec.py`` from the shared Omniglot
images (the ``tiny_face`` fixture: 4 head characters x 20 images, 8 tail characters x 5), with the
verification callback on a ``.bin`` of characters never trained on:

* CosFace (the host's own ``CombinedMarginLoss``) and LEAP-CV, 2 epochs of 7 steps each, the cloud
  from epoch 1: in epoch 0 (cloud off) LEAP's logged losses equal the host's; afterwards they differ;
* the LEAP statistics are buffers in ``checkpoint_gpu_0.pt`` and a resumed run continues them;
* LEAP under ``torchrun --nproc_per_node 2`` (gloo, PartialFC_V2's class split over 2 ranks).

About 2 minutes on 2 cores. Skipped, saying why, where arcface_torch is not found (conftest.py).
"""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from leap_plugin.insightface.host import write_config

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "train_arcface_leap.py"
STEPS_PER_EPOCH = (4 * 20 + 8 * 5) // 16  # drop_last
SETTINGS = dict(network="mbf", embedding_size=32, batch_size=16, optimizer="sgd", lr=0.1, weight_decay=5e-4,
                warmup_epoch=0, fp16=False, sample_rate=1.0, frequent=2, verbose=2 * STEPS_PER_EPOCH,
                save_all_states=True, num_workers=1, dali=False, margin_list=(1.0, 0.0, 0.35), num_classes=12,
                num_image=None, val_targets=["omniglot_test"], seed=0, num_epoch=2, resume=False, leap=None)
LEAP = dict(version="vanilla", head_threshold=5, start_epoch=1, update_every=1)
_LOSS = re.compile(r"Loss (\d+\.\d+)\s+LearningRate \S+\s+Epoch: (\d+)\s+Global Step: (\d+)")


def _train(arcface, rec, out: Path, name: str, processes: int = 1, **overrides) -> str:
    """One run of the tool; returns what it added to arcface_torch's training.log (rank 0; the host
    appends to the file, so a resumed run's log follows the first run's)."""
    log_path = out / "training.log"
    start = log_path.stat().st_size if log_path.is_file() else 0
    config = write_config(out.parent / "configs" / f"{name}.py",
                          **dict(SETTINGS, rec=str(rec), output=str(out), **overrides))
    launch = [sys.executable, str(TOOL)] if processes == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), str(TOOL)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
               OMP_NUM_THREADS="1" if processes > 1 else os.environ.get("OMP_NUM_THREADS", "2"))
    proc = subprocess.run([*launch, "--insightface-root", str(arcface), str(config)], capture_output=True,
                          text=True, env=env, cwd=out.parent, timeout=600)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    with open(log_path) as f:
        f.seek(start)
        return f.read()


def _losses(log: str):
    """[(epoch, global step, logged loss)] from the host's log lines."""
    return [(int(e), int(s), float(v)) for v, e, s in _LOSS.findall(log)]


def _leap_state(checkpoint_path):
    state = torch.load(checkpoint_path, weights_only=False)["state_dict_softmax_fc"]
    return {k[len("margin_softmax."):]: v for k, v in state.items() if k.startswith("margin_softmax.")}


@pytest.fixture(scope="module")
def runs(arcface_torch, tiny_face, tmp_path_factory):
    root = tmp_path_factory.mktemp("train_v2")
    logs = {"cosface": _train(arcface_torch, tiny_face, root / "cosface", "cosface"),
            "leap": _train(arcface_torch, tiny_face, root / "leap", "leap", leap=LEAP)}
    shutil.copy(root / "leap" / "checkpoint_gpu_0.pt", root / "leap_epoch2.pt")
    logs["resumed"] = _train(arcface_torch, tiny_face, root / "leap", "leap_resume", leap=LEAP, resume=True,
                             num_epoch=3)
    return root, logs


def test_cloud_off_equals_the_hosts_loss_then_differs(runs):
    _, logs = runs
    cosface, leap = _losses(logs["cosface"]), _losses(logs["leap"])
    assert [s for _, s, _ in cosface] == [s for _, s, _ in leap] and len(cosface) >= 4
    assert "LEAP: LEAPMarginLoss(" in logs["leap"] and "LEAPMarginLoss" not in logs["cosface"]
    off = [(c, x) for c, x in zip(cosface, leap) if x[0] < LEAP["start_epoch"]]
    on = [(c, x) for c, x in zip(cosface, leap) if x[0] >= LEAP["start_epoch"]]
    assert off and on
    for c, x in off:  # epoch 0: the same steps, the same loss (the cloud is off)
        assert c[2] == pytest.approx(x[2], abs=1e-4)
    assert any(abs(c[2] - x[2]) > 1e-3 for c, x in on)  # the cloud changes training


def test_verification_callback_runs_on_unseen_characters(runs):
    _, logs = runs
    step = 2 * STEPS_PER_EPOCH
    for name in ("cosface", "leap"):  # the host's callback, scipy 1.17 included
        match = re.search(rf"\[omniglot_test\]\[{step}\]Accuracy-Flip: (\d\.\d+)", logs[name])
        assert match, f"no verification result in the {name} log"
        assert 0.3 < float(match.group(1)) <= 1.0


def test_leap_statistics_in_the_log_and_tensorboard(runs):
    root, logs = runs
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    assert re.search(r"LEAP: cloud_fraction \S+ .*reference_var \S+ .*Global Step: \d+", logs["leap"])
    events = EventAccumulator(str(root / "leap" / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"leap/reference_var", "leap/cloud_fraction", "leap/mean_abs_alpha", "leap/tail_mean_angle",
            "leap/head_mean_angle"} <= tags and "loss" in tags


def test_resume_restores_the_leap_buffers(runs):
    root, logs = runs
    before = _leap_state(root / "leap_epoch2.pt")
    after = _leap_state(root / "leap" / "checkpoint_gpu_0.pt")
    assert {"stats.centers", "stats.memory", "stats.num_written", "_extra_state"} <= set(before)
    assert before["_extra_state"]["step"] == 2 * STEPS_PER_EPOCH
    # the resumed run continued the checkpoint's counters, it did not start afresh
    assert after["_extra_state"]["step"] == 3 * STEPS_PER_EPOCH and after["_extra_state"]["epoch"] == 2
    assert int(after["stats.num_written"].sum()) > int(before["stats.num_written"].sum()) > 0
    epochs = {e for e, _, _ in _losses(logs["resumed"])}
    assert epochs == {2}  # train_v2 resumed at epoch 2


def test_leap_under_torchrun_on_cpu(arcface_torch, tiny_face, tmp_path):
    log = _train(arcface_torch, tiny_face, tmp_path / "ddp", "ddp", processes=2, num_epoch=1, val_targets=[],
                 leap=dict(LEAP, start_epoch=0))
    assert re.search(r": total_batch_size\s+32\n", log)  # train_v2 counted 2 processes of 16
    state = _leap_state(tmp_path / "ddp" / "checkpoint_gpu_0.pt")
    other = _leap_state(tmp_path / "ddp" / "checkpoint_gpu_1.pt")
    assert state["stats.centers"].shape[0] + other["stats.centers"].shape[0] == 12  # classes split over 2 ranks
    assert state["_extra_state"]["step"] == (4 * 20 + 8 * 5) // 32
