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

from ..core import AngularStats, FeatureCloud, leap_logits
from ..core.integrity import load_checked
from ..core.stats import angles_to_of
from .config import ANGLE_REFERENCES, CENTER_DTYPES, CENTER_RATE_WEIGHTS, CLS_LAYER_MARGINS

__all__ = ["LEAPHead", "find_leap_head"]


@REID_HEADS_REGISTRY.register()
class LEAPHead(EmbeddingHead):
    """EmbeddingHead + LEAP. Needs the training set's class counts: ``set_class_counts`` (done
    by ``LEAPTrainer``) or a checkpoint that holds them."""

    @configurable
    def __init__(self, *, leap_version, head_threshold, memory_factor, center_rate, start_epoch,
                 alpha_per_logit, target_only, signed_alpha, min_angles, angle_reference, center_dtype,
                 center_rate_weights, **kwargs):
        super().__init__(**kwargs)
        self.margin = CLS_LAYER_MARGINS[kwargs["cls_type"]]
        self.cloud = FeatureCloud(leap_version, None if head_threshold < 0 else head_threshold,
                                  alpha_per_logit, target_only, signed_alpha, min_angles)
        self.memory_factor, self.center_rate = memory_factor, center_rate
        self.center_rate_weights = center_rate_weights
        self.angle_to_weight = angle_reference == "weight"
        self.angles_to = angles_to_of(angle_reference)
        self.center_dtype = getattr(torch, center_dtype)
        self.start_epoch = start_epoch
        self.epoch = 0
        self.stats = None
        self.last_metrics = {}

    @classmethod
    def from_config(cls, cfg):
        args = super().from_config(cfg)
        leap = cfg.MODEL.HEADS.LEAP
        if args["cls_type"] not in CLS_LAYER_MARGINS:
            raise ValueError(f"MODEL.HEADS.CLS_LAYER={args['cls_type']!r} is not supported by LEAPHead: "
                             f"use one of {sorted(CLS_LAYER_MARGINS)} (CosFace Eq. 7 / ArcFace Eq. 8)")
        if leap.VERSION == "vanilla" and leap.HEAD_THRESHOLD < 0:
            raise ValueError("MODEL.HEADS.LEAP.HEAD_THRESHOLD must be set (>= 0) for "
                             "MODEL.HEADS.LEAP.VERSION 'vanilla': classes with more than T images are head")
        for key, value, ok in (("VERSION", leap.VERSION, leap.VERSION in ("full", "vanilla")),
                               ("MEMORY_FACTOR", leap.MEMORY_FACTOR, int(leap.MEMORY_FACTOR) >= 1),
                               ("CENTER_RATE", leap.CENTER_RATE, 0 <= leap.CENTER_RATE < 1),
                               ("CENTER_RATE_WEIGHTS", leap.CENTER_RATE_WEIGHTS,
                                leap.CENTER_RATE_WEIGHTS in CENTER_RATE_WEIGHTS),
                               ("START_EPOCH", leap.START_EPOCH, leap.START_EPOCH >= 0),
                               ("MIN_ANGLES", leap.MIN_ANGLES, int(leap.MIN_ANGLES) >= 2),
                               ("ANGLE_REFERENCE", leap.ANGLE_REFERENCE, leap.ANGLE_REFERENCE in ANGLE_REFERENCES),
                               ("CENTER_DTYPE", leap.CENTER_DTYPE, leap.CENTER_DTYPE in CENTER_DTYPES)):
            if not ok:
                raise ValueError(f"MODEL.HEADS.LEAP.{key}={value!r} is invalid: expected "
                                 + {"VERSION": "'full' or 'vanilla'", "MEMORY_FACTOR": "an integer >= 1",
                                    "CENTER_RATE": "a value in [0, 1)", "START_EPOCH": "an epoch >= 0",
                                    "CENTER_RATE_WEIGHTS": f"one of {CENTER_RATE_WEIGHTS}",
                                    "MIN_ANGLES": "an integer >= 2",
                                    "ANGLE_REFERENCE": f"one of {ANGLE_REFERENCES}",
                                    "CENTER_DTYPE": f"one of {CENTER_DTYPES}"}[key])
        args.update(leap_version=leap.VERSION, head_threshold=leap.HEAD_THRESHOLD,
                    memory_factor=leap.MEMORY_FACTOR, center_rate=leap.CENTER_RATE,
                    center_rate_weights=leap.CENTER_RATE_WEIGHTS,
                    start_epoch=leap.START_EPOCH, alpha_per_logit=leap.ALPHA_PER_LOGIT,
                    target_only=leap.TARGET_ONLY, signed_alpha=leap.SIGNED_ALPHA, min_angles=leap.MIN_ANGLES,
                    angle_reference=leap.ANGLE_REFERENCE, center_dtype=leap.CENTER_DTYPE)
        return args

    def set_class_counts(self, class_counts):
        """Create the statistics for K_i = class_counts[i] (relabelled training ids)."""
        counts = torch.as_tensor(class_counts, dtype=torch.long)
        if counts.numel() != self.weight.shape[0]:
            raise ValueError(f"{counts.numel()} class counts given for a classifier of "
                             f"{self.weight.shape[0]} classes (MODEL.HEADS.NUM_CLASSES)")
        self._build_stats(counts)

    def _build_stats(self, counts):
        self.stats = AngularStats(counts, self.weight.shape[1], self.memory_factor, self.center_rate,
                                  center_dtype=self.center_dtype, center_rate_weights=self.center_rate_weights,
                                  angles_to=self.angles_to).to(self.weight.device)

    def set_epoch(self, epoch: int):
        self.epoch = int(epoch)

    @property
    def cloud_active(self) -> bool:
        return self.epoch >= self.start_epoch

    # MODEL.HEADS.LEAP.RESET_STATS (LEAPTrainer sets it): load the checkpoint's model, fresh statistics
    reset_stats = False

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a checkpoint carries K_i: build the statistics from it before the buffers load (also for
        # --eval-only, where the classifier is built with NUM_CLASSES 0 and skipped by the loader)
        counts = state_dict.get(prefix + "stats.class_counts")
        if self.stats is None and counts is not None:
            self._build_stats(counts)
        if self.stats is not None:  # refuse statistics of other options (FastReID would load a part)
            load_checked(self.stats, state_dict, prefix + "stats.", self.reset_stats, STATS_OPTIONS,
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
            weight_y = self.weight.detach()[targets.clamp(min=0)] if self.angle_to_weight else None
            angles = self.stats.update(embedding, targets, weight_y)
            var = self.cloud.trusted_var(self.stats)  # [C] once per step, for std and the log
            ref = self.cloud.reference_var_from(var, self.stats.class_counts)
            std = self.cloud.std_from(var, self.stats.class_counts, targets, ref)
            if self.cloud_active:
                alpha = self.cloud.sample_from_std(std, cosine.shape[1], labels=targets)
            self.last_metrics = self._metrics(angles, std, alpha, ref)
        cls_outputs = leap_logits(cosine, targets, alpha, self.margin, self.cls_layer.s, self.cls_layer.m)
        return {
            "cls_outputs": cls_outputs,
            "pred_class_logits": cosine * self.cls_layer.s,
            "features": pool_feat[..., 0, 0] if self.neck_feat == "before" else neck_feat,
        }

    def _metrics(self, angles, std, alpha, reference_var):
        """Tensors for the training log (no host sync here; the hook reads them)."""
        tail = std > 0
        zero = torch.zeros((), device=std.device)
        return {
            "leap/reference_var": reference_var,
            "leap/cloud_fraction": tail.float().mean() if alpha is not None else zero,
            # mean |alpha| without a [B, C] temporary
            "leap/mean_abs_alpha": alpha.norm(p=1) / alpha.numel() if alpha is not None else zero,
            "leap/tail_mean_angle": (angles.nan_to_num() * tail).sum() / tail.sum().clamp(min=1),
            "leap/head_mean_angle": (angles.nan_to_num() * ~tail).sum() / (~tail).sum().clamp(min=1),
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
