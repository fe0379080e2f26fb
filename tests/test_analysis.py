"""leap_plugin.analysis (the paper's Section 1 measurement) and tools/analyze.py, against
independent references: a per-class Python loop, t-table values, features built at known angles."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from leap_plugin.analysis import (_neighbour_classes, class_angles, head_tail_summary, mean_ci,
                                  plot_angle_distributions, plot_tsne, plot_variance_bars)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------- references

def naive_class_angles(features, labels):
    """One class at a time, float64 numpy, arccos of the cosine: the textbook Eq. 3."""
    f = np.asarray(features, np.float64)
    f = f / np.linalg.norm(f, axis=1, keepdims=True)
    labels = np.asarray(labels)
    angles = np.empty(len(f))
    classes, var, count = [], [], []
    for c in sorted(set(labels.tolist())):
        idx = np.flatnonzero(labels == c)
        centre = f[idx].mean(axis=0)
        centre /= np.linalg.norm(centre)
        a = np.arccos(np.clip(f[idx] @ centre, -1, 1))
        angles[idx] = a
        classes.append(c)
        count.append(len(idx))
        var.append(np.var(a, ddof=1) if len(idx) > 1 else np.nan)
    return angles, np.array(classes), np.array(var), np.array(count)


def cones(rng, num_classes, pairs, low, high, dim=3):
    """Features of each class at angles theta ~ U(low, high) from a random centre, in pairs at
    azimuths phi and phi + pi, so the mean of the normalised features points exactly at the
    centre and the angle to it is exactly theta. Random norms (the measurement normalises).

    Returns features [C * 2 * pairs, dim], labels, theta (the true angles)."""
    basis = np.linalg.qr(rng.normal(size=(num_classes, dim, dim)))[0]  # columns: centre, e1, e2, ...
    theta = rng.uniform(low, high, size=(num_classes, pairs))
    phi = rng.uniform(0, 2 * np.pi, size=(num_classes, pairs))
    theta = np.concatenate([theta, theta], axis=1)
    phi = np.concatenate([phi, phi + np.pi], axis=1)
    local = np.zeros((num_classes, 2 * pairs, dim))
    local[..., 0] = np.cos(theta)
    local[..., 1] = np.sin(theta) * np.cos(phi)
    local[..., 2] = np.sin(theta) * np.sin(phi)
    feats = np.einsum("cij,ckj->cki", basis, local) * rng.uniform(0.5, 3.0, size=(num_classes, 2 * pairs, 1))
    labels = np.repeat(np.arange(num_classes), 2 * pairs)
    return feats.reshape(-1, dim), labels, theta.reshape(-1)


def expected_var(low, high, pairs):
    """E[unbiased sample variance] of 2 * pairs angles where each of `pairs` draws of U(low, high)
    appears twice: 2 (m - 1) / (2m - 1) * sigma^2."""
    sigma2 = (high - low) ** 2 / 12
    return 2 * (pairs - 1) / (2 * pairs - 1) * sigma2


HEAD = dict(pairs=10, low=0.2, high=1.0)   # 20 images, wide spread
TAIL = dict(pairs=2, low=0.2, high=0.5)    # 4 images, narrow spread


def head_tail_data(rng, num_head=30, num_tail=30):
    fh, lh, th = cones(rng, num_head, **HEAD)
    ft, lt, tt = cones(rng, num_tail, **TAIL)
    return np.concatenate([fh, ft]), np.concatenate([lh, lt + num_head]), np.concatenate([th, tt])


# ------------------------------------------------------------------------------- class_angles

def test_analysis_module_imports_no_host():
    code = "import sys, leap_plugin.analysis; print(sorted(m for m in sys.modules if m.startswith('fastreid')))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


def test_class_angles_matches_a_per_class_loop():
    rng = np.random.default_rng(0)
    labels = rng.choice([3, 7, 11, 42, 100], size=300)
    labels[17] = 999  # a class with a single image
    centres = rng.normal(size=(1000, 16))
    feats = (centres[labels] + 0.6 * rng.normal(size=(300, 16))) * rng.uniform(0.1, 10, size=(300, 1))
    ref_angles, ref_classes, ref_var, ref_count = naive_class_angles(feats, labels)

    angles, classes, var, count = class_angles(torch.from_numpy(feats), torch.from_numpy(labels))
    assert angles.dtype == torch.float64 and var.dtype == torch.float64
    np.testing.assert_array_equal(classes.numpy(), ref_classes)
    np.testing.assert_array_equal(count.numpy(), ref_count)
    np.testing.assert_allclose(angles.numpy(), ref_angles, rtol=0, atol=1e-9)
    np.testing.assert_allclose(var.numpy(), ref_var, rtol=1e-9, equal_nan=True)
    single = int(np.flatnonzero(ref_classes == 999)[0])
    assert math.isnan(var[single]) and abs(float(angles[17])) < 1e-7

    # float32 features (numpy in): float32 angles, within float32 rounding of the float64 reference
    angles32, classes32, var32, count32 = class_angles(feats.astype(np.float32), labels)
    assert angles32.dtype == torch.float32
    np.testing.assert_allclose(angles32.numpy(), ref_angles, rtol=0, atol=2e-6)
    np.testing.assert_allclose(var32.numpy(), ref_var, rtol=1e-4, equal_nan=True)


def test_class_angles_recovers_known_angles_and_variances():
    rng = np.random.default_rng(1)
    feats, labels, theta = head_tail_data(rng, num_head=5, num_tail=5)
    angles, classes, var, count = class_angles(feats, labels)
    np.testing.assert_allclose(angles.numpy(), theta, rtol=0, atol=1e-9)
    expected = [np.var(theta[labels == c], ddof=1) for c in range(10)]
    np.testing.assert_allclose(var.numpy(), expected, rtol=1e-9)
    assert count.tolist() == [20] * 5 + [4] * 5


@pytest.mark.parametrize("features, labels, message", [
    (np.ones((4, 3)), np.zeros(5, dtype=int), "labels must have shape"),
    (np.ones((4, 3)), np.zeros(4), "labels must be integers"),
    (np.ones(4), np.zeros(4, dtype=int), "non-empty float"),
    (np.array([[1.0, 0, 0], [0, 0, 0]]), np.zeros(2, dtype=int), "zero vectors"),
    (np.array([[1.0, np.nan, 0], [0, 1, 0]]), np.zeros(2, dtype=int), "NaN"),
])
def test_class_angles_rejects_bad_input(features, labels, message):
    with pytest.raises(ValueError, match=message):
        class_angles(features, labels)


# ------------------------------------------------------------------------------- mean_ci and summary

# Student-t quantiles from a printed table: t_{0.975, 3}, t_{0.95, 3}, t_{0.975, 2}, t_{0.975, 1}
T975_3, T95_3, T975_2, T975_1 = 3.182446, 2.353363, 4.302653, 12.706205


def test_mean_ci_by_hand():
    mean, half, n = mean_ci([1.0, 2.0, 3.0, 4.0, float("nan")])
    s = math.sqrt(((1.5 ** 2 + 0.5 ** 2) * 2) / 3)  # sample sd of 1..4
    assert n == 4 and mean == 2.5
    assert half == pytest.approx(T975_3 * s / 2, rel=1e-6)
    half90 = mean_ci(torch.tensor([1.0, 2.0, 3.0, 4.0]), level=0.90)[1]
    assert half90 == pytest.approx(T95_3 * s / 2, rel=1e-6)
    mean, half, n = mean_ci([0.7, float("nan")])
    assert (mean, n) == (0.7, 1) and math.isnan(half)
    mean, half, n = mean_ci([])
    assert n == 0 and math.isnan(mean) and math.isnan(half)
    with pytest.raises(ValueError, match="level"):
        mean_ci([1.0, 2.0], level=95)


def test_head_tail_summary_by_hand():
    var = [0.4, 0.2, 0.5, 0.3, 0.6, float("nan")]
    count = [10, 3, 12, 3, 9, 1]
    is_head = np.array([True, False, True, False, True, False])
    s = head_tail_summary(var, count, is_head)
    assert s["level"] == 0.95
    assert s["head"]["var_mean"] == pytest.approx(0.5)
    assert s["head"]["var_ci"] == pytest.approx(T975_2 * 0.1 / math.sqrt(3), rel=1e-6)
    head = s["head"]
    assert (head["num_classes"], head["num_classes_with_var"], head["num_images"]) == (3, 3, 31)
    assert s["tail"]["var_mean"] == pytest.approx(0.25)
    assert s["tail"]["var_ci"] == pytest.approx(T975_1 * (0.1 / math.sqrt(2)) / math.sqrt(2), rel=1e-6)
    assert (s["tail"]["num_classes"], s["tail"]["num_classes_with_var"], s["tail"]["num_images"]) == (3, 2, 7)
    json.dumps(s)  # plain Python numbers
    with pytest.raises(ValueError, match="one entry per class"):
        head_tail_summary(var, count[:-1], is_head)
    with pytest.raises(ValueError, match="boolean"):
        head_tail_summary(var, count, is_head.astype(int))


def test_head_variance_exceeds_tail_and_the_intervals_cover_the_truth():
    rng = np.random.default_rng(2)
    feats, labels, _ = head_tail_data(rng)
    angles, classes, var, count = class_angles(torch.from_numpy(feats).float(), labels)
    s = head_tail_summary(var, count, count > 4)
    head, tail = s["head"], s["tail"]
    assert (head["num_classes"], tail["num_classes"]) == (30, 30)
    assert head["var_mean"] - head["var_ci"] > tail["var_mean"] + tail["var_ci"]  # clearly separated
    truth_head, truth_tail = expected_var(**HEAD), expected_var(**TAIL)
    assert abs(head["var_mean"] - truth_head) < head["var_ci"]
    assert abs(tail["var_mean"] - truth_tail) < tail["var_ci"]


def test_confidence_intervals_have_their_nominal_coverage():
    """400 independent replicates of the head/tail experiment in one class_angles call: the 95%
    intervals must cover the true mean variance about 95% of the time (binomial sd 1.1%; the
    4-image tail variances are skewed, which costs the t interval ~1.5% of coverage: 3000
    replicates give 0.954 head, 0.937 tail)."""
    rng = np.random.default_rng(3)
    reps, per_rep = 400, 60
    feats, labels, _ = head_tail_data(rng, num_head=30 * reps, num_tail=30 * reps)
    _, classes, var, count = class_angles(feats, labels)
    var = var.numpy()
    head_var, tail_var = var[:30 * reps].reshape(reps, 30), var[30 * reps:].reshape(reps, 30)
    for name, group, truth in (("head", head_var, expected_var(**HEAD)),
                               ("tail", tail_var, expected_var(**TAIL))):
        hits = [abs(m - truth) <= h for m, h, _ in (mean_ci(row) for row in group)]
        assert 0.90 <= np.mean(hits) <= 0.99, (name, np.mean(hits))
    assert per_rep * reps == classes.numel()


# ------------------------------------------------------------------------------- plots

def test_plot_angle_distributions_one_panel_per_method(tmp_path, png):
    rng = np.random.default_rng(4)
    feats, labels, _ = head_tail_data(rng, num_head=6, num_tail=10)
    angles, classes, var, count = class_angles(feats, labels)
    is_head = (count > 4)[labels]
    one = png(plot_angle_distributions({"baseline": (angles, is_head)}, str(tmp_path / "one.png")))
    runs = {"baseline": (angles, is_head), "LEAP": (angles.numpy() * 0.7, is_head)}
    two = png(plot_angle_distributions(runs, str(tmp_path / "sub" / "two.png")))
    assert two[1] > one[1] * 1.5 and two[0] == one[0]
    with pytest.raises(ValueError, match="bools"):
        plot_angle_distributions({"x": (angles, is_head[:-1])}, str(tmp_path / "bad.png"))


def test_plot_variance_bars(tmp_path, png):
    s1 = head_tail_summary([0.4, 0.5, 0.6, 0.2, 0.3], [9, 9, 9, 3, 3], np.array([1, 1, 1, 0, 0], bool))
    s2 = head_tail_summary([0.4, 0.5, 0.6, 0.2, np.nan], [9, 9, 9, 3, 1], np.array([1, 1, 1, 0, 0], bool))
    png(plot_variance_bars({"baseline": s1, "LEAP": s2}, str(tmp_path / "bars.png")))  # NaN CI drawn as none
    with pytest.raises(ValueError, match="empty"):
        plot_variance_bars({}, str(tmp_path / "none.png"))


def test_plot_tsne(tmp_path, png):
    rng = np.random.default_rng(5)
    feats, labels, _ = head_tail_data(rng, num_head=8, num_tail=10)
    _, classes, _, count = class_angles(feats, labels)
    is_head = (count > 4).numpy()
    png(plot_tsne(feats, labels, is_head, str(tmp_path / "tsne.png"), num_head=3, num_tail=4))
    with pytest.raises(ValueError, match="one per distinct label"):
        plot_tsne(feats, labels, is_head[:-1], str(tmp_path / "bad.png"))


def test_tsne_shows_neighbouring_classes():
    # head classes 0-2 around +x, head 3-5 around -x; tail 6-8 near +x, tail 9-11 near -x
    x = np.array([1.0, 0, 0])
    offsets = np.array([[0, 0.1, 0], [0, 0, 0.1], [0, -0.1, 0]])
    centres = np.concatenate([x + offsets, -x + offsets, x + 2 * offsets, -x + 2 * offsets])
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    is_head = np.array([True] * 6 + [False] * 6)
    for seed in range(6):
        heads, tails = _neighbour_classes(centres, is_head, 3, 3, seed)
        assert sorted(heads) in ([0, 1, 2], [3, 4, 5])
        assert sorted(tails) == ([6, 7, 8] if sorted(heads) == [0, 1, 2] else [9, 10, 11])
    heads, tails = _neighbour_classes(centres, is_head, 2, 10, 0)
    assert len(heads) == 2 and sorted(tails) == list(range(6, 12))
