"""``LEAP``: one object that does the method, whatever the host (paper Section 3.3-3.4).

It owns the checked options (``LEAPOptions``), the angular statistics (``AngularStats``, Eq. 3-5),
the feature cloud (``FeatureCloud``, Eq. 6 / 9), the epoch gating and the noise. An adapter keeps
only its host's contract and calls, once per training step::

    angles = leap.observe(features, labels)          # Eq. 3-5 (every update_every-th step)
    std, ref = leap.cloud_std(labels)                # Eq. 6 / 9: [B] cloud std, reference variance
    alpha = leap.alpha(std, num_logits, labels) if leap.cloud_active else None
    logits = leap_logits(cosine, labels, alpha, ...)  # Eq. 7 / 8
    leap.record_metrics(angles, std, alpha, ref)     # leap.metrics: what the host logs

The statistics are an ``nn.Module`` the adapter registers as its own ``stats`` submodule, so they
are in the host's checkpoint (``<head or loss>.stats.*``); the epoch and step are plain counters.
"""
import math

import torch

from .cloud import FeatureCloud
from .noise import CloudAlpha, KeyedNormal, step_key
from .options import LEAPOptions
from .stats import AngularStats

__all__ = ["LEAP"]


class LEAP:
    """The LEAP method for one classifier (or one model-parallel block of it).

    Args:
        class_counts: K_i of the classes the statistics track (LongTensor [C]).
        feat_dim: D, the dimension of the features the classifier sees.
        options: a :class:`LEAPOptions` (checked once, where the host read them).
        sync: data parallel: gather every rank's batch before the statistics' update (FastReID's
            DDP); False when the host gathers the batch itself (arcface_torch's PartialFC).
        seed: None: alpha is drawn from torch's global RNG (the host seeds it); an integer: alpha
            is a pure function of (seed, step, row, column) (``core.noise``), the same on every
            rank whatever the class split (model parallel).
    """

    def __init__(self, class_counts, feat_dim: int, options: LEAPOptions, sync: bool = True, seed=None):
        self.options = options
        self.cloud = FeatureCloud(options.version, options.head_threshold, options.alpha_per_logit,
                                  options.target_only, options.signed_alpha, options.min_angles)
        self.stats = AngularStats(class_counts, feat_dim, options.memory_factor, options.center_rate, sync=sync,
                                  center_dtype=options.center_dtype,
                                  center_rate_weights=options.center_rate_weights, angles_to=options.angles_to)
        if seed is not None and (int(seed) != seed or seed < 0):
            raise ValueError(f"seed must be an integer >= 0 (or None: torch's RNG), got {seed!r}")
        self.seed = None if seed is None else int(seed)
        self.epoch = 0
        self.step = 0  # training steps observed
        self.metrics = {}

    def __repr__(self):
        return f"LEAP({self.options}, {self.stats.extra_repr()}, seed={self.seed})"

    # ------------------------------------------------------------------ epoch gating
    def set_epoch(self, epoch: int) -> None:
        """The training epoch (0-based); the cloud is on from ``options.start_epoch``."""
        if isinstance(epoch, bool) or int(epoch) != epoch or epoch < 0:
            raise ValueError(f"epoch must be a non-negative integer, got {epoch!r}")
        self.epoch = int(epoch)

    @property
    def cloud_active(self) -> bool:
        return self.epoch >= self.options.start_epoch

    # ------------------------------------------------------------------ Eq. 3-5
    def observe(self, features: torch.Tensor, labels: torch.Tensor, weight_rows=None):
        """One training step's features: Eq. 3-5 on every ``update_every``-th step; the step advances.

        Args:
            features: [B, D] features (not differentiated), or a callable that returns them (called
                on update steps only: e.g. a collective gather).
            labels: [B] class of each row in the tracked classes, -1 to ignore.
            weight_rows: [B, D] the classifier weight rows W_y, needed when ``angle_reference`` is
                "weight" (or a callable that returns them, called on update steps only).

        Returns the [B] angles of ``AngularStats.update``, or None on a step without an update.
        """
        update = self.step % self.options.update_every == 0
        self.step += 1
        if not update:
            return None
        reference = None
        if self.options.angle_to_weight:
            reference = weight_rows() if callable(weight_rows) else weight_rows
            if reference is None:
                raise ValueError("angle_reference 'weight' measures Eq. 3's angles to the classifier weight: "
                                 "pass the rows W_y of the batch's labels")
        return self.stats.update(features() if callable(features) else features, labels, reference)

    # ------------------------------------------------------------------ Eq. 6 / 9
    def cloud_std(self, labels: torch.Tensor, all_reduce=None):
        """``(std, reference variance)``: [B] cloud std sqrt(max(sigma_ref^2 - sigma_y^2, 0)) of each
        row (0 for head classes, unknown variances and label -1) and the 0-dim reference.

        ``all_reduce``: model parallel (each rank tracks a block of the classes; a row's label is
        -1 where its class is in another block): an in-place sum over the ranks of a float32
        tensor (``torch.distributed.all_reduce``). One call sums the reference variance's two
        sums (they add up over blocks) and sigma_y of every row (one block holds each class).
        """
        var = self.cloud.trusted_var(self.stats)
        sums = self.cloud.reference_sums(var, self.stats.class_counts)
        var_y, eligible = self.cloud.cloud_rows(var, self.stats.class_counts, labels)
        if all_reduce is not None:
            packed = torch.cat([sums, var_y, eligible.float()])
            all_reduce(packed)
            batch = var_y.shape[0]
            sums, var_y, eligible = packed[:2], packed[2: 2 + batch], packed[2 + batch:] > 0
        ref = sums[0] / sums[1]
        return self.cloud.std_of(ref, var_y, eligible), ref

    # ------------------------------------------------------------------ alpha
    def alpha(self, std: torch.Tensor, num_logits: int, labels=None, step=None, columns=None, lazy=False):
        """alpha ~ N(0, std^2) of Eq. 7 / 8: [B, num_logits] per logit, [B, 1] per sample; with
        ``target_only``, zero but in each row's target column (``labels``).

        With a ``seed`` the draw is keyed by ``step`` (default: the step just observed), the row
        (0..B-1 of the batch) and ``columns`` (the global class of each logit column; default
        0..num_logits-1); ``lazy`` then returns a per-logit alpha as a ``leap_logits`` block source,
        drawn block by block where it is used, instead of a tensor. Without a seed it comes from
        torch's RNG.
        """
        if self.seed is None:
            return self.cloud.sample_from_std(std, num_logits, labels=labels)
        rows = torch.arange(std.shape[0], device=std.device)
        if self.cloud.noise_columns(num_logits) == 1:
            columns = None
        elif columns is None:
            columns = torch.arange(num_logits, device=std.device)
        table = KeyedNormal(step_key(self.seed, self.step - 1 if step is None else step), rows, columns)
        if columns is None:
            return self.cloud.alpha_from_noise(table.full(), std, num_logits, labels)
        alpha = CloudAlpha(table, std, self.cloud)
        return alpha if lazy else alpha.full()

    # ------------------------------------------------------------------ what the host logs
    def record_metrics(self, angles, std: torch.Tensor, alpha, reference_var: torch.Tensor) -> dict:
        """``self.metrics``: 0-dim tensors for the training log (no host sync here).

        leap/reference_var, leap/cloud_fraction (rows with a cloud while it is on), leap/mean_abs_alpha
        (of a block source: over its first column, B draws), leap/tail_mean_angle and
        leap/head_mean_angle (the mean Eq. 3 angle of the rows with and without a cloud that
        stored one; from the last update step when this step made none). Returns the dict.
        """
        tail = std > 0
        zero = torch.zeros((), device=std.device)
        metrics = {"leap/reference_var": reference_var,
                   "leap/cloud_fraction": tail.float().mean() if alpha is not None else zero,
                   "leap/mean_abs_alpha": zero if alpha is None else _mean_abs(alpha)}
        if angles is not None:  # over the rows that stored an angle (NaN: ignored, a repeat, unseen)
            measured = ~angles.isnan()
            for name, rows in (("tail", tail & measured), ("head", ~tail & measured)):
                metrics[f"leap/{name}_mean_angle"] = (angles.nan_to_num() * rows).sum() / rows.sum().clamp(min=1)
        else:
            nan = torch.full((), math.nan, device=std.device)
            metrics["leap/tail_mean_angle"] = self.metrics.get("leap/tail_mean_angle", nan)
            metrics["leap/head_mean_angle"] = self.metrics.get("leap/head_mean_angle", nan)
        self.metrics = metrics
        return metrics


def _mean_abs(alpha) -> torch.Tensor:
    if torch.is_tensor(alpha):
        return alpha.norm(p=1) / alpha.numel()  # without a [B, C] temporary
    return alpha[:, 0:1].abs().mean()  # a block source: its first column
