"""LEAPMarginLoss, single process: CosFace / ArcFace equality with the cloud off (an independent
float64 formula and arcface_torch's own CombinedMarginLoss), the cloud when on, step/epoch state."""
import copy
import importlib.util
import math

import numpy as np
import pytest
import torch

from leap_plugin.core.noise import keyed_normal
from leap_plugin.insightface import LEAPMarginLoss

S = 64.0
ARC_M, COS_M = 0.5, 0.35
@pytest.fixture(scope="module")
def host_losses(arcface_torch):
    spec = importlib.util.spec_from_file_location("arcface_torch_losses", arcface_torch / "losses.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _inputs(seed=0, rows=12, cols=9):
    """PartialFC-shaped inputs: clamped cosines [B, C_cols], labels [B, 1] with -1 rows."""
    g = torch.Generator().manual_seed(seed)
    cosine = (torch.rand(rows, cols, generator=g) * 1.6 - 0.8).clamp(-1, 1)
    labels = torch.randint(0, cols, (rows, 1), generator=g)
    labels[::3] = -1  # classes held by another rank
    return cosine, labels


def _reference(cosine, labels, margin, m, alpha=None):
    """Eq. 7 / Eq. 8 in float64, written independently of leap_plugin."""
    c = cosine.double().numpy()
    y = labels.reshape(-1).numpy()
    a = np.zeros_like(c) if alpha is None else np.broadcast_to(alpha.double().numpy(), c.shape)
    theta = np.arccos(c)
    target = np.zeros_like(c, dtype=bool)
    rows = np.nonzero(y >= 0)[0]
    target[rows, y[rows]] = True
    if margin == "cos":
        out = np.cos(np.clip(theta + a, 0, math.pi)) - m * target
    else:
        out = np.cos(np.clip(theta + a + m * target, 0, math.pi))
    return S * out


def _loss(margin="cos", classes=9, **kw):
    m = COS_M if margin == "cos" else ARC_M
    counts = torch.tensor([40, 30, 20, 5, 5, 4, 3, 5, 2, 6, 7, 8][:classes])
    kw.setdefault("update_every", 1)
    kw.setdefault("angle_reference", "updated_center")  # every observed sample stores an angle
    return LEAPMarginLoss(counts, 4, margin=margin, scale=S, margin_value=m, **kw)


@pytest.mark.parametrize("margin", ["cos", "arc"])
def test_cloud_off_equals_formula(margin):
    cosine, labels = _inputs()
    m = COS_M if margin == "cos" else ARC_M
    expected = _reference(cosine, labels, margin, m)
    loss = _loss(margin).eval()  # eval: no cloud
    np.testing.assert_allclose(loss(cosine.clone(), labels).numpy(), expected, rtol=1e-5, atol=1e-4)
    # training before start_epoch: the same values, statistics tracked
    loss = _loss(margin, start_epoch=3).train()
    loss.observe(torch.randn(12, 4), torch.randint(0, 9, (12,)))
    np.testing.assert_allclose(loss(cosine.clone(), labels).numpy(), expected, rtol=1e-5, atol=1e-4)
    assert int(loss.stats.num_written.sum()) == 12


def _grad(fn, cosine, labels):
    x = cosine.clone().requires_grad_()
    out = fn(x, labels)
    weights = torch.linspace(-1, 1, out.numel()).reshape(out.shape)
    (out * weights).sum().backward()
    return out.detach(), x.grad


def test_cosface_equals_combined_margin_loss(host_losses):
    cosine, labels = _inputs(1)
    host = host_losses.CombinedMarginLoss(S, 1.0, 0.0, COS_M)
    ours = _loss("cos").eval()
    out_h, grad_h = _grad(lambda x, y: host(x * 1.0, y), cosine, labels)  # host edits its input in place
    out_o, grad_o = _grad(ours, cosine, labels)
    torch.testing.assert_close(out_o, out_h, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(grad_o, grad_h)


def test_arcface_equals_combined_margin_loss(host_losses):
    cosine, labels = _inputs(2)
    # CombinedMarginLoss does not clip theta + m at pi (cos wraps around); Eq. 8 does. Keep the
    # target angles below pi - m here and check the clipped case separately.
    cosine = cosine.clamp(min=math.cos(math.pi - ARC_M) + 0.05)
    host = host_losses.CombinedMarginLoss(S, 1.0, ARC_M, 0.0)
    out_h, grad_h = _grad(lambda x, y: host(x * 1.0, y), cosine, labels)
    out_o, grad_o = _grad(_loss("arc", straight_through=True).eval(), cosine, labels)
    torch.testing.assert_close(out_o, out_h, rtol=1e-5, atol=1e-4)
    # the host computes the margin under no_grad: d logits / d cosine = s; straight_through=True too
    torch.testing.assert_close(grad_o, grad_h)
    # the exact gradient of Eq. 8 (default) differs on the target logits only
    _, grad_exact = _grad(_loss("arc").eval(), cosine, labels)
    flat = labels.reshape(-1)
    target = torch.zeros_like(cosine, dtype=torch.bool)
    target[flat >= 0, flat[flat >= 0]] = True
    torch.testing.assert_close(grad_exact[~target], grad_h[~target])
    assert not torch.allclose(grad_exact[target], grad_h[target])


def test_arcface_clips_at_pi():
    cosine = torch.tensor([[-0.99, 0.3]])
    out = _loss("arc", classes=2).eval()(cosine, torch.tensor([[0]]))
    assert out[0, 0].item() == pytest.approx(-S)  # theta + m > pi -> cos(pi)


def test_interclass_filtering_equals_host(host_losses):
    cosine, labels = _inputs(3)
    host = host_losses.CombinedMarginLoss(S, 1.0, 0.0, COS_M, interclass_filtering_threshold=0.4)
    ours = _loss("cos", interclass_filtering_threshold=0.4).eval()
    out_h, grad_h = _grad(lambda x, y: host(x * 1.0, y), cosine, labels)
    out_o, grad_o = _grad(ours, cosine, labels)
    torch.testing.assert_close(out_o, out_h, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(grad_o, grad_h)


@pytest.mark.parametrize("per_logit,target_only,signed", [(True, False, True), (False, False, True),
                                                          (True, True, True), (True, False, False)])
def test_cloud_on_matches_formula_with_drawn_alpha(per_logit, target_only, signed):
    torch.manual_seed(0)
    loss = _loss("arc", version="full", alpha_per_logit=per_logit, target_only=target_only,
                 signed_alpha=signed, seed=7).train()
    # two steps so that classes have >= 2 angles, then the forward with the cloud
    labels_seq = [torch.tensor([0, 0, 1, 1, 3, 3, 4, 4, 2, 2, 5, 5]) for _ in range(3)]
    for step, lab in enumerate(labels_seq):
        loss.observe(torch.randn(12, 4), lab)
        cosine, _ = _inputs(10 + step)
        labels = lab.clone()
        labels[::4] = -1  # as if on another rank: the row still gets alpha, no margin
        out = loss(cosine.clone(), labels[:, None])
    std = loss.leap.cloud.std(loss.stats, labels_seq[-1])  # one process: the block is every class
    assert (std > 0).any() and (std == 0).any()
    cols = torch.arange(9) if per_logit else None
    alpha = loss.leap.alpha(std, 9, labels, step=2, columns=cols)
    assert alpha.shape == ((12, 9) if per_logit or target_only else (12, 1))
    assert torch.all(alpha[std == 0] == 0)
    if target_only:  # only the target column, and nothing for a row whose target is elsewhere
        off_target = torch.ones_like(alpha, dtype=torch.bool)
        off_target[(labels >= 0).nonzero()[:, 0], labels[labels >= 0]] = False
        assert torch.all(alpha[off_target] == 0) and (alpha != 0).any()
    assert (alpha < 0).any() == signed
    expected = _reference(cosine, labels[:, None], "arc", ARC_M, alpha)
    np.testing.assert_allclose(out.detach().numpy(), expected, rtol=1e-4, atol=2e-3)


def test_update_every_and_start_epoch():
    loss = _loss("cos", update_every=3, start_epoch=1).train()
    written = []
    for step in range(7):
        loss.observe(torch.randn(6, 4), torch.tensor([0, 0, 1, 1, 3, 4]))
        loss(torch.zeros(6, 9), torch.tensor([0, 0, 1, 1, 3, 4]))
        written.append(int(loss.stats.num_written.sum()))
    assert written == [6, 6, 6, 12, 12, 12, 18]  # updates at steps 0, 3, 6
    assert not loss.leap.cloud_active
    loss.set_epoch(1)
    assert loss.leap.cloud_active
    with pytest.raises(ValueError, match="epoch"):
        loss.set_epoch(-1)


def test_autocast_and_half_inputs():
    loss = _loss("cos", start_epoch=0, seed=3).train()
    lab = torch.tensor([0, 0, 3, 3, 4, 4])
    for _ in range(2):
        loss.observe(torch.randn(6, 4).half(), lab)
        loss(torch.zeros(6, 9), lab)
    cosine = torch.rand(6, 9) * 2 - 1
    emb = torch.randn(6, 4)
    state = copy.deepcopy(loss.state_dict())  # state_dict() shares the buffers' storage
    loss.observe(emb, lab)
    full = loss(cosine.clone(), lab[:, None])  # the loss overwrites its input (inplace), as the host
    loss.load_state_dict(state)
    loss.observe(emb.half(), lab)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = loss(cosine.half(), lab[:, None])
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, full, rtol=1e-3, atol=0.05)  # only the half rounding of the input


def test_state_dict_resume_continues_identically():
    def run(loss, steps, start=0):
        outs = []
        for step in range(start, steps):
            g = torch.Generator().manual_seed(step)
            emb, lab = torch.randn(8, 4, generator=g), torch.randint(0, 9, (8,), generator=g)
            loss.observe(emb, lab)
            outs.append(loss(torch.rand(8, 9, generator=g) * 2 - 1, lab[:, None]))
        return outs

    straight = _loss("cos", update_every=2, seed=5).train()
    full = run(straight, 6)
    first = _loss("cos", update_every=2, seed=5).train()
    run(first, 3)
    first.set_epoch(0)
    state = first.state_dict()
    assert state["_extra_state"] == {"step": 3, "epoch": 0, "num_classes": 9}
    other = dict(state, _extra_state={"step": 3, "epoch": 0, "num_classes": 90})
    with pytest.raises(ValueError, match="over 90 classes loaded into one over 9"):
        _loss("cos").load_state_dict(other)
    resumed = _loss("cos", update_every=2, seed=5).train()
    resumed.load_state_dict(state)
    for a, b in zip(run(resumed, 6, start=3), full[3:]):
        torch.testing.assert_close(a, b)
    assert resumed.leap.step == straight.leap.step == 6


def test_keyed_normal_is_standard_normal_and_shardable():
    from scipy import stats

    z = keyed_normal(123, torch.arange(300), torch.arange(700))
    assert stats.kstest(z.flatten().numpy(), "norm").pvalue > 1e-3
    assert abs(float(z.mean())) < 0.01 and abs(float(z.std()) - 1) < 0.01
    # a block / a sampled subset of columns gets exactly the full table's values
    cols = torch.tensor([699, 3, 350, 351])
    torch.testing.assert_close(keyed_normal(123, torch.arange(5, 9), cols), z[5:9][:, cols], rtol=0, atol=0)
    assert not torch.equal(keyed_normal(124, torch.arange(300), torch.arange(700)), z)
    # rows of one step are not correlated with each other
    corr = np.corrcoef(z[:50].numpy())
    assert np.abs(corr[np.triu_indices(50, 1)]).max() < 0.2


def _keyed_normal_reference(key, rows, cols):
    """The keyed draw written independently: numpy uint32 arithmetic, scipy's float64 erfinv."""
    from scipy.special import erfinv

    def mix32(x):  # the 2-round multiply-xorshift of the row / column / key hashes, in uint64
        x = np.uint64(x) if np.isscalar(x) else np.asarray(x, dtype=np.uint64)
        for _ in range(2):
            x = ((x >> np.uint64(16)) ^ x) * np.uint64(0x45D9F3B) & np.uint64(0xFFFFFFFF)
        return (x >> np.uint64(16)) ^ x

    k_row = mix32(mix32(key & 0xFFFFFFFF) ^ np.uint64(0x68E31DA4))
    k_col = mix32(mix32(key >> 32) ^ np.uint64(0x1B56C4E9))
    rows, cols = (np.asarray(x, dtype=np.uint64) & np.uint64(0xFFFFFFFF) for x in (rows, cols))
    h = (mix32(rows ^ k_row)[:, None] ^ mix32(cols ^ k_col)[None, :]).astype(np.uint32)
    with np.errstate(over="ignore"):
        for shift, mult in ((16, 0x7FEB352D), (15, 0x846CA68B)):  # lowbias32
            h = (h ^ (h >> np.uint32(shift))) * np.uint32(mult)
        h = h ^ (h >> np.uint32(16))
    odd = (h.view(np.int32).astype(np.int64) >> 7) | 1  # top 24 bits as an odd integer
    return math.sqrt(2.0) * erfinv(odd * 2.0 ** -24)


def test_keyed_normal_equals_independent_reference():
    rows, cols = np.arange(40) * 7 + 3, np.array([0, 1, 2, 99_999, 2 ** 31 + 5, 123_456_789])
    for key in (0, 123, 2 ** 40 + 17):
        got = keyed_normal(key, torch.from_numpy(rows), torch.from_numpy(cols)).double().numpy()
        np.testing.assert_allclose(got, _keyed_normal_reference(key, rows, cols), rtol=2e-6, atol=2e-6)


def test_keyed_normal_distribution_and_independence():
    from scipy import stats

    z = keyed_normal(2 ** 33 + 9, torch.arange(1000), torch.arange(1000)).double()
    n = z.numel()  # 10^6 draws: standard errors 0.001 (mean), 0.0007 (std), 0.001 (correlations)
    assert abs(float(z.mean())) < 0.005 and abs(float(z.std()) - 1) < 0.0035
    assert stats.kstest(z.flatten().numpy(), "norm").pvalue > 1e-3
    assert abs(float((z.abs() > 3).double().mean()) - 2 * stats.norm.sf(3)) < 5 * math.sqrt(0.0027 / n)
    assert float(z.abs().max()) > 4.5  # tails as far as 10^6 normal draws go
    other = keyed_normal(2 ** 33 + 10, torch.arange(1000), torch.arange(1000)).double()
    for a, b in ((z[:, 1:], z[:, :-1]), (z[1:], z[:-1]), (z, other), (z[1:, 1:], z[:-1, :-1]), (z, z.t())):
        corr = float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])
        assert abs(corr) < 0.005, corr


def test_lazy_blocked_alpha_equals_whole_alpha(monkeypatch):
    """The alpha that forward draws block by block is the alpha() table, and the logits and their
    gradient do not depend on the block size or on writing the logits in place."""
    import leap_plugin.core.blocks as tiles

    loss = _loss("arc", seed=11).train()
    lab = torch.tensor([0, 0, 3, 3, 4, 4, 1, 1])
    for _ in range(2):
        loss.observe(torch.randn(8, 4), lab)
        loss(torch.zeros(8, 9), lab)
    state = copy.deepcopy(loss.state_dict())
    cosine, _ = _inputs(5, rows=8)
    labels = lab.clone()
    labels[::3] = -1
    results = []
    for elements, inplace in ((1 << 30, False), (4, False), (4, True), (3, True)):
        monkeypatch.setattr(tiles, "BLOCK_ELEMENTS", elements)
        loss.load_state_dict(state)
        loss.leap.step, loss.inplace = 2, inplace
        loss.observe(torch.ones(8, 4), lab)
        std = loss.observed.std if loss.observed.cloud else None
        x = cosine.clone().requires_grad_()
        given = x * 1.0
        out = loss(given, labels[:, None])
        assert (out.data_ptr() == given.data_ptr()) == inplace
        out.backward(torch.linspace(-1, 1, out.numel()).reshape(out.shape))
        alpha = loss.leap.alpha(std, 9, step=2, columns=torch.arange(9))
        lazy = loss.leap.alpha(std, 9, step=2, columns=torch.arange(9), lazy=True)
        blocks = torch.cat([torch.cat([lazy[r, c] for c in (slice(0, 4), slice(4, 9))], 1)
                            for r in (slice(0, 5), slice(5, 8))])
        assert torch.equal(blocks, alpha) and torch.equal(lazy.gather(1, labels.clamp(min=0)[:, None]),
                                                          alpha.gather(1, labels.clamp(min=0)[:, None]))
        results.append((out.detach(), x.grad, alpha))
    assert (results[0][2] != 0).any()
    expected = _reference(cosine, labels[:, None], "arc", ARC_M, results[0][2])
    np.testing.assert_allclose(results[0][0].numpy(), expected, rtol=1e-4, atol=2e-3)
    for out, grad, alpha in results[1:]:
        assert torch.equal(out, results[0][0]) and torch.equal(grad, results[0][1])
        assert torch.equal(alpha, results[0][2])


def test_inplace_overwrites_only_what_it_may():
    cosine, labels = _inputs(6)
    ours = _loss("cos").eval()
    given = cosine.clone()
    out = ours(given, labels)
    assert out.data_ptr() == given.data_ptr()  # as CombinedMarginLoss: the input holds the logits
    leaf = cosine.clone().requires_grad_()
    out = ours(leaf, labels)
    assert out.data_ptr() != leaf.data_ptr() and torch.equal(leaf.detach(), cosine)
    kept = cosine.clone()
    out = _loss("cos", inplace=False).eval()(kept, labels)
    assert torch.equal(kept, cosine) and torch.equal(out, ours(cosine.clone(), labels))


def test_errors_say_what_is_wrong():
    with pytest.raises(ValueError, match="CosFace \\(1.0, 0.0, m\\) and ArcFace"):
        LEAPMarginLoss.from_margin_list((1.0, 0.3, 0.2), S, torch.tensor([3, 3]), 4)
    arc = LEAPMarginLoss.from_margin_list((1.0, 0.5, 0.0), S, torch.tensor([3, 3]), 4)
    cos = LEAPMarginLoss.from_margin_list((1.0, 0.0, 0.35), S, torch.tensor([3, 3]), 4)
    assert (arc.margin, arc.margin_value, cos.margin, cos.margin_value) == ("arc", 0.5, "cos", 0.35)
    loss = _loss("cos").train()
    with pytest.raises(RuntimeError, match="attach"):
        loss(torch.zeros(2, 9), torch.tensor([0, 1]))
    loss.observe(torch.randn(2, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="rows"):
        loss(torch.zeros(3, 9), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="embedding"):
        loss.observe(torch.randn(2, 5), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="columns"):
        loss.observe(torch.randn(2, 4), torch.tensor([0, 1]))
        loss(torch.zeros(2, 5), torch.tensor([0, 1]))  # 5 columns of 9 classes, no sampled ids
    with pytest.raises(ValueError, match="class_counts"):
        LEAPMarginLoss(torch.tensor([[3, 3]]), 4)
    with pytest.raises(ValueError, match="update_every"):
        _loss("cos", update_every=0)
    with pytest.raises(ValueError, match="head_threshold"):
        _loss("cos", version="vanilla")
    with pytest.raises(ValueError, match="angle_reference='centroid' is invalid: expected one of \\('center', "
                                         "'updated_center', 'previous_center', 'weight'\\)"):
        _loss("cos", angle_reference="centroid")
    with pytest.raises(ValueError, match="center_rate_weights='old' is invalid: expected one of"):
        _loss("cos", center_rate_weights="old")
    with pytest.raises(ValueError, match="center_dtype='float64' is invalid: expected one of"):
        _loss("cos", center_dtype="float64")
