"""Per-class angular statistics: EMA class centres and the angle memory (paper Section 3.3).

For every class i the tracker keeps

* the centre c_i, an EMA of the mini-batch mean of the (l2-normalised) features, Eq. 4, in one of
  its two readings (``center_rate_weights``, docs/choices.md): gamma weighs the previous centre,
  ``c_i <- (1 - gamma) * batch_mean_i + gamma * c_i`` (Eq. 4 as printed), or gamma weighs the batch
  mean, ``c_i <- gamma * batch_mean_i + (1 - gamma) * c_i`` (gamma as "the learning rate of class
  center" of centre loss [39]); the first sighting takes the batch mean either way;
* the angles beta_{i,k} = arccos(f . c_i / (|f| |c_i|)) between each feature and its centre,
  Eq. 3, measured to the centre after this batch's update or before it (``angles_to``), in an
  angle memory of S_i = K_i * P slots, Eq. 5 (a ring buffer: the newest angle overwrites the
  oldest);
* from that memory, the angular mean mu_i and the (unbiased) variance sigma_i^2 that Section 3.4
  and Eq. 6 / Eq. 9 consume.

All memories live in one flat buffer with per-class offsets; an update is a handful of
sort/scatter/gather ops on B-sized tensors, with no Python loop over classes or samples and no
host-device synchronisation. The mean and variance come from running float64 sums over the
memory contents, which the update keeps exact by adding each new angle and subtracting the one it
overwrites.
"""
import math

import torch
import torch.distributed as dist
from torch import nn

from . import integrity
from .options import ANGLE_REFERENCES, ANGLES_TO, CENTER_DTYPES, CENTER_RATE_WEIGHTS, canonical, check_option  # noqa: F401

__all__ = ["AngularStats", "check_class_counts", "CENTER_DTYPES", "ANGLE_REFERENCES", "CENTER_RATE_WEIGHTS",
           "ANGLES_TO"]


def require(ok: torch.Tensor, message) -> None:
    """Raise ValueError(message()) unless the boolean tensor ``ok`` holds.

    On CUDA the check is asynchronous (``torch._assert_async``): it costs no host-device sync on
    the training path and fails the next synchronising call with the same message.
    """
    if ok.is_cuda:
        torch._assert_async(ok, message())
    elif not bool(ok):
        raise ValueError(message())


def values_in(t: torch.Tensor) -> str:
    """', got values in [min, max]' for an error message; '' on CUDA (``require`` builds its
    message before the check, and reading the values would cost a host sync on every call)."""
    if t.is_cuda:
        return ""
    low, high = t.detach().aminmax()
    return f", got values in [{low.item():g}, {high.item():g}]"


def check_labels(labels: torch.Tensor, num_classes: int, name: str = "labels") -> None:
    """Raise a ValueError unless every label is -1 (ignored) or in [0, num_classes)."""
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got {labels.dtype}")
    if labels.numel():
        require((labels >= -1).all() & (labels < num_classes).all(),
                lambda: f"{name} must lie in [0, {num_classes}) or be -1 (ignored){values_in(labels)}")


def check_class_counts(class_counts, what: str = "") -> torch.Tensor:
    """K_i as a LongTensor [C], or a ValueError: a non-empty 1-D integer tensor, every K_i >= 1.
    ``what``: more about where the counts come from, for the message."""
    counts = torch.as_tensor(class_counts)
    if counts.dim() != 1 or counts.numel() == 0 or counts.dtype.is_floating_point or counts.dtype == torch.bool:
        raise ValueError(f"class_counts must be a non-empty 1-D integer tensor of K_i{' ' + what if what else ''}, "
                         f"got dtype {counts.dtype} and shape {tuple(counts.shape)}")
    if (counts <= 0).any():
        bad = torch.nonzero(counts <= 0).flatten()[:5].tolist()
        raise ValueError(f"class_counts must be positive (every class needs >= 1 image); "
                         f"classes {bad} have count <= 0")
    return counts.long()


def unit_angle(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise angle arccos(a . b) between unit vectors (Eq. 3), accurate to float32 rounding.

    Evaluated as 2 * atan2(|a - b|, |a + b|), which equals arccos(a . b) for unit vectors but
    keeps full precision near 0 and pi, where float32 arccos(clamp(a . b)) is off by up to
    sqrt(2 * eps) = 3.5e-4 rad (a single-image class would get a spurious angle of that size).
    """
    return 2 * torch.atan2((a - b).norm(dim=1), (a + b).norm(dim=1))


def drop_repeats(feats: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``labels`` with -1 for every exact repeat of an earlier row of the same class in the batch.

    FastReID's identity sampler draws a class with fewer images than NUM_INSTANCE with replacement
    (a 3-image class fills its 4 slots with a repeat). A repeated feature is no new sample of the
    class: kept, it counts twice in the batch mean of Eq. 4 and in the angle memory, and a small
    class's sigma_i^2 comes out low (measured in docs/choices.md: 0.58-0.92 of the true variance
    with repeats, 0.83-1.01 without). Rows are compared exactly (repeats through the same network in
    one batch are bitwise equal; two augmentations of one image are different samples and stay).
    Sorting by (class, a projection of the row) puts repeats side by side: one sort of B keys and
    one [B, D] comparison, no Python loop.
    """
    if feats.shape[0] < 2:
        return labels
    # the projection only orders rows: equal rows have equal projections and end up adjacent (only
    # an exact float tie with a different row of the class could separate them)
    proj = feats @ torch.linspace(1.0, 2.0, feats.shape[1], device=feats.device)
    order = torch.argsort(proj, stable=True)
    order = order[torch.argsort(labels[order], stable=True)]
    rows, classes = feats[order], labels[order]
    same = (classes[1:] == classes[:-1]) & (classes[1:] >= 0) & (rows[1:] == rows[:-1]).all(dim=1)
    repeat = torch.zeros_like(labels, dtype=torch.bool)
    repeat[order[1:]] = same
    return torch.where(repeat, torch.full_like(labels, -1), labels)


def _check_features(features: torch.Tensor, labels: torch.Tensor, feat_dim: int) -> None:
    if features.dim() != 2 or features.shape[1] != feat_dim:
        raise ValueError(f"features must have shape [B, {feat_dim}], got {tuple(features.shape)}")
    if labels.dim() != 1 or labels.shape[0] != features.shape[0]:
        raise ValueError(
            f"labels must have shape [B] with B = features.shape[0] = {features.shape[0]}, "
            f"got {tuple(labels.shape)}")
    if features.numel():  # min and max carry any NaN / inf: one pass, no [B, D] mask
        require(torch.isfinite(torch.stack(features.detach().aminmax())).all(),
                lambda: "features contain NaN or inf: the angle to a class centre is undefined "
                        "(check the learning rate / mixed-precision overflow upstream)")
        counted = labels.to(features.device) >= 0
        zero = (torch.linalg.vector_norm(features.detach(), math.inf, dim=1) == 0) & counted  # [B]
        require(~zero.any(), lambda: "a feature row of a counted sample is all zero: it has no direction, so "
                                     "no angle to its class centre (check the network's output)"
                                     + ("" if zero.is_cuda else f"; rows {torch.nonzero(zero)[:5, 0].tolist()}"))


class _ClassGroups:
    """A batch grouped by class without a dynamic shape (sort, then one group per run of a class).

    [B] tensors: ``valid`` (label >= 0), ``safe`` (label, -1 -> 0), ``group`` (the group of each
    row), ``position`` (the row's place within its class in the batch, in batch order),
    ``in_batch`` (n_y: rows of the row's class in the batch); and ``group_class`` (the class of
    group g at index g).
    """

    def __init__(self, labels: torch.Tensor, num_classes: int):
        batch = labels.shape[0]
        arange = torch.arange(batch, device=labels.device)
        self.valid = labels >= 0
        self.safe = labels.clamp(min=0)
        key = torch.where(self.valid, self.safe, torch.full_like(self.safe, num_classes))
        order = torch.sort(key, stable=True).indices
        sorted_key = key[order]
        starts = torch.ones(batch, dtype=torch.bool, device=labels.device)
        starts[1:] = sorted_key[1:] != sorted_key[:-1]
        group_of_sorted = torch.cumsum(starts.long(), 0) - 1
        self.group = torch.empty_like(group_of_sorted).scatter_(0, order, group_of_sorted)
        first = torch.cummax(torch.where(starts, arange, torch.zeros_like(group_of_sorted)), 0).values
        self.position = torch.empty_like(group_of_sorted).scatter_(0, order, arange - first)
        group_count = torch.zeros(batch, dtype=torch.long, device=labels.device).index_add_(
            0, self.group, torch.ones_like(self.group))
        self.in_batch = group_count[self.group]
        self.group_class = torch.zeros_like(self.safe).scatter_(0, self.group, self.safe)


def _angles_to_centres(feats: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    """Eq. 3: [B] angles between unit features and their centres, in float32, as ``unit_angle``'s
    2 * atan2(|f - c|, |f + c|), with c normalised and f + c formed in ``centre``'s buffer (which
    it overwrites: each fresh [B, D] buffer costs page faults on CPU; 18 of them made the update
    4-6x slower at B >= 512)."""
    centre.div_(centre.norm(dim=1, keepdim=True).clamp_(min=1e-12))  # = F.normalize
    far = (feats - centre).norm(dim=1)
    return 2 * torch.atan2(far, centre.add_(feats).norm(dim=1))


class AngularStats(nn.Module):
    """EMA class centres (Eq. 4), angle memory (Eq. 3, Eq. 5) and per-class angular mean/variance.

    Args:
        class_counts: K_i, the number of training images of each class (LongTensor [C], all > 0).
        feat_dim: D, the dimension of the features the classifier sees.
        memory_factor: P in Eq. 5; class i remembers its last K_i * P angles.
        center_rate: gamma in Eq. 4, in [0, 1).
        center_rate_weights: which term of Eq. 4 gamma weighs (the other gets 1 - gamma):
            "batch_mean" (default; centre loss's learning rate, c <- gamma batch mean + (1 - gamma) c:
            the centre moves a step gamma toward the batch mean) or "previous_center" (Eq. 4 as
            printed, c <- (1 - gamma) batch mean + gamma c: with gamma = 0.1 the centre is mostly
            this batch's mean, and each angle mostly one to its batch-mates; the behaviour before
            this option). tests/core/test_stats_truth.py measures both against the true variance.
        angles_to: "updated_center" (Eq. 3 after this batch's Eq. 4 update) or "previous_center"
            (before it, so a feature is never measured to a centre it has just pulled toward
            itself; a class's first sighting then stores no angle: it has no centre yet).
        sync: when torch.distributed is initialised, gather features and labels from every rank
            before the update so that all ranks hold identical statistics (data parallel).
        center_dtype: storage dtype of the centres (float32, or float16 / bfloat16 to halve the
            C x D buffer, as for a million classes under partial FC). Eq. 4 and the angles are
            always computed in float32; only the stored centre is rounded.

    Every tensor of the state is a buffer, so it is saved and restored with the host's checkpoint.
    """

    def __init__(self, class_counts, feat_dim: int, memory_factor: int = 1, center_rate: float = 0.1,
                 sync: bool = True, center_dtype: torch.dtype = torch.float32,
                 center_rate_weights: str = "batch_mean", angles_to: str = "updated_center"):
        super().__init__()
        counts = check_class_counts(class_counts)
        if int(feat_dim) < 1:
            raise ValueError(f"feat_dim must be >= 1, got {feat_dim}")
        angles_to = canonical(angles_to)
        if angles_to not in ANGLES_TO:
            raise ValueError(f"angles_to (Eq. 3's center: after or before this batch's update) must be "
                             f"one of {ANGLES_TO}, got {angles_to!r}")
        num_classes = counts.numel()
        self.feat_dim = int(feat_dim)
        self.memory_factor = check_option("memory_factor", memory_factor)
        self.center_rate = check_option("center_rate", center_rate)
        self.center_rate_weights = check_option("center_rate_weights", center_rate_weights)
        center_dtype = check_option("center_dtype", center_dtype)
        self.angles_to = angles_to
        self.sync = sync

        sizes = counts * self.memory_factor
        offsets = torch.cumsum(sizes, 0) - sizes
        self.register_buffer("class_counts", counts)
        # derived from class_counts and P: not saved, rebuilt on construction
        self.register_buffer("memory_size", sizes, persistent=False)
        self.register_buffer("memory_offset", offsets, persistent=False)
        self.register_buffer("centers", torch.zeros(num_classes, self.feat_dim, dtype=center_dtype))
        # one flat angle memory; the extra last slot is a scratch slot for ignored writes
        self.register_buffer("memory", torch.zeros(int(sizes.sum()) + 1))
        self.register_buffer("num_written", torch.zeros(num_classes, dtype=torch.long))
        self.register_buffer("angle_sum", torch.zeros(num_classes, dtype=torch.float64))
        self.register_buffer("angle_sq_sum", torch.zeros(num_classes, dtype=torch.float64))

    @property
    def num_classes(self) -> int:
        return self.class_counts.numel()

    @property
    def num_angles(self) -> torch.Tensor:
        """[C] how many angles the memory of each class holds now (at most K_i * P)."""
        return torch.minimum(self.num_written, self.memory_size)

    @property
    def mean(self) -> torch.Tensor:
        """[C] angular mean mu_i of the angle memory; NaN for a class with fewer than 2 angles."""
        n = self.num_angles.double()
        mean = self.angle_sum / n
        return torch.where(n >= 2, mean, torch.full_like(mean, math.nan)).float()

    @property
    def var(self) -> torch.Tensor:
        """[C] unbiased angular variance sigma_i^2 of the angle memory; NaN below 2 angles."""
        n = self.num_angles.double()
        var = (self.angle_sq_sum - self.angle_sum.square() / n) / (n - 1)
        return torch.where(n >= 2, var.clamp(min=0), torch.full_like(var, math.nan)).float()

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, feat_dim={self.feat_dim}, "
                f"memory_factor={self.memory_factor}, center_rate={self.center_rate}, "
                f"center_rate_weights={self.center_rate_weights}, angles_to={self.angles_to}, "
                f"memory_slots={self.memory.numel() - 1}")

    def _gather(self, features, labels):
        """All ranks' features and labels, so every rank makes the same update (data parallel)."""
        if not (self.sync and dist.is_available() and dist.is_initialized()
                and dist.get_world_size() > 1):
            return features, labels
        world = dist.get_world_size()
        size = torch.tensor([features.shape[0]], device=features.device)
        sizes = [torch.zeros_like(size) for _ in range(world)]
        dist.all_gather(sizes, size)
        longest = int(max(s.item() for s in sizes))
        pad = longest - features.shape[0]
        feats = torch.cat([features, features.new_zeros(pad, features.shape[1])])
        labs = torch.cat([labels, labels.new_full((pad,), -1)])
        all_feats = [torch.empty_like(feats) for _ in range(world)]
        all_labs = [torch.empty_like(labs) for _ in range(world)]
        dist.all_gather(all_feats, feats)
        dist.all_gather(all_labs, labs)
        return torch.cat(all_feats), torch.cat(all_labs)

    @torch.no_grad()
    def update(self, features: torch.Tensor, labels: torch.Tensor, reference=None) -> torch.Tensor:
        """Update centres (Eq. 4) and angle memory (Eq. 3, 5) with a mini-batch.

        Args:
            features: [B, D] features (any float dtype; computed in float32, not differentiated).
            labels: [B] class indices; -1 marks a sample to ignore.
            reference: None (the paper: each angle is measured to the sample's class centre) or
                [B, D] vectors to measure it to instead, e.g. the classifier weight rows W_y (an
                open choice, docs/choices.md); the centres are updated either way.

        Returns:
            [B] float32 angles between each feature and its class centre (or reference; NaN for -1
            and, with ``angles_to="previous_center"``, for a class's first sighting). Under
            data-parallel sync, the angles of this rank's samples only.
        """
        _check_features(features, labels, self.feat_dim)
        check_labels(labels, self.num_classes)
        if reference is not None and reference.shape != features.shape:
            raise ValueError(f"reference must have the shape of features {tuple(features.shape)}, "
                             f"got {tuple(reference.shape)}")
        local_batch = features.shape[0]
        feats, labels, reference = self._prepare(features, labels, reference)
        batch = _ClassGroups(labels, self.num_classes)
        previous = self.centers[batch.safe].float()  # [B, D] c_y before this batch
        written = self.num_written[batch.safe]
        # a class is new until it has stored an angle (updated centre) or has a centre (previous
        # centre: its first sighting stores none)
        to_previous = self.angles_to == "previous_center"
        seen = previous.norm(dim=1) > 0 if to_previous else written > 0
        store = batch.valid & seen if to_previous else batch.valid
        # delta reuses previous's buffer unless previous is Eq. 3's centre (to_previous)
        delta = self._update_centers(feats, batch, previous.clone() if to_previous else previous, seen)
        if reference is not None:
            centre = delta.copy_(reference)
        else:
            centre = previous if to_previous else delta.copy_(self.centers[batch.safe])
        angles = _angles_to_centres(feats, centre)
        angles = torch.where(store, angles, torch.full_like(angles, math.nan))
        self._write_memory(angles, batch, store, written)
        self._check_running(angles, torch.where(store, labels, torch.full_like(labels, -1)))
        if angles.shape[0] != local_batch:  # data-parallel sync: return this rank's part
            dist_rank = dist.get_rank()
            longest = angles.shape[0] // dist.get_world_size()
            angles = angles[dist_rank * longest: dist_rank * longest + local_batch]
        return angles

    def _prepare(self, features, labels, reference):
        """The batch as Eq. 3-5 see it: every rank's rows (data parallel), unit float32 features
        on the statistics' device, repeats dropped (label -1), the reference split back out."""
        if reference is not None:  # gathered with the features, side by side
            features = torch.cat([features.detach().float(), reference.detach().float().to(features.device)], 1)
        features, labels = self._gather(features, labels)
        if reference is not None:
            features, reference = features.split(self.feat_dim, dim=1)
        feats = nn.functional.normalize(features.detach().float(), dim=1)
        labels = labels.to(self.centers.device)
        feats = feats.to(self.centers.device)
        return feats, drop_repeats(feats, labels), reference

    def _update_centers(self, feats, batch, previous, seen):
        """Eq. 4 for every class of the batch; returns the [B, D] per-sample steps (in the buffer
        ``previous``, which it overwrites).

        c <- w * batch mean + (1 - w) * c with w = 1 - gamma (gamma weighs the previous centre) or
        w = gamma (gamma weighs the batch mean); the first sighting takes the batch mean. In
        float32: sample i contributes r_i * (f_i - c_y) with r_i = w / n_y (1 / n_y at the first
        sighting), so the n_y rows of class y sum to w * (mean - c_y); the sum is made per group,
        then added to each class's stored centre once (one rounding in 16 bits).
        """
        batch_weight = 1 - self.center_rate if self.center_rate_weights == "previous_center" else self.center_rate
        rate = torch.where(seen, batch_weight, 1.0) * batch.valid / batch.in_batch
        delta = previous.sub_(feats).mul_(-rate[:, None])
        shift = torch.zeros_like(delta).index_add_(0, batch.group, delta)  # [B, D]: row g = group g's change
        self.centers.index_add_(0, batch.group_class, shift.to(self.centers.dtype))
        return delta

    def _write_memory(self, angles, batch, store, written):
        """Eq. 5: ring-buffer write of the stored angles and the running sums of the mean / variance.

        When a batch holds more than S_i samples of a class only the last S_i are kept (as a
        sequential write would leave them), the rest go to the scratch slot. A slot never written
        holds 0, so subtracting the overwritten value is always right.
        """
        safe = batch.safe
        size = self.memory_size[safe]
        keep = store & (batch.position >= batch.in_batch - size)
        slot = self.memory_offset[safe] + (written + batch.position) % size
        scratch = self.memory.numel() - 1
        slot = torch.where(keep, slot, torch.full_like(slot, scratch))
        stored32 = torch.where(keep, angles, torch.zeros_like(angles))
        stored, overwritten = stored32.double(), self.memory[slot].double()
        self.memory.index_put_((slot,), stored32)
        self.memory[scratch] = 0
        self.angle_sum.index_add_(0, safe, stored - overwritten)
        self.angle_sq_sum.index_add_(0, safe, stored.square() - overwritten.square())
        self.num_written.index_add_(0, safe, store.long())

    # ------------------------------------------------------------------ state integrity
    def _check_running(self, angles: torch.Tensor, labels: torch.Tensor) -> None:
        """A non-finite angle of a counted sample means a non-finite centre: an error naming the
        class (on CUDA asynchronous, without the class: ``check_state()`` names it)."""
        bad = (labels >= 0) & ~torch.isfinite(angles)
        require(~bad.any(), lambda: "non-finite angle to the centre of "
                + ("a class (call check_state() to find which)" if bad.is_cuda else
                   f"class(es) {labels[bad].unique().tolist()}")
                + ": the statistics hold a non-finite centre (restore a sound checkpoint)")

    def check_state(self) -> None:
        """Raise ``integrity.StatsStateError`` naming the class unless every centre and sum is
        finite, every angle in [0, pi] and the running sums match the angle memory (host sync)."""
        integrity.check_values(dict(self.named_buffers()), self.memory_size, "AngularStats")

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + integrity.LAYOUT_KEY] = torch.tensor(
            [self.memory_factor, self.num_classes, self.feat_dim])

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # refuse a state of other options, an incomplete one or corrupt values before copying anything
        integrity.check_loadable(self, state_dict, prefix)
        state_dict.pop(prefix + integrity.LAYOUT_KEY, None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
