"""FeatureCloud: reference variance (Eq. 6, Eq. 9), who gets a cloud, and alpha's spread."""
import math

import pytest
import torch

from leap_plugin.core import AngularStats, FeatureCloud

NAN = math.nan


def test_vanilla_reference_is_mean_head_variance_eq6():
    var = torch.tensor([0.40, 0.20, 0.10, NAN, 0.05])
    counts = torch.tensor([30, 25, 4, 40, 3])
    cloud = FeatureCloud("vanilla", head_threshold=10)
    # head classes: 0, 1, 3 (K > 10); class 3 has no variance yet and is left out, not zero
    assert cloud.reference_var_from(var, counts).item() == pytest.approx((0.40 + 0.20) / 2)


def test_full_reference_is_count_weighted_eq9():
    var = torch.tensor([0.40, 0.20, 0.10, NAN, 0.05])
    counts = torch.tensor([30, 25, 4, 40, 3])
    want = (29 * 0.40 + 24 * 0.20 + 3 * 0.10 + 2 * 0.05) / (29 + 24 + 3 + 2)
    assert FeatureCloud("full").reference_var_from(var, counts).item() == pytest.approx(want)


def test_reference_is_nan_while_nothing_is_known():
    var = torch.full((3,), NAN)
    assert math.isnan(FeatureCloud("full").reference_var_from(var, torch.tensor([3, 4, 5])).item())
    std = FeatureCloud("full").std_from(var, torch.tensor([3, 4, 5]), torch.tensor([0, 1, 2]))
    assert torch.equal(std, torch.zeros(3))


def test_std_per_version():
    var = torch.tensor([0.40, 0.20, 0.10, NAN, 0.05])
    counts = torch.tensor([30, 25, 4, 40, 3])
    labels = torch.tensor([0, 1, 2, 3, 4, -1])
    van = FeatureCloud("vanilla", head_threshold=10).std_from(var, counts, labels)
    ref = 0.30
    want = torch.tensor([0, 0, math.sqrt(ref - 0.10), 0, math.sqrt(ref - 0.05), 0])
    torch.testing.assert_close(van, want.float())
    full = FeatureCloud("full")
    ref_f = full.reference_var_from(var, counts).item()
    got = full.std_from(var, counts, labels)
    want = [0.0 if v != v or v >= ref_f else math.sqrt(ref_f - v) for v in [0.40, 0.20, 0.10, NAN, 0.05]]
    torch.testing.assert_close(got, torch.tensor(want + [0.0]))
    assert got[0] == 0 and got[1] > 0  # full version: any class below sigma^2 gets a cloud


def test_std_from_tracked_stats():
    stats = AngularStats(torch.tensor([6, 2]), 3)
    gen = torch.Generator().manual_seed(0)
    stats.update(torch.randn(8, 3, generator=gen), torch.tensor([0, 0, 0, 0, 0, 0, 1, 1]))
    cloud = FeatureCloud("vanilla", head_threshold=5)
    ref = stats.var[0]
    expect = (ref - stats.var[1]).clamp(min=0).sqrt()
    torch.testing.assert_close(cloud.std(stats, torch.tensor([1, 0])), torch.stack([expect, torch.tensor(0.)]))


@pytest.mark.parametrize("per_logit", [True, False])
def test_sampled_alpha_has_requested_std(per_logit):
    # 200,000 draws of N(0, s^2): the sample std has standard error s / sqrt(2 n) = 0.16% of s,
    # so 1% is a > 6-sigma band; the mean's standard error is s / sqrt(n) = 0.0022 s.
    std = torch.tensor([0.0, 0.3, 0.05])
    cloud = FeatureCloud("full", alpha_per_logit=per_logit)
    n = 200_000
    alpha = cloud.sample_from_std(std.repeat_interleave(n // (100 if per_logit else 1)),
                                  100 if per_logit else 1, torch.Generator().manual_seed(0))
    per_class = alpha.reshape(3, -1)
    assert torch.equal(per_class[0], torch.zeros_like(per_class[0]))
    for row, s in ((1, 0.3), (2, 0.05)):
        assert per_class[row].std().item() == pytest.approx(s, rel=0.01)
        assert abs(per_class[row].mean().item()) < 6 * 0.0023 * s
    assert alpha.shape[1] == (100 if per_logit else 1)


def test_sample_shape_and_generator_reproducible():
    stats = AngularStats(torch.tensor([6, 2, 2]), 3)
    stats.update(torch.randn(10, 3), torch.tensor([0, 0, 0, 0, 0, 0, 1, 1, 2, 2]))
    labels = torch.tensor([1, 2, 0])
    a = FeatureCloud().sample(stats, labels, generator=torch.Generator().manual_seed(5))
    b = FeatureCloud().sample(stats, labels, generator=torch.Generator().manual_seed(5))
    assert a.shape == (3, 3) and torch.equal(a, b)
    assert FeatureCloud(alpha_per_logit=False).sample(stats, labels).shape == (3, 1)


@pytest.mark.parametrize("kwargs,match", [
    (dict(version="ful"), "version='ful' is invalid: expected one of"),
    (dict(version="vanilla"), "head_threshold"),
    (dict(version="vanilla", head_threshold=-1), "head_threshold"),
])
def test_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FeatureCloud(**kwargs)


def test_target_only_and_unsigned_alpha():
    std = torch.tensor([0.2, 0.0, 0.3])
    labels = torch.tensor([2, 0, -1])
    gen = torch.Generator().manual_seed(0)
    alpha = FeatureCloud(target_only=True).sample_from_std(std, 4, gen, labels)
    assert alpha.shape == (3, 4)
    nonzero = alpha != 0
    assert nonzero[0].tolist() == [False, False, True, False]  # only the target column
    assert not nonzero[1].any()  # std 0
    assert not nonzero[2].any()  # no target column here (label -1), whatever its std
    many = FeatureCloud(signed=False).sample_from_std(std.repeat(1000), 5, gen)
    assert (many >= 0).all() and many.max() > 0
    with pytest.raises(ValueError, match="needs the labels"):
        FeatureCloud(target_only=True).sample_from_std(std, 4, gen)


@pytest.mark.parametrize("version", ["full", "vanilla"])
def test_reference_and_std_from_class_blocks_add_up(version):
    """Model parallel: each rank holds a block of classes; the reference sums and the rows'
    sigma_y of the blocks, summed, give the single-process reference and std (what
    LEAPMarginLoss all-reduces)."""
    gen = torch.Generator().manual_seed(4)
    var = torch.rand(10, generator=gen) * 0.3
    var[[2, 7]] = NAN
    counts = torch.randint(2, 40, (10,), generator=gen)
    labels = torch.tensor([0, 9, 2, 5, 7, 3, -1, 8])
    cloud = FeatureCloud(version, head_threshold=20)
    sums, var_y, eligible = 0, 0, 0
    for start, stop in ((0, 4), (4, 7), (7, 10)):
        inside = (labels >= start) & (labels < stop)
        block_labels = torch.where(inside, labels - start, torch.full_like(labels, -1))
        sums = sums + cloud.reference_sums(var[start:stop], counts[start:stop])
        v, e = cloud.cloud_rows(var[start:stop], counts[start:stop], block_labels)
        var_y, eligible = var_y + v, eligible + e.long()
    assert eligible.max() <= 1 and eligible.sum() > 0
    ref = cloud.reference_var_from(var, counts)
    torch.testing.assert_close(sums[0] / sums[1], ref)
    torch.testing.assert_close(cloud.std_of(sums[0] / sums[1], var_y, eligible > 0),
                               cloud.std_from(var, counts, labels))


def test_min_angles_hides_untrusted_variances():
    stats = AngularStats(torch.tensor([10, 10]), 3, memory_factor=1)
    gen = torch.Generator().manual_seed(0)
    stats.update(torch.randn(12, 3, generator=gen), torch.tensor([0] * 9 + [1] * 3))
    assert not torch.isnan(stats.var).any()
    cloud = FeatureCloud("full", min_angles=5)
    trusted = cloud.trusted_var(stats)
    assert not torch.isnan(trusted[0]) and torch.isnan(trusted[1])  # class 1 has 3 < 5 angles
    assert cloud.reference_var(stats).item() == pytest.approx(stats.var[0].item())
    assert cloud.std(stats, torch.tensor([1])).item() == 0
    with pytest.raises(ValueError, match="min_angles"):
        FeatureCloud(min_angles=1)
