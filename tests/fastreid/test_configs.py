"""Every yaml under configs/fastreid merges into a FastReID config with the LEAP keys."""
import glob
import os
import sys

import pytest

from reid_fixtures import CONFIGS, REPO, tiny_cfg

ALL = sorted(glob.glob(os.path.join(CONFIGS, "**", "*.yml"), recursive=True))


@pytest.mark.parametrize("path", ALL, ids=[os.path.relpath(p, CONFIGS) for p in ALL])
def test_config_merges(path):
    cfg = tiny_cfg(os.path.relpath(path, CONFIGS))
    name = os.path.basename(path)
    if name.startswith("leap_"):
        assert cfg.MODEL.HEADS.NAME == "LEAPHead"
        assert cfg.MODEL.HEADS.LEAP.VERSION == ("vanilla" if name[6] == "v" else "full")
        assert cfg.MODEL.HEADS.CLS_LAYER == ("CosSoftmax" if name[5] == "c" else "ArcSoftmax")
    elif name in ("cosface.yml", "arcface.yml"):
        assert cfg.MODEL.HEADS.NAME == "EmbeddingHead"
    scale = {"CosSoftmax": 24, "ArcSoftmax": 16}.get(cfg.MODEL.HEADS.CLS_LAYER)
    assert cfg.MODEL.HEADS.SCALE == scale and cfg.MODEL.HEADS.MARGIN == 0.2


def test_generated_grid_is_committed_as_generated(tmp_path):
    sys.path.insert(0, os.path.join(REPO, "tools"))
    try:
        import make_fastreid_configs
    finally:
        sys.path.pop(0)
    grid = make_fastreid_configs.grid()
    assert len(grid) == 2 * 6 * 6 + 6
    for rel, text in grid.items():
        with open(os.path.join(CONFIGS, rel)) as f:
            assert f.read() == text, f"{rel} differs from tools/make_fastreid_configs.py: rerun it"
