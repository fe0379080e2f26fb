"""leap_logits against FastReID's own CosSoftmax/ArcSoftmax and an independent float64 formula."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from fastreid.layers.any_softmax import ArcSoftmax, CosSoftmax
from leap_plugin.core import leap_logits
from leap_plugin.core.margins import leap_logits_reference, shifted_cos, shifted_cos_reference


def _inputs(seed, B=7, C=11, lo=-0.95, hi=0.95):
    gen = torch.Generator().manual_seed(seed)
    cosine = torch.rand(B, C, generator=gen) * (hi - lo) + lo
    labels = torch.randint(0, C, (B,), generator=gen)
    labels[2] = -1
    return cosine, labels, gen


def reference(cosine, labels, alpha, margin, s, m):
    """Eq. 7 / Eq. 8 in float64 with explicit angles and clipping to [0, pi]."""
    theta = torch.acos(cosine.double())
    alpha = torch.zeros(1, 1, dtype=torch.float64) if alpha is None else alpha.double().reshape(len(labels), -1)
    shift = alpha.expand_as(theta).clone()
    rows = torch.arange(len(labels))[labels >= 0]
    if margin == "arc":
        shift[rows, labels[rows]] += m
    out = torch.cos((theta + shift).clamp(0, math.pi))
    if margin == "cos":
        out[rows, labels[rows]] -= m
    return s * out


@pytest.mark.parametrize("host,margin,s,m", [(CosSoftmax, "cos", 24.0, 0.2), (ArcSoftmax, "arc", 16.0, 0.2),
                                             (CosSoftmax, "cos", 64.0, 0.35), (ArcSoftmax, "arc", 64.0, 0.5)])
def test_alpha_zero_equals_fastreid_softmax(host, margin, s, m):
    cosine, labels, _ = _inputs(0, lo=-0.8)  # theta + m stays below pi, where ArcSoftmax is unclipped
    want = host(cosine.shape[1], s, m)(cosine.clone(), labels)
    for alpha in (None, torch.zeros(len(labels)), torch.zeros(cosine.shape)):
        got = leap_logits(cosine, labels, alpha, margin, scale=s, margin_value=m)
        torch.testing.assert_close(got, want, atol=2e-5 * s, rtol=0)


def test_alpha_zero_cosface_is_bit_exact():
    cosine, labels, _ = _inputs(1, lo=-1.0, hi=1.0)
    cosine[0, 0], cosine[1, 1] = 1.0, -1.0
    got = leap_logits(cosine, labels, torch.zeros(cosine.shape), "cos", scale=1.0, margin_value=0.0)
    assert torch.equal(got, cosine)


@pytest.mark.parametrize("margin", ["cos", "arc"])
@pytest.mark.parametrize("per_logit", [True, False])
def test_with_alpha_matches_float64_formula(margin, per_logit):
    cosine, labels, gen = _inputs(2, lo=-1.0, hi=1.0)
    shape = cosine.shape if per_logit else (len(labels),)
    alpha = torch.randn(shape, generator=gen) * 0.8  # large enough to hit both clips
    got = leap_logits(cosine, labels, alpha, margin, scale=10.0, margin_value=0.3)
    want = reference(cosine, labels, alpha, margin, 10.0, 0.3)
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("margin", ["cos", "arc"])
def test_clipping_at_zero_and_pi(margin):
    cosine = torch.tensor([[math.cos(0.1), math.cos(3.0)]])
    labels = torch.tensor([-1])  # no margin: only alpha moves the angles
    below = leap_logits(cosine, labels, torch.tensor([-0.5]), margin)  # 0.1 - 0.5 < 0 -> angle 0
    above = leap_logits(cosine, labels, torch.tensor([0.5]), margin)  # 3.0 + 0.5 > pi -> angle pi
    assert below[0, 0].item() == 1.0
    assert above[0, 1].item() == -1.0
    assert below[0, 1].item() == pytest.approx(math.cos(2.5), abs=1e-6)
    # ArcFace: theta + alpha + m is clipped too
    arc = leap_logits(torch.tensor([[math.cos(2.9)]]), torch.tensor([0]), torch.tensor([0.1]), "arc",
                      margin_value=0.5)
    assert arc.item() == -1.0


def test_minus_one_rows_get_alpha_but_no_margin():
    cosine, labels, gen = _inputs(3)
    alpha = torch.randn(len(labels), generator=gen) * 0.2
    got = leap_logits(cosine, labels, alpha, "cos", scale=1.0, margin_value=0.4)
    no_margin = leap_logits(cosine, labels, alpha, "cos", scale=1.0, margin_value=0.0)
    assert torch.equal(got[2], no_margin[2])
    torch.testing.assert_close(got[2].double(), torch.cos(torch.acos(cosine[2].double()) + alpha[2]),
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("margin", ["cos", "arc"])
def test_finite_gradients_at_plus_minus_one(margin):
    cosine = torch.tensor([[1.0, -1.0, 0.3], [-1.0, 1.0, 0.0]], requires_grad=True)
    labels = torch.tensor([0, 1])
    for alpha in (None, torch.tensor([0.2, -0.3])):
        cosine.grad = None
        leap_logits(cosine, labels, alpha, margin, scale=16.0, margin_value=0.2).sum().backward()
        assert torch.isfinite(cosine.grad).all()
    # the host's ArcSoftmax does not have this property (acos' derivative is infinite at +-1)
    if margin == "arc":
        host_in = cosine.detach().clone().requires_grad_()
        ArcSoftmax(3, 16.0, 0.2)(host_in.clone(), labels).sum().backward()
        assert not torch.isfinite(host_in.grad).all()


@settings(max_examples=200, deadline=None)
@given(dim=st.integers(2, 16), seed=st.integers(0, 2**31 - 1), alpha=st.floats(0.0, math.pi))
def test_proposition_bounds(dim, seed, alpha):
    """Paper, Proposition: f' at angle alpha from f => |theta - alpha| <= theta' <= theta + alpha."""
    gen = torch.Generator().manual_seed(seed)
    f = torch.nn.functional.normalize(torch.randn(dim, generator=gen, dtype=torch.float64), dim=0)
    w = torch.nn.functional.normalize(torch.randn(dim, generator=gen, dtype=torch.float64), dim=0)
    u = torch.randn(dim, generator=gen, dtype=torch.float64)
    u = torch.nn.functional.normalize(u - (u @ f) * f, dim=0)  # unit, orthogonal to f
    f_prime = math.cos(alpha) * f + math.sin(alpha) * u  # angle(f, f') = alpha
    theta = torch.acos((f @ w).clamp(-1, 1)).item()
    theta_p = torch.acos((f_prime @ w).clamp(-1, 1)).item()
    assert abs(theta - alpha) - 1e-9 <= theta_p <= theta + alpha + 1e-9


@pytest.mark.parametrize("kwargs,match", [
    (dict(margin="sphere"), "margin must be one of"),
    (dict(labels=torch.tensor([0, 11, 0, 0, 0, 0, 0])), r"labels must lie in \[0, 11\)"),
    (dict(labels=torch.tensor([0, 1])), r"labels must have shape \[B\]"),
    (dict(alpha=torch.zeros(7, 3)), "alpha must have shape"),
    (dict(cosine=torch.zeros(7)), r"cosine must have shape \[B, C\]"),
])
def test_errors(kwargs, match):
    cosine, labels, _ = _inputs(4)
    args = dict(cosine=cosine, labels=labels, alpha=None, margin="cos")
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        leap_logits(**args)


@pytest.mark.parametrize("margin", ["cos", "arc"])
@pytest.mark.parametrize("inplace", [False, True])
def test_straight_through_keeps_values_and_passes_s(margin, inplace):
    """straight_through: Eq. 7 / 8 values, d logits / d cosine = s (arcface_torch's no_grad margin)."""
    cosine, labels, gen = _inputs(5)
    alpha = torch.randn(cosine.shape, generator=gen) * 0.5
    weights = torch.randn(cosine.shape, generator=gen)
    x = cosine.clone().requires_grad_()
    got = leap_logits(x * 1.0, labels, alpha, margin, scale=12.0, margin_value=0.3, inplace=inplace,
                      straight_through=True)
    (got * weights).sum().backward()
    torch.testing.assert_close(got.detach().double(), reference(cosine, labels, alpha, margin, 12.0, 0.3),
                               atol=1e-4, rtol=0)
    torch.testing.assert_close(x.grad, 12.0 * weights)


@pytest.mark.parametrize("seed", [0, 1])
def test_fused_shifted_cos_equals_its_plain_reference(seed):
    """The in-place kernel (values and hand-written derivatives) against the plain formula and its
    autograd derivatives, over shifts that clip at 0 and at pi and cosines up to the ends."""
    gen = torch.Generator().manual_seed(seed)
    cosine = (torch.rand(64, 33, generator=gen, dtype=torch.float64) * 2 - 1).clamp(-0.999, 0.999)
    shift = torch.randn(64, 33, generator=gen, dtype=torch.float64) * 1.5
    assert ((torch.arccos(cosine) + shift > math.pi) | (torch.arccos(cosine) + shift < 0)).float().mean() > 0.1
    c, a = cosine.clone().requires_grad_(True), shift.clone().requires_grad_(True)
    want = shifted_cos_reference(c, a)
    d_cos, d_shift = torch.autograd.grad(want.sum(), (c, a))
    got, got_d_cos, got_d_shift = shifted_cos(cosine.float(), shift.float(), 3.0, True, True)
    torch.testing.assert_close(got.double(), 3.0 * want.detach(), atol=2e-6, rtol=0)
    torch.testing.assert_close(got_d_cos.double(), 3.0 * d_cos, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(got_d_shift.double(), 3.0 * d_shift, atol=2e-6, rtol=0)


@pytest.mark.parametrize("margin,m", [("cos", 0.35), ("arc", 0.5)])
@pytest.mark.parametrize("per_logit", [True, False])
def test_leap_logits_equal_the_plain_reference_with_gradients(margin, m, per_logit):
    cosine, labels, gen = _inputs(3)
    alpha = torch.randn(7, 11 if per_logit else 1, generator=gen) * 0.8
    c = cosine.clone().requires_grad_(True)
    a = alpha.clone().requires_grad_(True)
    got = leap_logits(c, labels, a, margin, 16.0, m)
    c_ref, a_ref = cosine.double().requires_grad_(True), alpha.double().requires_grad_(True)
    want = leap_logits_reference(c_ref, labels, a_ref, margin, 16.0, m)
    weights = torch.randn(want.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    (got.double() * weights).sum().backward()
    (want * weights).sum().backward()
    torch.testing.assert_close(got.double(), want.detach(), atol=5e-5, rtol=0)
    torch.testing.assert_close(c.grad.double(), c_ref.grad, atol=2e-3, rtol=1e-4)
    torch.testing.assert_close(a.grad.double(), a_ref.grad, atol=2e-3, rtol=1e-4)
