"""The core LEAP object and its options: checked once with the user's key in every error, deprecated
spellings still accepted, the step / epoch gating, the model-parallel all-reduce hook against the
single-block result, and the logged metrics against a naive computation."""
import math

import pytest
import torch

from leap_plugin.core import LEAP, OPTIONS, AngularStats, FeatureCloud, LEAPOptions


def test_options_defaults_and_conversion():
    options = LEAPOptions()  # the paper's values where it gives one (README "Options")
    assert {o.name: getattr(options, o.name) for o in OPTIONS} == {
        "version": "full", "head_threshold": None, "memory_factor": 1, "center_rate": 0.1,
        "center_rate_weights": "batch_mean", "start_epoch": 0, "update_every": 1, "alpha_per_logit": True,
        "target_only": False, "signed_alpha": True, "min_angles": 2, "angle_reference": "updated_center",
        "center_dtype": torch.float32, "reset_stats": False}
    assert options.angles_to == "updated_center"
    checked = LEAPOptions.from_mapping({"memory_factor": 2.0, "center_dtype": "bfloat16", "head_threshold": 5,
                                        "version": "vanilla", "angle_reference": "weight"})
    assert checked.memory_factor == 2 and isinstance(checked.memory_factor, int)
    assert checked.center_dtype is torch.bfloat16 and checked.angle_to_weight and checked.angles_to == "updated_center"


@pytest.mark.parametrize("values,match", [
    ({"memory_factor": 0}, r"MODEL\.HEADS\.LEAP\.MEMORY_FACTOR=0 is invalid: expected an integer >= 1 \(P of Eq\. 5\)"),
    ({"center_rate": 1.0}, r"MODEL\.HEADS\.LEAP\.CENTER_RATE=1\.0 is invalid: expected a value in \[0, 1\)"),
    ({"alpha_per_logit": 1}, r"MODEL\.HEADS\.LEAP\.ALPHA_PER_LOGIT=1 is invalid: expected True or False"),
    ({"center_dtype": "half"}, r"MODEL\.HEADS\.LEAP\.CENTER_DTYPE='half' is invalid"),
    ({"version": "vanilla"}, r"MODEL\.HEADS\.LEAP\.HEAD_THRESHOLD must be set \(>= 0\) for MODEL\.HEADS\.LEAP\."),
    ({"memory": 2}, r"unknown LEAP option\(s\) \['MODEL\.HEADS\.LEAP\.MEMORY'\]; known: \['MODEL\.HEADS\.LEAP\."),
])
def test_errors_name_the_users_key(values, match):
    with pytest.raises(ValueError, match=match):
        LEAPOptions.from_mapping(values, key=lambda name: f"MODEL.HEADS.LEAP.{name.upper()}")


def test_core_classes_check_with_the_same_rules():
    with pytest.raises(ValueError, match="memory_factor=0 is invalid: expected an integer >= 1"):
        AngularStats(torch.tensor([2]), 4, memory_factor=0)
    with pytest.raises(ValueError, match="min_angles=1 is invalid"):
        FeatureCloud(min_angles=1)


def test_deprecated_centre_spellings_are_aliases():
    with pytest.warns(DeprecationWarning, match="'previous_centre' is deprecated: use 'previous_center'"):
        options = LEAPOptions.from_mapping({"angle_reference": "previous_centre", "center_rate_weights": "batch_mean"})
    assert options.angle_reference == "previous_center"
    with pytest.warns(DeprecationWarning):
        stats = AngularStats(torch.tensor([2]), 4, center_rate_weights="previous_centre", angles_to="updated_centre")
    assert (stats.center_rate_weights, stats.angles_to) == ("previous_center", "updated_center")


def _batches(num_classes=6, dim=8, steps=6, batch=10, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, dim, generator=gen), torch.randint(0, num_classes, (batch,), generator=gen))
            for _ in range(steps)]


def test_observe_updates_every_nth_step_and_the_epoch_gates_the_cloud():
    counts = torch.tensor([9, 9, 3, 3, 2, 2])
    leap = LEAP(counts, 8, LEAPOptions(update_every=3, start_epoch=2))
    stats = AngularStats(counts, 8)  # the same updates by hand: steps 0 and 3
    for step, (feats, labels) in enumerate(_batches()):
        angles = leap.observe(feats, labels)
        assert (angles is None) == (step % 3 != 0)
        if step % 3 == 0:
            assert torch.equal(angles, stats.update(feats, labels))
    assert leap.step == 6 and torch.equal(leap.stats.angle_sum, stats.angle_sum)
    assert not leap.cloud_active
    leap.set_epoch(2)
    assert leap.cloud_active
    with pytest.raises(ValueError, match="epoch must be a non-negative integer"):
        leap.set_epoch(-1)
    weight = LEAP(counts, 8, LEAPOptions(angle_reference="weight"))
    with pytest.raises(ValueError, match="pass the rows W_y"):
        weight.observe(*_batches()[0])


def test_all_reduce_hook_over_class_blocks_equals_one_block():
    """Model parallel: two LEAP objects over the two halves of the classes, a row's label -1 where
    its class is in the other half, summed by the hook, give the single-object std and reference."""
    counts = torch.tensor([12, 10, 9, 3, 3, 2, 2, 3, 4, 2])
    options = LEAPOptions(version="vanilla", head_threshold=5)
    whole, parts = LEAP(counts, 8, options), [LEAP(counts[:5], 8, options), LEAP(counts[5:], 8, options)]
    for feats, labels in _batches(num_classes=10, steps=30, batch=16):
        whole.observe(feats, labels)
        for start, part in zip((0, 5), parts):
            inside = (labels >= start) & (labels < start + 5)
            part.observe(feats, torch.where(inside, labels - start, -1))
    labels = torch.arange(10)
    local = [torch.where((labels >= s) & (labels < s + 5), labels - s, -1) for s in (0, 5)]
    sent = []
    parts[1].cloud_std(local[1], all_reduce=lambda t: sent.append(t.clone()))  # its share of the sum
    std, ref = parts[0].cloud_std(local[0], all_reduce=lambda t: t.add_(sent[0]))
    want_std, want_ref = whole.cloud_std(labels)
    torch.testing.assert_close(ref, want_ref)
    torch.testing.assert_close(std, want_std)
    assert (std > 0).any() and (std[:3] == 0).all()  # head classes never get a cloud


def test_keyed_alpha_is_a_function_of_seed_step_row_and_column():
    leap = LEAP(torch.tensor([5, 5, 2]), 4, LEAPOptions(), seed=7)
    std = torch.tensor([0.1, 0.0, 0.3])
    a = leap.alpha(std, 3, step=4)
    assert torch.equal(a, leap.alpha(std, 3, step=4)) and not torch.equal(a, leap.alpha(std, 3, step=5))
    assert torch.equal(a[:, 1:], leap.alpha(std, 2, step=4, columns=torch.tensor([1, 2])))  # a shard of it
    lazy = leap.alpha(std, 3, step=4, lazy=True)
    assert torch.equal(lazy.full(), a) and (a[1] == 0).all()
    torch.manual_seed(3)
    unkeyed = LEAP(torch.tensor([5, 5, 2]), 4, LEAPOptions()).alpha(std, 3)
    torch.manual_seed(3)
    assert torch.equal(unkeyed, torch.randn(3, 3) * std[:, None])  # torch's RNG when no seed


def test_metrics_against_a_naive_computation():
    leap = LEAP(torch.tensor([9, 9, 2, 2]), 4, LEAPOptions())
    angles = torch.tensor([0.5, math.nan, 0.25, 1.0])
    std = torch.tensor([0.0, 0.0, 0.2, 0.4])
    alpha = torch.tensor([[0.1, -0.2], [0.0, 0.0], [0.3, -0.1], [0.2, 0.5]])
    metrics = leap.record_metrics(angles, std, alpha, torch.tensor(0.3))
    assert metrics["leap/cloud_fraction"] == 0.5
    assert math.isclose(float(metrics["leap/mean_abs_alpha"]), 1.4 / 8, rel_tol=1e-6)
    assert math.isclose(float(metrics["leap/tail_mean_angle"]), 0.625, rel_tol=1e-6)
    assert math.isclose(float(metrics["leap/head_mean_angle"]), 0.5, rel_tol=1e-6)  # the NaN row stored none
    kept = leap.record_metrics(None, std, None, torch.tensor(0.3))  # a step without an update
    assert kept["leap/tail_mean_angle"] == metrics["leap/tail_mean_angle"] and kept["leap/cloud_fraction"] == 0


def test_the_readme_lists_every_option():
    """The option list is written once in code; the README's table must name each one."""
    import os
    with open(os.path.join(os.path.dirname(__file__), "..", "..", "README.md")) as f:
        table = [line for line in f if line.startswith("| `")]
    assert [o.name for o in OPTIONS] == [line.split("`")[1] for line in table[:len(OPTIONS)]]
