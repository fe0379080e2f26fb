"""The feature cloud (paper Section 3.4): which classes get one, and how wide it is.

A sample of class y with angular variance sigma_y^2 below the reference variance gets an angle
perturbation alpha ~ N(0, sigma_ref^2 - sigma_y^2) added to its angles in the margin logits
(Eq. 7, Eq. 8). The reference variance is

* vanilla (Eq. 6): sigma_h^2, the mean variance of the head classes, K_i > T;
* full (Eq. 9): sigma^2 = sum_i (K_i - 1) sigma_i^2 / sum_i (K_i - 1), and every class with
  sigma_i^2 < sigma^2 gets a cloud (no head/tail threshold).

Classes whose variance is not known yet (fewer than 2 angles in memory) take no part: they are
left out of the reference and get no cloud.
"""
import math

import torch

from .options import check_head_threshold, check_option
from .stats import AngularStats, check_labels

__all__ = ["FeatureCloud"]


class FeatureCloud:
    """Reference variance and alpha sampling for the feature cloud.

    Args:
        version: "full" (Eq. 9, default) or "vanilla" (Eq. 6 with a head/tail threshold).
        head_threshold: T for the vanilla version: a class with K_i > T images is a head class
            (never gets a cloud, and defines sigma_h^2). Required for "vanilla", unused for "full".
        alpha_per_logit: draw one alpha per (sample, class logit) -- the paper's
            "alpha_x in R^{1 x C}" -- (True, default) or one alpha per sample shared by all its
            logits (False).
        target_only: perturb only the target logit's angle theta_y (Eq. 7 / 8 write alpha_y in
            the non-target terms too, so the paper's reading is False, the default).
        signed: alpha ~ N(0, s^2) as the paper states (True, default), or |alpha| (False: the
            cloud only ever widens the angle to the class weight).
        min_angles: a class's variance is trusted (enters the reference and gets a cloud) once
            its angle memory holds at least this many angles (>= 2; the paper does not say).
    """

    def __init__(self, version: str = "full", head_threshold=None, alpha_per_logit: bool = True,
                 target_only: bool = False, signed: bool = True, min_angles: int = 2):
        self.version = check_option("version", version)
        self.head_threshold = check_option("head_threshold", head_threshold)
        check_head_threshold(self.version, self.head_threshold)
        self.min_angles = check_option("min_angles", min_angles)
        self.alpha_per_logit = bool(alpha_per_logit)
        self.target_only = bool(target_only)
        self.signed = bool(signed)

    def __repr__(self):
        return (f"FeatureCloud(version={self.version!r}, head_threshold={self.head_threshold}, "
                f"alpha_per_logit={self.alpha_per_logit}, target_only={self.target_only}, "
                f"signed={self.signed}, min_angles={self.min_angles})")

    def trusted_var(self, stats: AngularStats) -> torch.Tensor:
        """[C] sigma_i^2, NaN for classes with fewer than ``min_angles`` angles in memory."""
        var = stats.var
        return torch.where(stats.num_angles >= self.min_angles, var, torch.full_like(var, math.nan))

    def is_head(self, class_counts: torch.Tensor) -> torch.Tensor:
        """[C] bool: head classes by the vanilla threshold (all False for the full version)."""
        if self.version == "vanilla":
            return class_counts > self.head_threshold
        return torch.zeros_like(class_counts, dtype=torch.bool)

    def reference_sums(self, var: torch.Tensor, class_counts: torch.Tensor) -> torch.Tensor:
        """[2] float32 (numerator, denominator) of the reference variance over these classes.

        Vanilla (Eq. 6): (sum of the head classes' sigma_i^2, their number); full (Eq. 9):
        (sum (K_i - 1) sigma_i^2, sum (K_i - 1)). Classes with unknown (NaN) variance are left out.
        Sums over disjoint class blocks add up (model parallel: an all-reduce of these two numbers).
        """
        known = ~torch.isnan(var)
        if self.version == "vanilla":
            weight = (known & self.is_head(class_counts)).float()
        else:
            weight = torch.where(known, (class_counts - 1).float(), torch.zeros_like(var))
        return torch.stack([torch.where(known, var, torch.zeros_like(var)).mul(weight).sum(), weight.sum()])

    def reference_var_from(self, var: torch.Tensor, class_counts: torch.Tensor) -> torch.Tensor:
        """Reference variance from per-class variances [C] (NaN = unknown) and counts K_i [C].

        Returns a 0-dim float32 tensor: sigma_h^2 (vanilla, Eq. 6) or sigma^2 (full, Eq. 9);
        NaN while no class qualifies.
        """
        numerator, denominator = self.reference_sums(var, class_counts)
        return numerator / denominator

    def reference_var(self, stats: AngularStats) -> torch.Tensor:
        """sigma_h^2 (vanilla, Eq. 6) or sigma^2 (full, Eq. 9) of the tracked statistics."""
        return self.reference_var_from(self.trusted_var(stats), stats.class_counts)

    def cloud_rows(self, var: torch.Tensor, class_counts: torch.Tensor, labels: torch.Tensor):
        """``(var_y, eligible)`` for a batch: [B] sigma_y^2 (0 where not eligible) and [B] bool,
        True where the sample's class may get a cloud (label >= 0, known variance, not head)."""
        safe = labels.clamp(min=0)
        var_y = var[safe]
        eligible = (labels >= 0) & ~torch.isnan(var_y) & ~self.is_head(class_counts[safe])
        return torch.where(eligible, var_y, torch.zeros_like(var_y)), eligible

    @staticmethod
    def std_of(ref: torch.Tensor, var_y: torch.Tensor, eligible: torch.Tensor) -> torch.Tensor:
        """[B] cloud std sqrt(max(sigma_ref^2 - sigma_y^2, 0)) (Eq. 6 / 9); 0 where not eligible
        or while the reference is unknown."""
        gap = (ref - var_y).clamp(min=0)
        return torch.where(eligible & ~torch.isnan(gap), gap, torch.zeros_like(gap)).sqrt()

    def std_from(self, var: torch.Tensor, class_counts: torch.Tensor, labels: torch.Tensor, ref=None):
        """[B] cloud std sqrt(max(sigma_ref^2 - sigma_y^2, 0)); 0 for head, unknown or -1 labels.

        ``ref``: the reference variance if already computed (``reference_var_from(var, class_counts)``).
        """
        if ref is None:
            ref = self.reference_var_from(var, class_counts)
        return self.std_of(ref, *self.cloud_rows(var, class_counts, labels))

    def std(self, stats: AngularStats, labels: torch.Tensor) -> torch.Tensor:
        """[B] cloud std of each sample's class (Section 3.4); 0 where the class gets no cloud."""
        check_labels(labels, stats.num_classes)
        return self.std_from(self.trusted_var(stats), stats.class_counts, labels.to(stats.centers.device))

    def noise_columns(self, num_logits: int) -> int:
        """Columns of standard normal noise one row needs: num_logits per logit, else 1."""
        return num_logits if self.alpha_per_logit and not self.target_only else 1

    def alpha_from_noise(self, noise: torch.Tensor, std: torch.Tensor, num_logits: int, labels=None):
        """alpha = noise * std (per row), |alpha| unless signed; with target_only, [B, num_logits]
        that is zero but in each row's target column (``labels``; -1: no target, all zero).

        ``noise``: [B, noise_columns(num_logits)] standard normal draws (overwritten).
        """
        alpha = noise.mul_(std[:, None])
        if not self.signed:
            alpha.abs_()
        if self.target_only:
            if labels is None:
                raise ValueError("target_only alpha needs the labels (the target column of each row)")
            alpha = torch.zeros(std.shape[0], num_logits, device=std.device).scatter_(
                1, labels.clamp(min=0)[:, None], alpha * (labels >= 0)[:, None])
        return alpha

    def sample_from_std(self, std: torch.Tensor, num_logits: int, generator=None, labels=None) -> torch.Tensor:
        """alpha ~ N(0, std^2): [B, num_logits] if alpha_per_logit else [B, 1]; with target_only,
        [B, num_logits] that is zero but in each row's target column (``labels`` needed)."""
        noise = torch.randn(std.shape[0], self.noise_columns(num_logits), device=std.device, generator=generator)
        return self.alpha_from_noise(noise, std, num_logits, labels)

    def never_on_reason(self, class_counts) -> str:
        """Why no sample can ever get a cloud with these K_i ('' if one can): the vanilla version
        with no class above T has no head class to take sigma_h^2 (Eq. 6) from."""
        counts = torch.as_tensor(class_counts)
        if self.version != "vanilla" or bool(self.is_head(counts).any()):
            return ""
        return (f"no class has more than head_threshold T = {self.head_threshold} images (the largest "
                f"K_i is {int(counts.max())}): the vanilla reference variance (Eq. 6) has no head class, "
                f"so no sample ever gets a cloud")

    def sample(self, stats: AngularStats, labels: torch.Tensor, generator=None,
               num_logits=None) -> torch.Tensor:
        """Draw alpha for a mini-batch: [B, C] (per logit) or [B, 1] (per sample).

        Args:
            stats: the tracked angular statistics.
            labels: [B] class of each sample (-1: no cloud).
            generator: optional torch.Generator for reproducible draws.
            num_logits: number of logit columns (default: stats.num_classes).
        """
        num_logits = stats.num_classes if num_logits is None else num_logits
        return self.sample_from_std(self.std(stats, labels), num_logits, generator, labels)
