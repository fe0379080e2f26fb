"""``add_leap_config(cfg)``: the LEAP keys, added to a FastReID config before the yaml merge.

MODEL.HEADS.LEAP (read by ``LEAPHead``; the margin comes from MODEL.HEADS.CLS_LAYER, s and m
from MODEL.HEADS.SCALE / MODEL.HEADS.MARGIN): one key per LEAP option of ``core.options.OPTIONS``,
its name in upper case (MEMORY_FACTOR for ``memory_factor``), with that option's meaning and
default, except where FastReID's default differs (``FASTREID_DEFAULTS``: HEAD_THRESHOLD -1 means
unset, as yacs needs a typed value; START_EPOCH 20).

SEED (tools/train_net.py): seed of every RNG (data order, initialisation, alpha); -1 = random,
as FastReID does by default.

DATASETS.LONG_TAIL (read by the ``*_LT`` datasets, paper Section 4.1):

    NUM_HEAD     H: the H identities with most images are kept whole
    TAIL_IMAGES  S: every other identity keeps S images
    SEED         seed of the choice of the S images
    SPLIT_FILE   a published split (JSON, as written to OUTPUT_DIR/long_tail_split.json by every
                 run) to train on instead of recomputing it ("" = compute from H, S, SEED)

"""
from fastreid.config import CfgNode as CN

from ..core.options import OPTIONS, LEAPOptions

__all__ = ["add_leap_config", "leap_options", "CLS_LAYER_MARGINS", "FASTREID_DEFAULTS"]

# MODEL.HEADS.CLS_LAYER -> the margin of leap_logits (CosFace Eq. 7, ArcFace Eq. 8)
CLS_LAYER_MARGINS = {"CosSoftmax": "cos", "ArcSoftmax": "arc"}
# FastReID's value where it differs from the option's default (a yaml value: -1 = T unset)
FASTREID_DEFAULTS = {"head_threshold": -1, "start_epoch": 20}


def add_leap_config(cfg):
    """Add MODEL.HEADS.LEAP and DATASETS.LONG_TAIL with the paper's defaults (in place)."""
    _C = cfg
    _C.MODEL.HEADS.LEAP = CN()
    for option in OPTIONS:
        setattr(_C.MODEL.HEADS.LEAP, option.name.upper(), FASTREID_DEFAULTS.get(option.name, option.default))

    _C.DATASETS.LONG_TAIL = CN()
    _C.DATASETS.LONG_TAIL.NUM_HEAD = 20
    _C.DATASETS.LONG_TAIL.TAIL_IMAGES = 5
    _C.DATASETS.LONG_TAIL.SEED = 0
    _C.DATASETS.LONG_TAIL.SPLIT_FILE = ""

    _C.SEED = -1
    return cfg


def leap_options(cfg) -> LEAPOptions:
    """The checked LEAP options of a config; errors name the key (MODEL.HEADS.LEAP.<NAME>)."""
    values = {option.name: cfg.MODEL.HEADS.LEAP[option.name.upper()] for option in OPTIONS}
    if isinstance(values["head_threshold"], int) and values["head_threshold"] < 0:
        values["head_threshold"] = None  # -1: unset
    return LEAPOptions.from_mapping(values, key=lambda name: f"MODEL.HEADS.LEAP.{name.upper()}")
