"""FastReID adapter. ``import leap_plugin.fastreid`` is the whole integration: it applies the
fastreid 1.4.0 compatibility patches (compat.py) and registers ``LEAPHead`` in
REID_HEADS_REGISTRY and the long-tailed / Omniglot datasets in DATASET_REGISTRY.

    cfg = get_cfg(); add_leap_config(cfg); cfg.merge_from_file(...)   # MODEL.HEADS.NAME: LEAPHead
    trainer = LEAPTrainer(cfg)
"""
from . import compat

compat.apply()

from .config import add_leap_config  # noqa: E402
from .datasets import register_long_tail  # noqa: E402
from .head import LEAPHead, find_leap_head  # noqa: E402
from .hooks import LEAPEpochHook  # noqa: E402
from .omniglot import Omniglot, OmniglotVal  # noqa: E402
from .trainer import LEAPTrainer  # noqa: E402

__all__ = ["add_leap_config", "register_long_tail", "LEAPHead", "find_leap_head", "LEAPEpochHook",
           "LEAPTrainer", "Omniglot", "OmniglotVal"]
