"""Does sigma_i^2 measure a class's spread? AngularStats against the paper's ideal (Section 3.3).

The paper: "Ideally, we need to take the entire training samples into account and average the
features of every class in each epoch"; the EMA of Eq. 4 approximates that. So the truth of a
class is the (unbiased) variance of the angles of ALL its features to their normalised mean, and
the tracker, fed mini-batches of the same fixed features, should report it, whatever the class's
size or how often it shares a batch.

Fixed synthetic unit features, long-tailed <H20, S3> as the demo (20 classes of 20 images, 82 of
3), every class spread along 4 directions of its own (as real features vary; isotropic noise in
2048-D makes every angle nearly equal), at the configs' feature dimensions (512: the Omniglot
and face configs; 2048: the paper's re-ID configs), fed through

* FastReID's real ``NaiveIdentitySampler`` (the re-ID configs: 16 classes x 4 instances, a
  3-image class drawn with replacement), every batch updating the tracker, and
* uniform random batches (the face setting: 128 images a step, the tracker updated every 5th
  step, as ``LEAPMarginLoss(update_every=5)``).

A reading passes when the mean measured variance of the head classes and of the tail classes
are each within [0.7, 1.4] of the truth, and the measured head/tail ratio within [0.75, 1.33]
of the true ratio (equal true spread -> equal measured variance, whatever K_i). Measured here
(test_readings_against_the_truth states it, with repeated rows counted once): angles to the
centre before the update with gamma on the previous centre fail everywhere (the centre is mostly
the batch's own mean, the previous one a stale batch); Eq. 4 as printed with angles to the
updated centre passes the identity sampler and uniform batches at 2048 but fails uniform batches
at 512 (tails 0.67 of the truth); gamma on the batch mean with angles to the updated centre
fails only uniform batches at 512 (head/tail 1.39x the true ratio); gamma on the batch mean with
angles to the previous centre passes all four. Defaults: FastReID (identity sampler) gamma on
the batch mean, angles to the updated centre (chosen on validation, docs/choices.md); the face
loss (uniform batches) angles to the previous centre.
"""
import pytest
import torch

from leap_plugin.core import AngularStats

pytest.importorskip("leap_plugin.fastreid", reason="FastReID (the identity sampler) is not installed")
from fastreid.config import get_cfg  # noqa: E402
from fastreid.data.samplers import NaiveIdentitySampler  # noqa: E402

from leap_plugin.fastreid.config import add_leap_config, leap_options  # noqa: E402

COUNTS = [20] * 20 + [3] * 82
HEAD = torch.tensor(COUNTS) > 3


def features(dim, seed=0, directions=4, spread=0.35):
    """[N, dim] unit features, COUNTS[c] per class c, each class varying along its own directions."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for count in COUNTS:
        mean = torch.randn(dim, generator=gen)
        basis = torch.linalg.qr(torch.randn(dim, directions, generator=gen))[0]
        rows.append(mean / mean.norm() + (torch.randn(count, directions, generator=gen) * spread) @ basis.T)
    labels = torch.repeat_interleave(torch.arange(len(COUNTS)), torch.tensor(COUNTS))
    return torch.nn.functional.normalize(torch.cat(rows), dim=1), labels


def true_variance(feats, labels):
    """[C] the paper's ideal: unbiased variance of the angles of all a class's features to their mean,
    a loop over classes in float64 (independent of the tracker's code)."""
    out = []
    for c in range(len(COUNTS)):
        f = feats[labels == c].double()
        centre = f.mean(0) / f.mean(0).norm()
        out.append(torch.acos((f @ centre).clamp(-1, 1)).var())
    return torch.stack(out)


def identity_batches(labels, steps, batch=64, instances=4, seed=0):
    sampler = iter(NaiveIdentitySampler([(f"{i}.png", int(y), 0) for i, y in enumerate(labels)],
                                        batch, instances, seed=seed))
    for _ in range(steps):
        yield torch.tensor([next(sampler) for _ in range(batch)])


def uniform_batches(n, steps, batch=128, update_every=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    order = torch.cat([torch.randperm(n, generator=gen) for _ in range(steps * update_every * batch // n + 1)])
    for step in range(steps):
        start = step * update_every * batch  # the steps in between update nothing
        yield order[start:start + batch]


def measured(feats, labels, batches, weights, angles_to):
    stats = AngularStats(torch.tensor(COUNTS), feats.shape[1], center_rate=0.1,
                         center_rate_weights=weights, angles_to=angles_to)
    for idx in batches:
        stats.update(feats[idx], labels[idx])
    return stats.var


def verdict(var, truth):
    head, tail = var[HEAD].mean() / truth[HEAD].mean(), var[~HEAD].mean() / truth[~HEAD].mean()
    ratio = head / tail  # measured head/tail ratio over the true one
    return bool(0.7 <= head <= 1.4 and 0.7 <= tail <= 1.4 and 0.75 <= ratio <= 1.33), (head, tail, ratio)


READINGS = [("previous_center", "updated_center"), ("previous_center", "previous_center"),
            ("batch_mean", "updated_center"), ("batch_mean", "previous_center")]
# (weights, angles_to) -> passes, per (sampler, dim)
EXPECTED = {
    ("identity", 512): [True, False, True, True],
    ("identity", 2048): [True, False, True, True],
    ("uniform", 512): [False, False, False, True],
    ("uniform", 2048): [True, False, True, True],
}


@pytest.mark.parametrize("sampler,dim", sorted(EXPECTED))
def test_readings_against_the_truth(sampler, dim):
    feats, labels = features(dim)
    truth = true_variance(feats, labels)
    assert truth[HEAD].mean() > 1.1 * truth[~HEAD].mean()  # a 3-image class spans less, as in the paper
    got, report = [], []
    for weights, angles_to in READINGS:
        batches = (identity_batches(labels, 1200) if sampler == "identity"
                   else uniform_batches(len(labels), 400))
        ok, (head, tail, ratio) = verdict(measured(feats, labels, batches, weights, angles_to), truth)
        got.append(ok)
        report.append(f"{weights}/{angles_to}: head {head:.2f} tail {tail:.2f} of the truth, ratio {ratio:.2f}")
    assert got == EXPECTED[sampler, dim], "\n".join(report)


def test_the_defaults_pass():
    """The readings the shipped defaults build pass where they are used: AngularStats' own and
    FastReID's (``LEAPHead``, identity sampler, D 512 and 2048) and the face loss's
    (``LEAPMarginLoss``, uniform batches, D 512)."""
    from leap_plugin.insightface import LEAPMarginLoss

    def passing(setting):
        return [r for r, ok in zip(READINGS, EXPECTED[setting]) if ok]

    stats = AngularStats(torch.tensor([2]), 4)
    cfg = add_leap_config(get_cfg())
    fastreid = leap_options(cfg)
    fastreid_reading = (fastreid.center_rate_weights, fastreid.angles_to)
    for reading in ((stats.center_rate_weights, stats.angles_to), fastreid_reading):
        assert reading in passing(("identity", 512)) and reading in passing(("identity", 2048))
    face = LEAPMarginLoss(torch.tensor([3, 3]), 4).stats
    assert (face.center_rate_weights, face.angles_to) in passing(("uniform", 512))
