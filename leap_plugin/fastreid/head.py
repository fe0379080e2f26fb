"""``LEAPHead``: FastReID's EmbeddingHead with the feature cloud where the logits are made.

Pooling, neck, classifier weight and evaluation output are the host's, untouched. In training,
the normalised classifier input updates the angular statistics (Eq. 3-5) and, from
MODEL.HEADS.LEAP.START_EPOCH on, tail samples get the cloud angle alpha in the CosFace / ArcFace
logits (Eq. 7 / Eq. 8). Switch it on with ``MODEL.HEADS.NAME: LEAPHead``.
"""
import torch
import torch.nn.functional as F

from fastreid.config import configurable
from fastreid.modeling.heads import EmbeddingHead
from fastreid.modeling.heads.build import REID_HEADS_REGISTRY

from ..core import LEAP, leap_logits
from ..core.integrity import load_checked
from .config import CLS_LAYER_MARGINS, leap_options

__all__ = ["LEAPHead", "find_leap_head"]


@REID_HEADS_REGISTRY.register()
class LEAPHead(EmbeddingHead):
    """EmbeddingHead + LEAP (``core.LEAP``, options from MODEL.HEADS.LEAP). Needs the training
    set's class counts: ``set_class_counts`` (done by ``LEAPTrainer``) or a checkpoint that holds
    them."""

    @configurable
    def __init__(self, *, leap_options, **kwargs):
        super().__init__(**kwargs)
        self.margin = CLS_LAYER_MARGINS[kwargs["cls_type"]]
        self.leap_options = leap_options
        self.leap = None  # core.LEAP, built with the class counts
        self.stats = None  # self.leap.stats, registered here: the checkpoint holds heads.stats.*
        self.epoch = 0
        self.last_metrics = {}

    @classmethod
    def from_config(cls, cfg):
        args = super().from_config(cfg)
        if args["cls_type"] not in CLS_LAYER_MARGINS:
            raise ValueError(f"MODEL.HEADS.CLS_LAYER={args['cls_type']!r} is not supported by LEAPHead: "
                             f"use one of {sorted(CLS_LAYER_MARGINS)} (CosFace Eq. 7 / ArcFace Eq. 8)")
        args["leap_options"] = leap_options(cfg)
        return args

    def set_class_counts(self, class_counts):
        """Create the statistics for K_i = class_counts[i] (relabelled training ids)."""
        counts = torch.as_tensor(class_counts, dtype=torch.long)
        if counts.numel() != self.weight.shape[0]:
            raise ValueError(f"{counts.numel()} class counts given for a classifier of "
                             f"{self.weight.shape[0]} classes (MODEL.HEADS.NUM_CLASSES)")
        self._build_leap(counts)

    def _build_leap(self, counts):
        self.leap = LEAP(counts, self.weight.shape[1], self.leap_options)
        self.leap.set_epoch(self.epoch)
        self.stats = self.leap.stats.to(self.weight.device)

    def set_epoch(self, epoch: int):
        """The training epoch (LEAPEpochHook, before each epoch): the cloud is on from START_EPOCH."""
        self.epoch = int(epoch)
        if self.leap is not None:
            self.leap.set_epoch(epoch)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a checkpoint carries K_i: build the statistics from it before the buffers load (also for
        # --eval-only, where the classifier is built with NUM_CLASSES 0 and skipped by the loader)
        counts = state_dict.get(prefix + "stats.class_counts")
        if self.stats is None and counts is not None:
            self._build_leap(counts)
        if self.stats is not None:  # refuse statistics of other options (FastReID would load a part)
            load_checked(self.stats, state_dict, prefix + "stats.", self.leap_options.reset_stats, STATS_OPTIONS,
                         "set MODEL.HEADS.LEAP.RESET_STATS True to keep the checkpoint's model and "
                         "start the statistics afresh")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, features, targets=None):
        pool_feat = self.pool_layer(features)
        neck_feat = self.bottleneck(pool_feat)[..., 0, 0]
        if not self.training:
            return neck_feat
        if self.stats is None:
            raise RuntimeError("LEAPHead has no class counts: train with leap_plugin.fastreid.LEAPTrainer "
                               "(tools/train_net.py) or call set_class_counts(K) before training")

        embedding = F.normalize(neck_feat)
        cosine = F.linear(embedding, F.normalize(self.weight))
        alpha = None
        if torch.is_grad_enabled():  # a real step: not PreciseBN or any other no-grad pass
            leap = self.leap
            angles = leap.observe(embedding, targets, lambda: self.weight.detach()[targets.clamp(min=0)])
            std, ref = leap.cloud_std(targets)
            if leap.cloud_active:
                alpha = leap.alpha(std, cosine.shape[1], targets)
            self.last_metrics = leap.record_metrics(angles, std, alpha, ref)
        cls_outputs = leap_logits(cosine, targets, alpha, self.margin, self.cls_layer.s, self.cls_layer.m)
        return {
            "cls_outputs": cls_outputs,
            "pred_class_logits": cosine * self.cls_layer.s,
            "features": pool_feat[..., 0, 0] if self.neck_feat == "before" else neck_feat,
        }


def find_leap_head(model):
    """The LEAPHead inside a (possibly DDP-wrapped) model, or None."""
    for module in model.modules():
        if isinstance(module, LEAPHead):
            return module
    return None


# the FastReID names of the options a saved statistics state must share with the run (core.integrity)
STATS_OPTIONS = {"memory_factor": "MODEL.HEADS.LEAP.MEMORY_FACTOR",
                 "class_counts": "the training split (DATASETS.NAMES, DATASETS.LONG_TAIL)",
                 "feat_dim": "the feature dimension (MODEL.BACKBONE.FEAT_DIM, MODEL.HEADS.EMBEDDING_DIM)"}
