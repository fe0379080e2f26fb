"""A real LEAPTrainer run on CPU through Market1501_LT, FastReID's evaluator, checkpoint and resume."""
import os

import pytest
import torch

import fastreid.data.build as fastreid_build
from fastreid.data.datasets import DATASET_REGISTRY
from leap_plugin.fastreid import LEAPTrainer, find_leap_head
from leap_plugin.fastreid.trainer import class_counts

from reid_fixtures import tiny_cfg


@pytest.fixture
def datasets_root(market_root, monkeypatch):
    # fastreid reads FASTREID_DATASETS once, at import, into fastreid.data.build._root
    monkeypatch.setenv("FASTREID_DATASETS", market_root)
    monkeypatch.setattr(fastreid_build, "_root", market_root)
    return market_root


def test_long_tail_dataset_keeps_head_whole_and_cuts_tail(datasets_root):
    full = DATASET_REGISTRY.get("Market1501")(root=datasets_root)
    lt = DATASET_REGISTRY.get("Market1501_LT")(root=datasets_root,
                                                long_tail={"num_head": 4, "tail_images": 3, "seed": 1})
    counts_full = {}
    for _, pid, _ in full.train:
        counts_full[pid] = counts_full.get(pid, 0) + 1
    counts_lt = {}
    for _, pid, _ in lt.train:
        counts_lt[pid] = counts_lt.get(pid, 0) + 1
    ranked = sorted(counts_full, key=lambda p: (-counts_full[p], p))
    assert all(counts_lt[p] == counts_full[p] for p in ranked[:4])
    assert all(counts_lt[p] == min(3, counts_full[p]) for p in ranked[4:])
    assert set(lt.train) <= set(full.train)
    assert lt.query == full.query and lt.gallery == full.gallery
    again = DATASET_REGISTRY.get("Market1501_LT")(root=datasets_root,
                                                   long_tail={"num_head": 4, "tail_images": 3, "seed": 1})
    assert again.train == lt.train


def test_missing_dataset_root_names_path_and_env(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTREID_DATASETS", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=f"(?s){tmp_path}.*FASTREID_DATASETS"):
        DATASET_REGISTRY.get("Market1501_LT")(root=str(tmp_path))


def test_train_evaluate_checkpoint_resume(datasets_root, tmp_path):
    out = str(tmp_path / "run")
    os.makedirs(out)  # tools/train_net.py: default_setup makes it
    cfg = tiny_cfg("leap_cf.yml", output_dir=out)
    trainer = LEAPTrainer(cfg)
    head = find_leap_head(trainer.model)
    dataset = trainer.data_loader.dataset
    assert head.stats.class_counts.tolist() == class_counts(dataset)
    assert sorted(head.stats.class_counts.tolist(), reverse=True)[4:] == [3] * (len(dataset.pids) - 4)
    trainer.resume_or_load(resume=False)
    results = trainer.train()
    # FastReID's own evaluator ran on query/gallery (one test set: DefaultTrainer.test unwraps it)
    assert {"Rank-1", "mAP", "mINP"} <= set(results)
    assert 0 <= results["Rank-1"] <= 100
    assert head.epoch == 1 and head.leap.cloud_active  # START_EPOCH 1: the cloud ran in epoch 1
    assert int(head.stats.num_written.sum()) == trainer.iters_per_epoch * 2 * 16
    saved = {k: v.clone() for k, v in head.stats.state_dict().items()}
    assert os.path.exists(os.path.join(out, "model_final.pth"))

    # --resume: a fresh trainer restores the statistics exactly from the last checkpoint
    resumed = LEAPTrainer(tiny_cfg("leap_cf.yml", output_dir=out))
    fresh = find_leap_head(resumed.model)
    assert int(fresh.stats.num_written.sum()) == 0
    resumed.resume_or_load(resume=True)
    for key, value in saved.items():
        assert torch.equal(fresh.stats.state_dict()[key], value), key
    assert resumed.start_epoch == 2


def test_published_split_file_reproduces_the_split(datasets_root, tmp_path):
    from leap_plugin.fastreid.trainer import long_tail_kwargs
    cfg = tiny_cfg(output_dir=str(tmp_path / "a"), **{"DATASETS.LONG_TAIL.SEED": 3})
    kwargs = long_tail_kwargs(cfg)
    published = DATASET_REGISTRY.get("Market1501_LT")(root=datasets_root, **kwargs)
    path = kwargs["long_tail"]["save_split"]
    assert path.endswith("long_tail_split.json") and os.path.exists(path)
    # another user, another seed in the config, the same file: the same images
    other = tiny_cfg(**{"DATASETS.LONG_TAIL.SEED": 99, "DATASETS.LONG_TAIL.SPLIT_FILE": path})
    loaded = DATASET_REGISTRY.get("Market1501_LT")(root=datasets_root, **long_tail_kwargs(other, publish=False))
    assert loaded.train == published.train
    reseeded = DATASET_REGISTRY.get("Market1501_LT")(
        root=datasets_root, long_tail={"num_head": 4, "tail_images": 3, "seed": 99})
    assert reseeded.train != published.train  # the seed matters, so the file is what pins the split
    with pytest.raises(ValueError, match="not Omniglot_LT"):
        DATASET_REGISTRY.get("Omniglot_LT")(root=datasets_root, long_tail={"split_file": path})
