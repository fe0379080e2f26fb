"""Helpers for real FastReID runs on CPU: a tiny Market-1501-layout dataset of real JPEG files, and configs."""
import os

import numpy as np
from PIL import Image

import leap_plugin.fastreid  # noqa: F401  (compat patches + registrations before any fastreid use)
from fastreid.config import get_cfg
from leap_plugin.fastreid import add_leap_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = os.path.join(REPO, "configs", "fastreid")


def write_market1501(root, num_train_ids=12, num_test_ids=6, seed=0):
    """Market-1501 layout (``0001_c1s1_000151_00.jpg``) under root/Market-1501-v15.09.15.

    Identity i has a colour pattern of its own plus noise, so a tiny network can learn it.
    Train identity i has 4 + 2 * (i % 4) images (a spread of counts for the long-tail rule).
    """
    rng = np.random.default_rng(seed)
    base = os.path.join(root, "Market-1501-v15.09.15")
    dirs = {d: os.path.join(base, d) for d in ("bounding_box_train", "query", "bounding_box_test")}
    for d in dirs.values():
        os.makedirs(d, exist_ok=True)

    def write(folder, pid, cam, k):
        colour = np.array([(pid * 37) % 256, (pid * 91) % 256, (pid * 53) % 256], dtype=np.float64)
        img = np.tile(colour, (64, 32, 1))
        img[: 8 + (pid % 5) * 10] *= 0.3
        img += rng.normal(0, 25, img.shape)
        name = f"{pid:04d}_c{cam}s1_{k:06d}_00.jpg"
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(os.path.join(folder, name), quality=90)

    for pid in range(1, num_train_ids + 1):
        for k in range(4 + 2 * (pid % 4)):
            write(dirs["bounding_box_train"], pid, 1 + k % 6, k)
    for pid in range(num_train_ids + 1, num_train_ids + num_test_ids + 1):
        write(dirs["query"], pid, 1, 0)
        for k in range(1, 4):
            write(dirs["bounding_box_test"], pid, 2 + k % 5, k)
    return root


def tiny_cfg(config="leap_cf.yml", output_dir="", **opts):
    """A paper config shrunk for CPU: ResNet-18, 64x32 images, batch 16, no pretraining."""
    cfg = get_cfg()
    add_leap_config(cfg)
    cfg.merge_from_file(os.path.join(CONFIGS, config))
    small = {
        "MODEL.DEVICE": "cpu", "MODEL.BACKBONE.DEPTH": "18x", "MODEL.BACKBONE.FEAT_DIM": 512,
        "MODEL.BACKBONE.PRETRAIN": False, "INPUT.SIZE_TRAIN": [64, 32], "INPUT.SIZE_TEST": [64, 32],
        "DATALOADER.NUM_WORKERS": 0, "SOLVER.IMS_PER_BATCH": 16, "TEST.IMS_PER_BATCH": 32,
        "SOLVER.MAX_EPOCH": 2, "SOLVER.WARMUP_ITERS": 0, "SOLVER.STEPS": [10],
        "SOLVER.CHECKPOINT_PERIOD": 1, "TEST.EVAL_PERIOD": 2, "MODEL.HEADS.LEAP.START_EPOCH": 1,
        "DATASETS.NAMES": ("Market1501_LT",), "DATASETS.TESTS": ("Market1501",),
        "DATASETS.LONG_TAIL.NUM_HEAD": 4, "DATASETS.LONG_TAIL.TAIL_IMAGES": 3,
        "OUTPUT_DIR": output_dir, "CUDNN_BENCHMARK": False,
    }
    small.update(opts)
    flat = []
    for key, value in small.items():
        flat += [key, value]
    cfg.merge_from_list(flat)
    return cfg
