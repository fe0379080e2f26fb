"""AngularStats against a naive per-sample Python-loop reference (Eq. 3, 4, 5)."""
import math

import pytest
import torch

from leap_plugin.core import AngularStats


class NaiveStats:
    """Straight from the paper's text: loops over classes and samples, float64.

    ``weights``: which term of Eq. 4 gamma weighs; ``angles_to``: Eq. 3's centre after or before
    this batch's update (a class's first sighting then stores no angle).
    """

    def __init__(self, counts, dim, P, gamma, weights="previous_center", angles_to="updated_center"):
        self.counts, self.P, self.gamma = list(counts), P, gamma
        self.weights, self.angles_to = weights, angles_to
        self.centers = [None] * len(counts)
        self.memory = [[] for _ in counts]  # oldest first, at most K_i * P

    def update(self, feats, labels):
        feats = torch.nn.functional.normalize(feats.double(), dim=1)
        angles = [math.nan] * len(labels)
        classes = sorted({int(y) for y in labels if y >= 0})
        previous = list(self.centers)
        w = 1 - self.gamma if self.weights == "previous_center" else self.gamma  # on the batch mean
        for c in classes:  # Eq. 4 with the mini-batch mean
            idx = [i for i, y in enumerate(labels) if y == c]
            mean = feats[idx].mean(0)
            old = self.centers[c]
            self.centers[c] = mean if old is None else w * mean + (1 - w) * old
        for i, y in enumerate(labels):  # Eq. 3, then the ring buffer of Eq. 5
            y = int(y)
            if y < 0:
                continue
            c = self.centers[y] if self.angles_to == "updated_center" else previous[y]
            if c is None:
                continue
            cos = float(feats[i] @ c / c.norm())
            angles[i] = math.acos(max(-1.0, min(1.0, cos)))
            self.memory[y].append(angles[i])
            size = self.counts[y] * self.P
            if len(self.memory[y]) > size:
                self.memory[y].pop(0)
        return angles

    def mean_var(self):
        means, vars_ = [], []
        for mem in self.memory:
            if len(mem) < 2:
                means.append(math.nan)
                vars_.append(math.nan)
            else:
                m = sum(mem) / len(mem)
                means.append(m)
                vars_.append(sum((a - m) ** 2 for a in mem) / (len(mem) - 1))
        return torch.tensor(means), torch.tensor(vars_)


def _nan_close(a, b, atol):
    assert torch.equal(torch.isnan(a), torch.isnan(b)), (a, b)
    ok = ~torch.isnan(a)
    torch.testing.assert_close(a[ok].double(), b[ok].double(), atol=atol, rtol=0)


READINGS = [(w, a) for w in ("previous_center", "batch_mean") for a in ("updated_center", "previous_center")]


@pytest.mark.parametrize("weights,angles_to", READINGS)
@pytest.mark.parametrize("P,gamma", [(1, 0.1), (2, 0.5), (3, 0.0)])
def test_matches_naive_reference(P, gamma, weights, angles_to):
    gen = torch.Generator().manual_seed(P)
    counts = torch.tensor([1, 2, 3, 5, 8, 2, 4])
    C, D = len(counts), 6
    stats = AngularStats(counts, D, memory_factor=P, center_rate=gamma, center_rate_weights=weights,
                         angles_to=angles_to)
    ref = NaiveStats(counts.tolist(), D, P, gamma, weights, angles_to)
    for step in range(25):
        B = int(torch.randint(1, 20, (1,), generator=gen))
        feats = torch.randn(B, D, generator=gen)
        labels = torch.randint(-1, C, (B,), generator=gen)
        got = stats.update(feats, labels)
        want = torch.tensor(ref.update(feats, labels.tolist()))
        _nan_close(got, want, 1e-5)
    for c in range(C):
        if ref.centers[c] is not None:
            torch.testing.assert_close(stats.centers[c].double(), ref.centers[c], atol=1e-6, rtol=0)
        # ring buffer contents in overwrite order: the last K_i * P angles, oldest first
        n = int(stats.num_angles[c])
        assert n == len(ref.memory[c])
        start, size = int(stats.memory_offset[c]), int(stats.memory_size[c])
        written = int(stats.num_written[c])
        order = [(written - n + k) % size for k in range(n)]
        ring = stats.memory[start:start + size][order]
        torch.testing.assert_close(ring.double(), torch.tensor(ref.memory[c], dtype=torch.float64),
                                   atol=1e-6, rtol=0)
    mean, var = ref.mean_var()
    _nan_close(stats.mean, mean, 1e-6)
    _nan_close(stats.var, var, 1e-6)


def test_batch_with_more_samples_than_memory_keeps_the_last():
    stats = AngularStats(torch.tensor([2]), 3, memory_factor=1, center_rate_weights="previous_center")
    ref = NaiveStats([2], 3, 1, 0.1)
    feats = torch.randn(5, 3, generator=torch.Generator().manual_seed(1))
    stats.update(feats, torch.zeros(5, dtype=torch.long))
    ref.update(feats, [0] * 5)
    assert int(stats.num_angles[0]) == 2
    _nan_close(stats.var, ref.mean_var()[1], 1e-6)


def test_nan_until_two_angles_and_ignored_labels():
    stats = AngularStats(torch.tensor([3, 3]), 4)
    angles = stats.update(torch.randn(3, 4), torch.tensor([0, -1, -1]))
    assert torch.isnan(angles[1:]).all() and not torch.isnan(angles[0])
    assert torch.isnan(stats.var).all()  # class 0 has 1 angle, class 1 none
    assert int(stats.num_written[1]) == 0
    stats.update(torch.randn(1, 4), torch.tensor([0]))
    assert not torch.isnan(stats.var[0]) and torch.isnan(stats.var[1])


def test_state_dict_round_trips_exactly():
    counts = torch.tensor([4, 1, 6])
    a = AngularStats(counts, 5, memory_factor=2)
    gen = torch.Generator().manual_seed(3)
    for _ in range(6):
        a.update(torch.randn(8, 5, generator=gen), torch.randint(0, 3, (8,), generator=gen))
    b = AngularStats(counts, 5, memory_factor=2)
    b.load_state_dict(a.state_dict())
    for name, tensor in a.state_dict().items():
        assert torch.equal(tensor, b.state_dict()[name]), name
    feats, labels = torch.randn(8, 5, generator=gen), torch.randint(0, 3, (8,), generator=gen)
    assert torch.equal(a.update(feats, labels), b.update(feats, labels))
    assert torch.equal(a.var, b.var)


def test_half_precision_features_give_float32_angles():
    stats = AngularStats(torch.tensor([5, 5]), 8)
    feats = torch.randn(6, 8)
    angles = stats.update(feats.half(), torch.tensor([0, 0, 0, 1, 1, 1]))
    assert angles.dtype == torch.float32


@pytest.mark.parametrize("weights", ["previous_center", "batch_mean"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16bit_centres_track_the_float32_statistics(dtype, weights):
    """16-bit storage rounds each centre once per update (Eq. 4 itself runs in float32): the angles
    and variances stay within that rounding of the float32 tracker over a long run. A centre keeps
    1 - w of its rounding error per update (w: the batch mean's weight in Eq. 4), so its error is
    bounded by ulp / (2 w): 0.56 ulp for w = 0.9 (Eq. 4 as printed), 5 ulp for w = 0.1."""
    gen = torch.Generator().manual_seed(5)
    counts = torch.randint(2, 30, (40,), generator=gen)
    ref = AngularStats(counts, 128, center_rate_weights=weights)
    low = AngularStats(counts, 128, center_dtype=dtype, center_rate_weights=weights)
    w = 0.9 if weights == "previous_center" else 0.1
    assert low.centers.dtype == dtype and low.centers.nbytes * 2 == ref.centers.nbytes
    means = torch.randn(40, 128, generator=gen)
    for _ in range(200):
        labels = torch.randint(0, 40, (32,), generator=gen)
        feats = means[labels] + 0.7 * torch.randn(32, 128, generator=gen)
        a, b = ref.update(feats, labels), low.update(feats, labels)
        ulp = 2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -11  # relative rounding of the storage
        assert (a - b).abs().max() < 2 * ulp  # rad
    assert ((low.centers.float() - ref.centers).norm(dim=1) / ref.centers.norm(dim=1)).max() < ulp * max(1, 0.5 / w)
    # |d var| <~ 2 sigma |d angle|: within a few roundings of the storage, for every class
    assert (low.var - ref.var).abs().max() < 4 * ulp * ref.var.max().sqrt()
    # the variances compared are real ones (gamma on the batch mean measures the isotropic 128-d
    # noise's nearly equal angles: ~0.002 rad^2; Eq. 4 as printed, angles to batch-mates: > 0.02)
    assert (ref.var > (0.02 if weights == "previous_center" else 5e-4)).float().mean() > 0.5


def test_angles_to_a_given_reference_instead_of_the_centre():
    """Eq. 3 measured to W_y (the ablation's alternative): each angle is the angle to its reference
    row, the centres still follow Eq. 4, and the memory holds those angles."""
    gen = torch.Generator().manual_seed(9)
    counts = torch.tensor([4, 6, 3])
    to_ref, to_centre = AngularStats(counts, 5), AngularStats(counts, 5)
    weight = torch.randn(3, 5, generator=gen)
    for _ in range(4):
        labels = torch.randint(-1, 3, (7,), generator=gen)
        feats = torch.randn(7, 5, generator=gen)
        got = to_ref.update(feats, labels, weight[labels.clamp(min=0)])
        to_centre.update(feats, labels)
        valid = labels >= 0
        f, w = (torch.nn.functional.normalize(t.double(), dim=1) for t in (feats, weight[labels.clamp(min=0)]))
        want = torch.arccos((f * w).sum(1).clamp(-1, 1))
        torch.testing.assert_close(got[valid].double(), want[valid], atol=1e-5, rtol=0)
        assert torch.isnan(got[~valid]).all()
    torch.testing.assert_close(to_ref.centers, to_centre.centers)
    assert not torch.allclose(to_ref.var.nan_to_num(), to_centre.var.nan_to_num())
    with pytest.raises(ValueError, match="reference must have the shape of features"):
        to_ref.update(torch.randn(2, 5), torch.tensor([0, 1]), torch.randn(3, 5))


@pytest.mark.parametrize("kwargs,match", [
    (dict(class_counts=torch.tensor([2]), feat_dim=4, center_dtype=torch.int8),
     "center_dtype=torch.int8 is invalid: expected one of"),
    (dict(class_counts=torch.tensor([2, 0]), feat_dim=4), "class_counts must be positive"),
    (dict(class_counts=torch.tensor([2, -1]), feat_dim=4), "class_counts must be positive"),
    (dict(class_counts=torch.tensor([2.0]), feat_dim=4), "class_counts must be a non-empty 1-D integer"),
    (dict(class_counts=torch.tensor([2]), feat_dim=4, memory_factor=0), "memory_factor"),
    (dict(class_counts=torch.tensor([2]), feat_dim=4, center_rate=1.0), "center_rate"),
    (dict(class_counts=torch.tensor([2]), feat_dim=4, center_rate=-0.1), "center_rate"),
])
def test_constructor_errors_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AngularStats(**kwargs)


@pytest.mark.parametrize("feats,labels,match", [
    (torch.randn(3, 5), torch.tensor([0, 1, 2]), r"features must have shape \[B, 4\]"),
    (torch.randn(3, 4), torch.tensor([0, 1]), "labels must have shape"),
    (torch.randn(3, 4), torch.tensor([0, 1, 2]), r"labels must lie in \[0, 2\)"),
    (torch.randn(3, 4), torch.tensor([0, 1, -2]), r"labels must lie in \[0, 2\)"),
    (torch.tensor([[math.nan, 0, 0, 0]]), torch.tensor([0]), "NaN or inf"),
    (torch.tensor([[math.inf, 0, 0, 0]]), torch.tensor([0]), "NaN or inf"),
])
def test_update_errors(feats, labels, match):
    stats = AngularStats(torch.tensor([2, 3]), 4)
    with pytest.raises(ValueError, match=match):
        stats.update(feats, labels)


def test_exact_repeats_count_once():
    """FastReID's identity sampler fills a small class's NUM_INSTANCE slots with repeats: a repeated
    row must update the centre and the memory as if it were there once (docs/choices.md)."""
    gen = torch.Generator().manual_seed(3)
    feats = torch.randn(5, 8, generator=gen)
    labels = torch.tensor([0, 0, 0, 1, 1])
    once, twice = AngularStats(torch.tensor([3, 2]), 8), AngularStats(torch.tensor([3, 2]), 8)
    for step in range(3):
        shift = 0.1 * step * torch.randn(5, 8, generator=gen)
        once.update(feats + shift, labels)
        pick = torch.tensor([0, 1, 2, 0, 3, 4, 4, 2])  # rows 0, 2 and 4 repeated
        angles = twice.update((feats + shift)[pick], labels[pick])
        assert angles.isnan().tolist() == [False, False, False, True, False, False, True, True]
    for name, tensor in once.state_dict().items():
        torch.testing.assert_close(twice.state_dict()[name], tensor, atol=1e-6, rtol=0, msg=name)
    # the same row under two labels is two samples, not a repeat
    both = AngularStats(torch.tensor([3, 2]), 8)
    assert not both.update(feats[[0, 0]], torch.tensor([0, 1])).isnan().any()
