"""leap_plugin.fastreid.analysis (the paper's Section 1 measurement on a trained FastReID model) and
its command line tools/analyze.py, end to end on a tiny Market-1501-layout dataset of real JPEGs."""
import importlib.util
import json
import os

import numpy as np
import pytest
import torch

import fastreid.data.build as fastreid_build
from fastreid.modeling import build_model
from fastreid.utils.checkpoint import Checkpointer
from leap_plugin.analysis import class_angles, load_run
from leap_plugin.fastreid import find_leap_head
from leap_plugin.fastreid import analysis as fastreid_analysis
from leap_plugin.fastreid.analysis import analyze_run, build_train_set, setup
from reid_fixtures import REPO, write_market1501


def _analyze_tool():
    path = os.path.join(REPO, "tools", "analyze.py")
    spec = importlib.util.spec_from_file_location("leap_analyze_tool", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY = ["MODEL.BACKBONE.DEPTH", "18x", "MODEL.BACKBONE.FEAT_DIM", "512", "MODEL.BACKBONE.PRETRAIN", "False",
        "INPUT.SIZE_TRAIN", "[64, 32]", "INPUT.SIZE_TEST", "[64, 32]", "DATALOADER.NUM_WORKERS", "0",
        "TEST.IMS_PER_BATCH", "32", "DATASETS.NAMES", "('Market1501_LT',)",
        "DATASETS.LONG_TAIL.NUM_HEAD", "4", "DATASETS.LONG_TAIL.TAIL_IMAGES", "3"]


def test_analyze_tool_end_to_end(tmp_path, monkeypatch, png):
    root = write_market1501(str(tmp_path / "datasets"))
    monkeypatch.setattr(fastreid_build, "_root", root)  # fastreid read FASTREID_DATASETS at import
    tool = _analyze_tool()
    config = os.path.join(REPO, "configs", "fastreid", "leap_cf.yml")

    # a "trained" LEAP model: built, statistics created, saved with FastReID's Checkpointer (0 steps)
    cfg = setup(config, TINY)
    train_set = build_train_set(cfg)
    assert cfg.MODEL.DEVICE == "cpu" and train_set.num_classes == 12
    cfg.MODEL.HEADS.NUM_CLASSES = train_set.num_classes
    model = build_model(cfg)
    counts = np.bincount([train_set.pid_dict[item[1]] for item in train_set.img_items])
    find_leap_head(model).set_class_counts(counts)
    os.makedirs(tmp_path / "run")
    Checkpointer(model, save_dir=str(tmp_path / "run")).save("model_final")
    weights = str(tmp_path / "run" / "model_final.pth")

    out = str(tmp_path / "analysis")
    result = tool.main(["--config-file", config, "--weights", weights, "--out", out, "--plots"] + TINY)

    # Market fixture: identity i has 4 + 2 (i % 4) images; <H4, S3> keeps 3x10 + 1x8 whole, cuts 8 to 3
    assert result["num_images"] == 62 and result["num_classes"] == 12 and result["head_threshold"] == 3
    summary = result["summary"]
    assert (summary["head"]["num_classes"], summary["tail"]["num_classes"]) == (4, 8)
    assert (summary["head"]["num_images"], summary["tail"]["num_images"]) == (38, 24)
    assert "training_memory_summary" in result  # the LEAP statistics came back with the checkpoint
    with open(os.path.join(out, "analysis.json")) as f:
        assert json.load(f) == result
    for name in ("angles.png", "variance.png", "tsne.png"):
        png(os.path.join(out, name))

    run = load_run(out)
    n = 62
    assert run["features"].shape == (n, 512) and run["angles"].shape == run["labels"].shape == (n,)
    assert run["is_head"].sum() == 38 and run["class_count"].tolist() == result["classes"]["count"]
    angles, _, var, _ = class_angles(run["features"], run["labels"])
    np.testing.assert_allclose(run["angles"], angles.numpy())
    np.testing.assert_allclose(run["class_var"], var.numpy())
    assert result["classes"]["var"] == pytest.approx(var.tolist())

    # the features are the loaded model's eval embeddings of the training images, in dataset order
    model.eval()
    with torch.no_grad():
        first = [train_set[i] for i in (0, 61)]
        expected = model({"images": torch.stack([x["images"] for x in first])})
    np.testing.assert_allclose(run["features"][[0, 61]], expected.numpy(), rtol=1e-4, atol=1e-5)
    assert run["labels"][[0, 61]].tolist() == [x["targets"] for x in first]

    # a head-threshold override moves classes between the groups (same features: no second pass)
    monkeypatch.setattr(fastreid_analysis, "extract_features", lambda *args: (torch.from_numpy(run["features"]),
                                                                  torch.from_numpy(run["labels"])))
    result = analyze_run(setup(config, TINY), weights, str(tmp_path / "t8"), head_threshold=8)
    assert result["summary"]["head"]["num_classes"] == 3 and result["head_threshold"] == 8
    assert result["summary"]["head"]["num_images"] == 30

    # a checkpoint that does not fit the config is refused, not measured half-random
    with pytest.raises(ValueError, match="did not load"):
        analyze_run(setup(config, TINY + ["MODEL.BACKBONE.DEPTH", "34x"]), weights, str(tmp_path / "x"))
    with pytest.raises(FileNotFoundError):
        analyze_run(cfg, str(tmp_path / "missing.pth"), str(tmp_path / "y"))
