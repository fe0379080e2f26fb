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

Cost: Eq. 7 / 8 are one autograd node whose backward is one multiplication by the saved
derivative; the [B, C] part is made of arithmetic passes only (no arccos, no boolean masks), and
the target column (one per row) is computed on its own, B values, then written in.
"""
import math

import torch
from torch.autograd.function import once_differentiable

from .blocks import blocks
from .stats import check_labels, require, values_in

__all__ = ["leap_logits", "leap_logits_reference", "shifted_cos_reference", "check_margin", "MARGINS"]

MARGINS = ("cos", "arc")
_TINY = 1e-12  # floor of sin^2(theta): keeps d sin / d cos finite at cos = +-1
_BELOW_PI = 3.141592502593994  # the float32 just below pi (sin of it is > 0)
_COS_SLACK = 1e-2  # |cos| beyond 1 that rounding (16-bit matmuls) may give; more is not a cosine


def check_margin(margin: str, scale: float, margin_value: float) -> None:
    """Raise a ValueError unless (margin, s, m) define Eq. 7 ("cos") or Eq. 8 ("arc")."""
    if margin not in MARGINS:
        raise ValueError(f"margin must be one of {MARGINS} (cos: CosFace Eq. 7, arc: ArcFace Eq. 8), "
                         f"got {margin!r}")
    if not float(scale) > 0:
        raise ValueError(f"scale (s) must be > 0, got {scale}")
    if not 0.0 <= float(margin_value) < math.pi:
        raise ValueError(f"margin_value (m) must lie in [0, pi), got {margin_value}")


def shifted_cos(cosine, shift, scale=1.0, grad_cosine=False, grad_shift=False):
    """s * cos(clip(theta + shift, 0, pi)) for theta = arccos(cosine), and its derivatives.

    No autograd here (see :class:`_LEAPLogits`). With S = sin(theta) = sqrt(max(1 - cos^2, 1e-12))
    and (a, b) = (cos shift, sin shift):

        cos(theta + shift) = cosine * a - S * b,    sin(theta + shift) = S * a + cosine * b.

    For shift in [-pi, pi] (a larger |shift| clips the same way, so it is clamped first, to the
    float just below pi, where sin > 0), theta + shift lies in [-pi, 2 pi] and leaves [0, pi]
    exactly when sin(theta + shift) < 0: above pi if shift > 0 (value -1), below 0 if shift < 0
    (value 1) -- no arccos needed. Inside [0, pi], d/d cosine = a + cosine * b / S (just a at
    cosine = +-1, where S is the constant floor) and d/d shift = -sin(theta + shift); both are 0
    where clipped.

    Returns (value, d value / d cosine or None, d value / d shift or None), all of the broadcast
    shape. Every [B, C] step is a float pass, in place where it can be: boolean masks,
    ``torch.where`` and fresh [B, C] buffers cost several arithmetic passes each on CPU.
    """
    # Buffers: "new" allocates; "in X" reuses X's buffer, after which X's old value is gone.
    a = shift.clamp(-_BELOW_PI, _BELOW_PI)  # new: the clamped shift, cos(shift) two lines down
    b = torch.sin(a)  # new: sin(shift)
    a.cos_()  # in a: cos(shift)
    sin2 = torch.addcmul(cosine.new_ones(()), cosine, cosine, value=-1.0)  # new: 1 - cos^2
    sine = sin2.clamp(min=_TINY).sqrt_()  # new: S = sin(theta), floored
    out = (cosine * a).addcmul_(sine, b, value=-1.0)  # new: cos(theta + shift), unclipped
    cos_b = cosine * b  # new: cos(theta) sin(shift)
    sign = b.sign_()  # in b: sign(shift) (sin keeps the sign on [-pi, pi] below pi)
    inv_sine = sin2.clamp_(min=0.0).sqrt_().div_(sine).div_(sine) if grad_cosine else None  # in sin2: 1/S, 0 at floor
    sin_sum = sine.mul_(a).add_(cos_b)  # in sine: sin(theta + shift)
    d_shift = sin_sum.clamp(min=0.0).mul_(-scale) if grad_shift else None  # new
    inside = sin_sum.sign_().clamp_(min=0.0).mul_(scale)  # in sine: s where theta + shift is in [0, pi], else 0
    d_cosine = cos_b.mul_(inv_sine).add_(a).mul_(inside) if grad_cosine else None  # in cos_b
    # inside: s * out + 0 (bit for bit);  clipped: 0 * out + (0 - s) * sign(shift) = -s * sign(shift)
    out.mul_(inside).addcmul_(inside.sub_(scale), sign)  # in out; inside becomes inside - s
    return out, d_cosine, d_shift


def shifted_cos_reference(cosine: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """cos(clip(theta + shift, 0, pi)) for theta = arccos(cosine), written plainly (fresh tensors,
    ``torch.where``, differentiable by autograd): the reference :func:`shifted_cos`'s fused values
    and hand-written derivatives are tested against (tests/core/test_margins.py)."""
    a = shift.clamp(-_BELOW_PI, _BELOW_PI)
    sine = (1 - cosine * cosine).clamp(min=_TINY).sqrt()  # sin(theta) >= 0
    sin_sum = sine * torch.cos(a) + cosine * torch.sin(a)  # sin(theta + shift)
    cos_sum = cosine * torch.cos(a) - sine * torch.sin(a)  # cos(theta + shift)
    # theta + shift in [-pi, 2 pi] leaves [0, pi] exactly where sin(theta + shift) < 0: above pi
    # for shift > 0 (cos pi = -1), below 0 for shift < 0 (cos 0 = 1)
    return torch.where(sin_sum > 0, cos_sum, -torch.sign(a))


def leap_logits_reference(cosine, labels, alpha=None, margin="cos", scale=1.0, margin_value=0.0):
    """Eq. 7 / 8 written as printed, with autograd (no fused kernel, no in-place buffer): the
    reference :func:`leap_logits` (one hand-differentiated autograd node) is tested against."""
    target = torch.zeros_like(cosine, dtype=torch.bool)
    target.scatter_(1, labels.clamp(min=0)[:, None], (labels >= 0)[:, None])  # row -1: no target
    alpha = torch.zeros_like(cosine) if alpha is None else alpha.reshape(cosine.shape[0], -1).expand_as(cosine)
    if margin == "cos":  # Eq. 7: s (cos(theta_y + alpha) - m), s cos(theta_j + alpha)
        return scale * (shifted_cos_reference(cosine, alpha) - margin_value * target)
    # Eq. 8: s cos(theta_y + alpha + m), s cos(theta_j + alpha)
    return scale * shifted_cos_reference(cosine, alpha + margin_value * target)


def blocked_shifted_cos(cosine, shift, scale=1.0, grad_cosine=False, grad_shift=False, out=None):
    """:func:`shifted_cos` of [B, C] cosines, block by block (``core.blocks``): the same values,
    written into [B, C] results without [B, C] temporaries.

    ``shift``: a [B, 1] or [B, C] tensor, or a [B, C] block source (``shift[rows, cols]`` with
    slices gives that block: an alpha drawn block by block, never held whole). ``out``: where
    the values go (may be ``cosine`` itself: each block is read before it is written).
    """
    parts = list(blocks(*cosine.shape, cosine.device))

    def part(r, c):
        return shifted_cos(cosine[r, c], shift[r, c] if shift.shape[1] > 1 else shift[r], scale,
                           grad_cosine, grad_shift)
    if len(parts) == 1 and out is None:
        return part(*parts[0])
    results = [torch.empty_like(cosine) if wanted else None for wanted in (out is None, grad_cosine, grad_shift)]
    results[0] = out if out is not None else results[0]
    for r, c in parts:
        for result, block in zip(results, part(r, c)):
            if result is not None:
                result[r, c] = block
    return tuple(results)


class _LEAPLogits(torch.autograd.Function):
    """Eq. 7 / Eq. 8 with alpha, as one autograd node: the backward is a single multiplication."""

    @staticmethod
    def forward(ctx, cosine, alpha, labels, margin, scale, margin_value, inplace, straight_through):
        grads = ctx.needs_input_grad[0] and not straight_through, alpha is not None and ctx.needs_input_grad[1]
        column = labels.clamp(min=0)[:, None]
        cos_y = cosine.gather(1, column)  # before an in-place write
        # every column j, Eq. 7 and Eq. 8 alike: s * cos(theta_j + alpha)
        if alpha is None:
            logits, d_cosine, d_alpha = cosine.mul_(scale) if inplace else cosine * scale, None, None
        else:
            logits, d_cosine, d_alpha = blocked_shifted_cos(cosine, alpha, scale, *grads,
                                                            out=cosine if inplace else None)
        if inplace:
            ctx.mark_dirty(cosine)
        # the target column y, B values: s * (cos(theta_y + alpha) - m) (Eq. 7) or
        # s * cos(theta_y + alpha + m) (Eq. 8); a row labelled -1 keeps the plain value
        alpha_y = (cosine.new_zeros(()) if alpha is None else alpha if alpha.shape[1] == 1
                   else alpha.gather(1, column))
        if margin == "cos":  # Eq. 7
            y, dc_y, da_y = shifted_cos(cos_y, alpha_y, 1.0, *grads)
            y = (y - margin_value) * scale  # as the host's CosSoftmax rounds it
            dc_y, da_y = (None if d is None else d * scale for d in (dc_y, da_y))
        else:  # Eq. 8
            y, dc_y, da_y = shifted_cos(cos_y, alpha_y + margin_value, scale, *grads)
        no_target = labels[:, None] < 0
        logits.scatter_(1, column, torch.where(no_target, logits.gather(1, column), y))
        if grads[0]:
            if d_cosine is None:  # alpha = None: the slope is s except in the target column
                dc_y = torch.where(no_target, torch.full_like(dc_y, scale), dc_y)
            else:
                d_cosine.scatter_(1, column, torch.where(no_target, d_cosine.gather(1, column), dc_y))
        if grads[1]:
            d_alpha.scatter_(1, column, torch.where(no_target, d_alpha.gather(1, column), da_y))
        ctx.scale, ctx.straight_through = scale, straight_through
        ctx.alpha_shape = None if alpha is None else alpha.shape
        # the [B, C] derivative is kept off saved_tensors: the backward multiplies the incoming
        # gradient into it in place (no second [B, C] buffer), so it serves one backward only
        ctx.d_cosine, ctx.has_d_cosine = d_cosine, d_cosine is not None
        ctx.save_for_backward(column, dc_y if grads[0] and d_cosine is None else None, d_alpha)
        return logits

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        column, dc_y, d_alpha = ctx.saved_tensors
        grad_cosine = grad_alpha = None
        if ctx.needs_input_grad[0]:
            if ctx.straight_through:
                grad_cosine = grad * ctx.scale
            elif ctx.has_d_cosine:
                if ctx.d_cosine is None:
                    raise RuntimeError("leap_logits with alpha: a second backward through the same logits "
                                       "(retain_graph=True) is not supported; its derivative was used up by "
                                       "the first (the gradient is computed in place)")
                grad_cosine, ctx.d_cosine = ctx.d_cosine.mul_(grad), None
            else:
                grad_cosine = (grad * ctx.scale).scatter_(1, column, grad.gather(1, column) * dc_y)
        if d_alpha is not None:
            grad_alpha = (grad * d_alpha).sum_to_size(ctx.alpha_shape)
        return grad_cosine, grad_alpha, None, None, None, None, None, None


def leap_logits(cosine: torch.Tensor, labels: torch.Tensor, alpha=None, margin: str = "cos",
                scale: float = 1.0, margin_value: float = 0.0, inplace: bool = False,
                straight_through: bool = False) -> torch.Tensor:
    """Scaled margin logits with the feature cloud, Eq. 7 ("cos") or Eq. 8 ("arc").

    Args:
        cosine: [B, C] cos(theta) between normalised features and class weights.
        labels: [B] target column of each row, or -1 for a row with no target column here.
        alpha: None, or the cloud angles: [B], [B, 1] (one per sample) or [B, C] (one per logit),
            or a [B, C] block source: an object with ``shape``, ``alpha[rows, cols]`` (slices: a
            fresh float32 block) and ``alpha.gather(1, index)``, drawn block by block and never
            held whole (no gradient flows to it; e.g. the InsightFace loss's keyed alpha).
        margin: "cos" (CosFace, additive cosine margin m_c) or "arc" (ArcFace, angular margin m_a).
        scale: s.
        margin_value: m_c or m_a.
        inplace: write the logits into ``cosine`` (float32, not a leaf that requires grad) and
            return it, as arcface_torch's CombinedMarginLoss overwrites its input: one [B, C]
            buffer less.
        straight_through: the values of Eq. 7 / 8, but the gradient w.r.t. ``cosine`` taken as s
            everywhere, as arcface_torch's CombinedMarginLoss computes its ArcFace margin under
            ``no_grad``; no [B, C] derivative is kept for the backward.

    Returns:
        [B, C] float32 logits s * (...), differentiable w.r.t. ``cosine``.
    """
    check_margin(margin, scale, margin_value)
    if cosine.dim() != 2:
        raise ValueError(f"cosine must have shape [B, C], got {tuple(cosine.shape)}")
    if labels.dim() != 1 or labels.shape[0] != cosine.shape[0]:
        raise ValueError(f"labels must have shape [B] = [{cosine.shape[0]}], got {tuple(labels.shape)}")
    check_labels(labels, cosine.shape[1])
    if inplace and cosine.dtype != torch.float32:
        raise ValueError(f"inplace=True writes float32 logits into cosine: it must be float32, got {cosine.dtype}")
    cosine = cosine.float()
    if cosine.numel():  # min and max carry NaN and |cos| > 1: one pass, no host sync on CUDA
        low_high = torch.stack(cosine.detach().aminmax())
        require(torch.isfinite(low_high).all() & (low_high.abs() <= 1 + _COS_SLACK).all(),
                lambda: f"cosine must hold cos(theta) in [-1, 1]{values_in(cosine)}: pass the "
                        f"cosines of normalised features and weights, not scaled logits (NaN or inf: "
                        f"check the features and weights upstream)")
    if torch.is_tensor(alpha):
        alpha = alpha.float()
        if alpha.dim() == 1:
            alpha = alpha[:, None]
    if alpha is not None:
        if len(alpha.shape) != 2 or alpha.shape[0] != cosine.shape[0] or alpha.shape[1] not in (1, cosine.shape[1]):
            raise ValueError(f"alpha must have shape [B], [B, 1] or [B, C] = {list(cosine.shape)}, "
                             f"got {tuple(alpha.shape)}")

    return _LEAPLogits.apply(cosine, alpha, labels, margin, float(scale), float(margin_value), bool(inplace),
                             bool(straight_through))
