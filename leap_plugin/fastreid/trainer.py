"""``LEAPTrainer``: FastReID's DefaultTrainer plus what LEAP needs, nothing else.

It hands the training set's class counts K_i (relabelled ids, as CommDataset numbers them) to the
LEAPHead, passes DATASETS.LONG_TAIL to the ``*_LT`` datasets, and adds ``LEAPEpochHook``. With
any other head it trains exactly like DefaultTrainer. Its OUTPUT_DIR is locked against a second
live run and its checkpoints are saved atomically (``checkpoint.py``).
"""
import logging
import os
from collections import Counter

from fastreid.data import build_reid_train_loader
from fastreid.engine import DefaultTrainer
from fastreid.utils import comm

from .checkpoint import LEAPCheckpointer, lock_output_dir
from .head import find_leap_head
from .hooks import LEAPEpochHook

__all__ = ["LEAPTrainer", "class_counts", "long_tail_kwargs"]


def class_counts(train_set):
    """K_i per relabelled class of a FastReID CommDataset (index = the label the model sees)."""
    counts = Counter(item[1] for item in train_set.img_items)
    return [counts[pid] for pid in train_set.pids]


def long_tail_kwargs(cfg, publish=True):
    """The ``long_tail`` argument of the ``*_LT`` datasets; ``publish``: write the split to OUTPUT_DIR."""
    lt = cfg.DATASETS.LONG_TAIL
    publish = publish and cfg.OUTPUT_DIR and comm.is_main_process()
    save = os.path.join(cfg.OUTPUT_DIR, "long_tail_split.json") if publish else ""
    return {"long_tail": {"num_head": lt.NUM_HEAD, "tail_images": lt.TAIL_IMAGES, "seed": lt.SEED,
                          "split_file": lt.SPLIT_FILE, "save_split": save}}


class LEAPTrainer(DefaultTrainer):
    def __init__(self, cfg):
        lock_output_dir(cfg.OUTPUT_DIR)  # before the split file or a checkpoint is written there
        super().__init__(cfg)
        self.checkpointer.__class__ = LEAPCheckpointer  # same state, atomic saves (the hooks hold it)
        head = find_leap_head(self.model)
        if head is not None:
            head.set_class_counts(class_counts(self.data_loader.dataset))
            _warn_if_the_cloud_never_switches_on(cfg, head)

    def resume_or_load(self, resume=True):
        head = find_leap_head(self.model)
        if head is not None and head.leap_options.reset_stats:
            logging.getLogger(__name__).warning(
                "MODEL.HEADS.LEAP.RESET_STATS: the angular statistics start afresh; any in the "
                "checkpoint are ignored")
        super().resume_or_load(resume=resume)

    @classmethod
    def build_train_loader(cls, cfg):
        return build_reid_train_loader(cfg, combineall=cfg.DATASETS.COMBINEALL, **long_tail_kwargs(cfg))

    def build_hooks(self):
        return super().build_hooks() + [LEAPEpochHook()]


def _warn_if_the_cloud_never_switches_on(cfg, head):
    log = logging.getLogger(__name__)
    start_epoch = head.leap_options.start_epoch
    if start_epoch >= cfg.SOLVER.MAX_EPOCH:
        log.warning(f"MODEL.HEADS.LEAP.START_EPOCH {start_epoch} >= SOLVER.MAX_EPOCH {cfg.SOLVER.MAX_EPOCH}: "
                    f"the feature cloud never switches on (this run trains as the host's head)")
    reason = head.leap.cloud.never_on_reason(head.stats.class_counts)
    if reason:
        log.warning(f"MODEL.HEADS.LEAP.HEAD_THRESHOLD: {reason}")
