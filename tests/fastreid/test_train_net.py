"""tools/train_net.py end to end: FastReID's CLI, a paper config, MODEL.DEVICE cpu, then --eval-only."""
import os
import subprocess
import sys

from reid_fixtures import REPO

TINY = ["MODEL.DEVICE", "cpu", "MODEL.BACKBONE.DEPTH", "18x", "MODEL.BACKBONE.FEAT_DIM", "512",
        "MODEL.BACKBONE.PRETRAIN", "False", "INPUT.SIZE_TRAIN", "[64, 32]", "INPUT.SIZE_TEST", "[64, 32]",
        "DATALOADER.NUM_WORKERS", "0", "SOLVER.IMS_PER_BATCH", "16", "SOLVER.MAX_EPOCH", "2",
        "SOLVER.WARMUP_ITERS", "0", "TEST.EVAL_PERIOD", "2", "MODEL.HEADS.LEAP.START_EPOCH", "1",
        "DATASETS.LONG_TAIL.NUM_HEAD", "4", "DATASETS.LONG_TAIL.TAIL_IMAGES", "3", "CUDNN_BENCHMARK", "False"]


def _run(args, root, cwd):
    env = dict(os.environ, FASTREID_DATASETS=root)
    return subprocess.run([sys.executable, os.path.join(REPO, "tools", "train_net.py")] + args, cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=600)


def test_train_net_trains_and_evaluates(market_root, tmp_path):
    out = str(tmp_path / "logs")
    config = os.path.join(REPO, "configs", "fastreid", "Market1501_LT", "H20_S5", "leap_cf.yml")
    proc = _run(["--config-file", config] + TINY + ["OUTPUT_DIR", out], market_root, str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert "Evaluation results in csv format" in log and "| Rank-1" in log  # FastReID's own table
    assert os.path.exists(os.path.join(out, "model_final.pth"))

    proc = _run(["--config-file", config, "--eval-only"] + TINY
                + ["OUTPUT_DIR", out, "MODEL.WEIGHTS", os.path.join(out, "model_final.pth")],
                market_root, str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    # the statistics load with the model (heads.weight is skipped by FastReID itself: NUM_CLASSES 0)
    assert "| Rank-1" in log and "heads.stats" not in log
