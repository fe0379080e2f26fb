"""The training path has no Python loop over samples or classes (the core's contract, leap_plugin/core).

Deterministic, not a timing test: the Python-level work of a call -- lines executed, Python
function calls and calls into C (sys.settrace + sys.setprofile, in every frame, torch's included)
-- is counted, and must not grow from B = 8 to B = 512 samples nor from C = 10 to C = 10,000
classes. A loop over labels, samples or classes adds at least one event per iteration (hundreds
here); the slack only absorbs a size-dependent branch or two.
"""
import sys
from collections import Counter

import pytest
import torch

import leap_plugin.core.blocks as tiles
from leap_plugin.core import LEAP, AngularStats, FeatureCloud, LEAPOptions, leap_logits

SLACK = 16  # events a size-dependent branch may add; a loop adds >= 500 (B) or >= 9,990 (C)
DIM = 16


def python_events(fn):
    """Lines, Python calls and C calls executed by ``fn()`` (a warm-up call runs first)."""
    fn()
    counts = Counter()

    def tracer(frame, event, arg):
        counts[event] += 1
        return tracer

    def profiler(frame, event, arg):
        if event == "c_call":
            counts[event] += 1

    old_trace, old_profile = sys.gettrace(), sys.getprofile()
    sys.settrace(tracer)
    sys.setprofile(profiler)
    try:
        fn()
    finally:
        sys.settrace(old_trace)
        sys.setprofile(old_profile)
    return counts["line"] + counts["call"] + counts["c_call"]


def _stats(num_classes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    counts = torch.randint(1, 6, (num_classes,), generator=gen)
    counts[:3] = 40  # a few head classes, for the vanilla reference
    stats = AngularStats(counts, DIM, memory_factor=2)
    labels = torch.arange(num_classes).repeat(2)  # every class gets >= 2 angles: variances known
    stats.update(torch.randn(labels.numel(), DIM, generator=gen), labels)
    return stats


def _batch(batch, num_classes, seed=1):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (batch,), generator=gen)
    labels[::7] = -1  # ignored samples take the same path
    return torch.randn(batch, DIM, generator=gen), labels


def _update(batch, num_classes):
    stats = _stats(num_classes)
    feats, labels = _batch(batch, num_classes)
    return python_events(lambda: stats.update(feats, labels))


def _sample(batch, num_classes, cloud):
    stats = _stats(num_classes)
    _, labels = _batch(batch, num_classes)
    gen = torch.Generator().manual_seed(2)
    return python_events(lambda: cloud.sample(stats, labels, generator=gen))


def _logits(batch, num_classes, margin, per_logit):
    gen = torch.Generator().manual_seed(3)
    cosine = (torch.rand(batch, num_classes, generator=gen) * 2 - 1).requires_grad_()
    _, labels = _batch(batch, num_classes)
    alpha = torch.randn((batch, num_classes) if per_logit else (batch,), generator=gen)

    def step():
        cosine.grad = None
        leap_logits(cosine, labels, alpha, margin, scale=30.0, margin_value=0.3).sum().backward()
    return python_events(step)


def _assert_flat(small, large, what):
    assert large <= small + SLACK, (
        f"{what}: {small} Python-level events for the small size, {large} for the large one -- "
        f"a Python loop over samples or classes on the training path?")


def test_update_has_no_loop_over_samples():
    _assert_flat(_update(8, 50), _update(512, 50), "AngularStats.update, B = 8 vs 512")


def test_update_has_no_loop_over_classes():
    _assert_flat(_update(64, 10), _update(64, 10_000), "AngularStats.update, C = 10 vs 10,000")


@pytest.mark.parametrize("cloud", [FeatureCloud("full"), FeatureCloud("vanilla", head_threshold=5),
                                   FeatureCloud("full", alpha_per_logit=False)], ids=repr)
def test_sample_has_no_loop(cloud):
    _assert_flat(_sample(8, 50, cloud), _sample(512, 50, cloud), "FeatureCloud.sample, B = 8 vs 512")
    _assert_flat(_sample(64, 10, cloud), _sample(64, 10_000, cloud), "FeatureCloud.sample, C = 10 vs 10,000")


@pytest.mark.parametrize("margin", ["cos", "arc"])
@pytest.mark.parametrize("per_logit", [True, False])
def test_leap_logits_forward_backward_has_no_loop(margin, per_logit, monkeypatch):
    # the CPU's cache tiles (core.blocks: one iteration per ~32k logits) are switched off here,
    # so that a loop over samples or classes stands out
    monkeypatch.setattr(tiles, "BLOCK_ELEMENTS", 1 << 40)
    _assert_flat(_logits(8, 50, margin, per_logit), _logits(512, 50, margin, per_logit),
                 "leap_logits + backward, B = 8 vs 512")
    _assert_flat(_logits(16, 10, margin, per_logit), _logits(16, 10_000, margin, per_logit),
                 "leap_logits + backward, C = 10 vs 10,000")


def _leap_step(batch, num_classes, seed):
    """One training step of the core LEAP object: observe, cloud std, alpha, metrics."""
    stats = _stats(num_classes)
    leap = LEAP(stats.class_counts, DIM, LEAPOptions(version="vanilla", head_threshold=5, memory_factor=2), seed=seed)
    leap.stats.load_state_dict(stats.state_dict())
    feats, labels = _batch(batch, num_classes)

    def step():
        angles = leap.observe(feats, labels)
        std, ref = leap.cloud_std(labels)
        leap.record_metrics(angles, std, leap.alpha(std, num_logits=num_classes, labels=labels), ref)
    return python_events(step)


@pytest.mark.parametrize("seed", [None, 3], ids=["torch-rng", "keyed"])
def test_leap_step_has_no_loop(seed, monkeypatch):
    monkeypatch.setattr(tiles, "BLOCK_ELEMENTS", 1 << 40)  # as above: no cache tiles
    _assert_flat(_leap_step(8, 50, seed), _leap_step(512, 50, seed), "LEAP step, B = 8 vs 512")
    _assert_flat(_leap_step(64, 10, seed), _leap_step(64, 10_000, seed), "LEAP step, C = 10 vs 10,000")


def test_the_counter_sees_a_loop_over_labels():
    """The check can fail: the same update followed by a per-label loop is caught."""
    def looped(batch):
        stats = _stats(50)
        feats, labels = _batch(batch, 50)

        def update():
            stats.update(feats, labels)
            for label in labels:  # what the tests above must reject
                stats.num_written[label.clamp(min=0)] += 0
        return python_events(update)
    with pytest.raises(AssertionError, match="Python loop"):
        _assert_flat(looped(8), looped(512), "looped update")
