"""LEAP margin logits: CosFace (Eq. 7) and ArcFace (Eq. 8) with the feature-cloud angle alpha.

For a sample n of class y with cloud angle alpha (one per sample, or one per logit):

    Eq. 7 (CosFace):  target  s * (cos(theta_y + alpha) - m)      others  s * cos(theta_j + alpha)
    Eq. 8 (ArcFace):  target  s * cos(theta_y + alpha + m)        others  s * cos(theta_j + alpha)

with theta + alpha and theta + alpha + m clipped to [0, pi]. alpha = 0 gives the plain CosFace /
ArcFace logits (Eq. 1, Eq. 2). A row labelled -1 (PartialFC: its class lives on another rank)
gets alpha but no margin.

cos(theta + a) is evaluated as cos(theta) cos(a) - sin(theta) sin(a) with sin(theta) =
sqrt(1 - cos^2 theta) >= 0, so alpha = 0 returns the input cosine bit for bit, and the gradient
stays finite at cos(theta) = +-1 (where d acos / d cos is infinite).
"""
import math

import torch

from .stats import check_labels

__all__ = ["leap_logits", "MARGINS"]

MARGINS = ("cos", "arc")
_TINY = 1e-12  # floor of sin^2(theta): keeps d sin / d cos finite at cos = +-1


def cos_shifted(cosine: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """cos(clip(theta + shift, 0, pi)) for theta = arccos(cosine), computed in float32."""
    sine = (1.0 - cosine.square()).clamp(min=_TINY).sqrt()
    shifted = cosine * torch.cos(shift) - sine * torch.sin(shift)
    with torch.no_grad():
        total = torch.acos(cosine.clamp(-1.0, 1.0)) + shift
    shifted = torch.where(total > math.pi, torch.full_like(shifted, -1.0), shifted)
    return torch.where(total < 0, torch.ones_like(shifted), shifted)


def leap_logits(cosine: torch.Tensor, labels: torch.Tensor, alpha=None, margin: str = "cos",
                scale: float = 1.0, margin_value: float = 0.0) -> torch.Tensor:
    """Scaled margin logits with the feature cloud, Eq. 7 ("cos") or Eq. 8 ("arc").

    Args:
        cosine: [B, C] cos(theta) between normalised features and class weights.
        labels: [B] target column of each row, or -1 for a row with no target column here.
        alpha: None, or the cloud angles: [B], [B, 1] (one per sample) or [B, C] (one per logit).
        margin: "cos" (CosFace, additive cosine margin m_c) or "arc" (ArcFace, angular margin m_a).
        scale: s.
        margin_value: m_c or m_a.

    Returns:
        [B, C] float32 logits s * (...), differentiable w.r.t. ``cosine``.
    """
    if margin not in MARGINS:
        raise ValueError(f"margin must be one of {MARGINS} (cos: CosFace Eq. 7, arc: ArcFace Eq. 8), "
                         f"got {margin!r}")
    if cosine.dim() != 2:
        raise ValueError(f"cosine must have shape [B, C], got {tuple(cosine.shape)}")
    if labels.dim() != 1 or labels.shape[0] != cosine.shape[0]:
        raise ValueError(f"labels must have shape [B] = [{cosine.shape[0]}], got {tuple(labels.shape)}")
    check_labels(labels, cosine.shape[1])
    cosine = cosine.float()
    target = torch.zeros_like(cosine, dtype=torch.bool)
    target.scatter_(1, labels.clamp(min=0)[:, None], (labels >= 0)[:, None])

    if alpha is None:
        alpha = torch.zeros((), device=cosine.device)
    else:
        alpha = alpha.float()
        if alpha.dim() == 1:
            alpha = alpha[:, None]
        if alpha.dim() != 2 or alpha.shape[0] != cosine.shape[0] or alpha.shape[1] not in (1, cosine.shape[1]):
            raise ValueError(f"alpha must have shape [B], [B, 1] or [B, C] = {list(cosine.shape)}, "
                             f"got {tuple(alpha.shape)}")

    if margin == "cos":  # Eq. 7
        logits = cos_shifted(cosine, alpha) - margin_value * target
    else:  # Eq. 8
        logits = cos_shifted(cosine, alpha + margin_value * target)
    return logits * scale
