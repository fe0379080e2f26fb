"""leap_plugin.fastreid.compat: every patch applied once, each checked against fastreid itself."""
import collections
import importlib
import sys

import numpy as np
import pytest
import torch

from leap_plugin.fastreid import compat


def test_apply_is_idempotent_and_patches_imports():
    compat.apply()
    compat.apply()
    assert collections.Mapping is collections.abc.Mapping
    six = importlib.import_module("torch._six")
    assert "x" in six.string_classes or isinstance("x", six.string_classes)
    # the modules that needed the patches import and work
    from fastreid.data.build import fast_batch_collator
    batch = fast_batch_collator([{"a": torch.ones(2), "p": "x.jpg"}, {"a": torch.zeros(2), "p": "y.jpg"}])
    assert batch["p"] == ["x.jpg", "y.jpg"] and batch["a"].shape == (2, 2)
    from fastreid.evaluation.testing import print_csv_format  # noqa: F401  (collections.Mapping)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the host's DataLoaderX is kept on CUDA machines")
def test_cpu_dataloader_replaces_cuda_stream_loader():
    from fastreid.data import build, data_utils
    assert build.DataLoaderX is compat.CPUDataLoader and data_utils.DataLoaderX is compat.CPUDataLoader
    loader = build.DataLoaderX(0, dataset=list(range(5)), batch_size=2, pin_memory=True)
    assert [b.tolist() for b in loader] == [[0, 1], [2, 3], [4]]


def test_evaluator_never_exits_when_cython_module_is_missing(monkeypatch, caplog):
    from fastreid.config import get_cfg
    from fastreid.evaluation import ReidEvaluator
    monkeypatch.setitem(sys.modules, "fastreid.evaluation.rank_cylib.rank_cy", None)  # import fails
    ReidEvaluator(get_cfg(), num_query=1)  # upstream: `make` in site-packages, then sys.exit(1)
    assert "Python evaluator" in caplog.text


def test_cython_and_python_evaluators_agree():
    if not compat.rank_cython_available():
        pytest.skip("fastreid's Cython rank module is not compiled here (tools/bootstrap.sh compiles it)")
    from fastreid.evaluation.rank import evaluate_rank
    rng = np.random.default_rng(0)
    distmat = rng.random((20, 60)).astype(np.float32)
    q_pids, g_pids = rng.integers(0, 8, 20), rng.integers(0, 8, 60)
    q_cams, g_cams = rng.integers(0, 3, 20), rng.integers(0, 3, 60)
    cy = evaluate_rank(distmat, q_pids, g_pids, q_cams, g_cams, use_cython=True)
    py = evaluate_rank(distmat, q_pids, g_pids, q_cams, g_cams, use_cython=False)
    for a, b in zip(cy, py):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_default_trainer_optimizer_really_updates_the_model():
    # upstream: contiguous parameter buffers + torch 2's zero_grad(set_to_none=True) = no update
    from fastreid.engine import DefaultTrainer
    from fastreid.modeling import build_model
    from fastreid.utils.events import EventStorage
    from reid_fixtures import tiny_cfg
    cfg = tiny_cfg("cosface.yml", **{"MODEL.HEADS.NUM_CLASSES": 4})
    model = build_model(cfg)
    optimizer, _ = DefaultTrainer.build_optimizer(cfg, model)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    batch = {"images": torch.rand(8, 3, 64, 32) * 255, "targets": torch.tensor([0, 1, 2, 3] * 2)}
    with EventStorage(0):
        for _ in range(2):
            optimizer.zero_grad()
            sum(model(batch).values()).backward()
            optimizer.step()
    changed = [k for k, v in model.named_parameters() if not torch.equal(v, before[k])]
    assert "backbone.conv1.weight" in changed and "heads.weight" in changed
