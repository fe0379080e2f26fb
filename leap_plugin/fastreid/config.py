"""``add_leap_config(cfg)``: the LEAP keys, added to a FastReID config before the yaml merge.

MODEL.HEADS.LEAP (read by ``LEAPHead``; the margin comes from MODEL.HEADS.CLS_LAYER, s and m
from MODEL.HEADS.SCALE / MODEL.HEADS.MARGIN):

    VERSION          "full" (Eq. 9, no head/tail threshold) or "vanilla" (Eq. 6)
    HEAD_THRESHOLD   T of the vanilla version: classes with more than T images are head
                     (-1 = unset; required for "vanilla")
    MEMORY_FACTOR    P of Eq. 5: each class remembers its last K_i * P angles
    CENTER_RATE      gamma of Eq. 4 (paper: 0.1)
    CENTER_RATE_WEIGHTS  which term of Eq. 4 gamma weighs: "batch_mean" (default: the centre
                     moves a step gamma toward the batch mean, centre loss's "learning rate of
                     class center") or "previous_centre" (Eq. 4 as printed: gamma on the old centre,
                     1 - gamma on the batch mean; the behaviour before this option). docs/choices.md
    START_EPOCH      the epoch from which the feature cloud is applied (paper Fig. 5: 10-30)
    ALPHA_PER_LOGIT  one alpha per (sample, logit) (paper: "alpha_x in R^{1 x C}") or per sample
    TARGET_ONLY      alpha on the target logit only (paper, Eq. 7/8: on every logit -> False)
    SIGNED_ALPHA     alpha ~ N(0, s^2) as the paper states (True) or |alpha| (False)
    MIN_ANGLES       angles a class needs in memory before its variance is trusted (>= 2)
    ANGLE_REFERENCE  what the angles of Eq. 3 are measured to: the EMA feature centre c_i (paper)
                     after this batch's Eq. 4 update, "updated_centre" (also "centre"), or before it,
                     "previous_centre"; or "weight" (the classifier weight W_y)
    CENTER_DTYPE     storage of the C x D centres: "float32", "float16" or "bfloat16"
                     (Eq. 4 is computed in float32 either way)

SEED (tools/train_net.py): seed of every RNG (data order, initialisation, alpha); -1 = random,
as FastReID does by default.

DATASETS.LONG_TAIL (read by the ``*_LT`` datasets, paper Section 4.1):

    NUM_HEAD     H: the H identities with most images are kept whole
    TAIL_IMAGES  S: every other identity keeps S images
    SEED         seed of the choice of the S images
    SPLIT_FILE   a published split (JSON, as written to OUTPUT_DIR/long_tail_split.json by every
                 run) to train on instead of recomputing it ("" = compute from H, S, SEED)

MODEL.HEADS.LEAP.RESET_STATS: load a checkpoint (``--resume`` or MODEL.WEIGHTS) without its angular
statistics, which start afresh. A checkpoint whose statistics were collected with another
MEMORY_FACTOR, split or feature dimension is refused unless this is True.
"""
from fastreid.config import CfgNode as CN

from ..core import stats

__all__ = ["add_leap_config", "CLS_LAYER_MARGINS", "ANGLE_REFERENCES", "CENTER_DTYPES", "CENTER_RATE_WEIGHTS"]

# MODEL.HEADS.CLS_LAYER -> the margin of leap_logits (CosFace Eq. 7, ArcFace Eq. 8)
CLS_LAYER_MARGINS = {"CosSoftmax": "cos", "ArcSoftmax": "arc"}
ANGLE_REFERENCES = stats.ANGLE_REFERENCES
CENTER_RATE_WEIGHTS = stats.CENTER_RATE_WEIGHTS
CENTER_DTYPES = tuple(str(dtype).removeprefix("torch.") for dtype in stats.CENTER_DTYPES)  # yaml names


def add_leap_config(cfg):
    """Add MODEL.HEADS.LEAP and DATASETS.LONG_TAIL with the paper's defaults (in place)."""
    _C = cfg
    _C.MODEL.HEADS.LEAP = CN()
    _C.MODEL.HEADS.LEAP.VERSION = "full"
    _C.MODEL.HEADS.LEAP.HEAD_THRESHOLD = -1
    _C.MODEL.HEADS.LEAP.MEMORY_FACTOR = 1
    _C.MODEL.HEADS.LEAP.CENTER_RATE = 0.1
    _C.MODEL.HEADS.LEAP.CENTER_RATE_WEIGHTS = "batch_mean"
    _C.MODEL.HEADS.LEAP.START_EPOCH = 20
    _C.MODEL.HEADS.LEAP.ALPHA_PER_LOGIT = True
    _C.MODEL.HEADS.LEAP.TARGET_ONLY = False
    _C.MODEL.HEADS.LEAP.SIGNED_ALPHA = True
    _C.MODEL.HEADS.LEAP.MIN_ANGLES = 2
    _C.MODEL.HEADS.LEAP.ANGLE_REFERENCE = "updated_centre"
    _C.MODEL.HEADS.LEAP.CENTER_DTYPE = "float32"

    _C.DATASETS.LONG_TAIL = CN()
    _C.DATASETS.LONG_TAIL.NUM_HEAD = 20
    _C.DATASETS.LONG_TAIL.TAIL_IMAGES = 5
    _C.DATASETS.LONG_TAIL.SEED = 0
    _C.DATASETS.LONG_TAIL.SPLIT_FILE = ""

    _C.MODEL.HEADS.LEAP.RESET_STATS = False  # start the statistics afresh on resume (docstring)

    _C.SEED = -1
    return cfg
