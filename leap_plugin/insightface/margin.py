"""LEAP margin loss for InsightFace arcface_torch: a drop-in for ``CombinedMarginLoss``.

arcface_torch's ``PartialFC_V2(margin_loss, embedding_size, num_classes, sample_rate, fp16)``
calls ``margin_loss(logits, labels)`` with the clamped cosines of the global batch against this
rank's class block (or the sampled columns of it) and the labels remapped to those columns, -1
where the class lives on another rank. ``LEAPMarginLoss`` keeps that contract and adds the
feature cloud (Eq. 7 CosFace, Eq. 8 ArcFace) where the margin is applied::

    margin_loss = LEAPMarginLoss.from_margin_list(cfg.margin_list, 64, class_counts, cfg.embedding_size)
    module_partial_fc = PartialFC_V2(margin_loss, cfg.embedding_size, cfg.num_classes,
                                     cfg.sample_rate, cfg.fp16)
    margin_loss.attach(module_partial_fc)     # the statistics need the embeddings
    ...
    margin_loss.set_epoch(epoch)              # in the epoch loop: the cloud starts at start_epoch

How the pieces sit under model parallelism (every rank holds the block of classes
``[class_start, class_start + num_local)`` exactly as PartialFC_V2 splits them):

* **Embeddings.** ``attach`` registers a forward pre-hook on the PartialFC_V2 module; it sees
  ``(local_embeddings, local_labels)`` and calls :meth:`LEAPMarginLoss.observe`, which all-gathers
  them (no grad, in rank order, as PartialFC does) so the rows match the logits' rows.
* **Statistics.** Each rank tracks centres (16-bit by default) and angle memory for its own class
  block only (``AngularStats`` over ``num_local`` classes, ``sync=False``): no buffer spans all C
  classes, so the statistics per rank stay below the rank's FC weight at any C
  (``benchmarks/bench_memory.py``). Every ``update_every`` steps the block is updated with the
  gathered batch. Each step, one all-reduce of 2 B + 2 numbers gives every rank the reference
  variance (Eq. 6 / 9: its two sums add up over the blocks) and sigma_y of every row (only the
  rank that holds class y fills it in).
* **alpha.** A row's softmax is split over the ranks, so its alpha must be the same on every rank.
  alpha is drawn from a counter-based generator: a pure function of ``(seed, step, global row,
  global class)`` (:func:`keyed_normal`). Each rank evaluates it for the columns it holds; the
  union over ranks is exactly the single-process draw, whatever the world size, the class split or
  the ``sample_rate < 1`` sampling, and on any device. (A seeded ``torch.Generator`` per step would
  only give that for one alpha per sample: its stream depends on the tensor shape it fills.)
  A per-logit alpha is never held whole: ``leap_logits`` draws it block by block, in cache, where
  Eq. 7 / 8 use it, and the logits overwrite the cosines passed in (as ``CombinedMarginLoss``
  does; ``inplace``), so the step holds one [B, C] buffer more than the host's: the saved
  derivative (``benchmarks/bench_face_step.py``).
* **Sampled columns.** With ``sample_rate < 1`` PartialFC_V2 stores the sampled local class
  indices in ``weight_index`` right before it calls the margin loss; the attached loss reads them
  to know the global class of each column (used by the per-logit alpha). The statistics never
  need them: they use the true labels that the pre-hook gathered.
* **Checkpoints.** The loss is PartialFC_V2's ``margin_softmax`` submodule, so the statistics
  (buffers) and the step/epoch counters (extra state) are in ``module_partial_fc.state_dict()``,
  i.e. in train_v2's per-rank ``checkpoint_gpu_{rank}.pt``, and come back on resume.
"""
import math
import weakref

import torch
import torch.distributed as dist
from torch import nn

from ..core import AngularStats, FeatureCloud, leap_logits
from ..core.blocks import blocks
from ..core.margins import MARGINS
from ..core.integrity import load_checked
from ..core.stats import ANGLE_REFERENCES, angles_to_of

__all__ = ["LEAPMarginLoss", "KeyedNormal", "keyed_normal", "class_block"]

_M32 = 0xFFFFFFFF
# arcface_torch names of the options a saved statistics state must share with the run (core.integrity)
STATS_OPTIONS = {"memory_factor": "config.leap['memory_factor']",
                 "class_counts": "the classes of this rank's block (config.num_classes, the class counts "
                                 "K_i of config.rec or config.leap['class_counts'], or the world size)",
                 "feat_dim": "config.embedding_size"}


def class_block(num_classes: int, rank: int, world_size: int):
    """``(class_start, num_local)`` of ``rank``, exactly as PartialFC_V2 splits the classes."""
    num_local = num_classes // world_size + int(rank < num_classes % world_size)
    class_start = num_classes // world_size * rank + min(rank, num_classes % world_size)
    return class_start, num_local


def _mix32(x):
    """A 32-bit integer hash (avalanching) of python ints or int64 tensors holding [0, 2^32).

    Multipliers are below 2^27, so no int64 product overflows.
    """
    x = ((x >> 16) ^ x) * 0x45D9F3B & _M32
    x = ((x >> 16) ^ x) * 0x45D9F3B & _M32
    return (x >> 16) ^ x


def _int32(x):
    """The int32 with the bits of ``x`` (python int or int64 tensor in [0, 2^32))."""
    x = (x ^ 0x80000000) - 0x80000000
    return x.int() if torch.is_tensor(x) else x


# lowbias32 (C. Wellons, "hash prospector"): x ^= x >> 16; x *= M1; x ^= x >> 15; x *= M2; x ^= x >> 16
_LOWBIAS = ((16, 0x7FEB352D), (15, _int32(0x846CA68B)), (16, 1))


def _lowbias32(h, tmp):
    """lowbias32 of an int32 tensor, in place. int32 products wrap mod 2^32; a right shift of
    int32 copies the sign bit, so the shifted-in bits are masked off (a logical shift)."""
    for shift, mult in _LOWBIAS:
        torch.bitwise_right_shift(h, shift, out=tmp).bitwise_and_((1 << (32 - shift)) - 1)
        h.bitwise_xor_(tmp)
        if mult != 1:
            h.mul_(mult)
    return h


class KeyedNormal:
    """The table of standard normal draws z[i, j], a pure function of ``(key, rows[i], cols[j])``,
    drawn where it is read: ``half_var(r, c)`` (slices) gives a block of z / sqrt(2),
    ``half_var_gather(index)`` the entries ``z[i, index[i, k]] / sqrt(2)``, ``full()`` all of z.

    Any subset of rows/columns gets the values the full table has at those places, on any device:
    this is what lets every rank draw its shard of a row's alpha without communication.

    Each row and each column id is hashed once with the key (32 bits each); a draw hashes the XOR
    of its row's and column's hashes (lowbias32), takes the top 24 bits as an odd multiple u of
    2^-24 in (-1, 1) (uniform, symmetric, never +-1) and returns the inverse normal CDF of
    (u + 1) / 2, i.e. sqrt(2) erfinv(u): one 32-bit hash and one erfinv per draw, in int32 and
    float32. The tails reach sqrt(2) erfinv(1 - 2^-24) = 5.3 (the 2^-25 quantile).

    Args:
        key: any non-negative python int (e.g. mixed from a seed and the step).
        rows: [B] int64 row ids.
        cols: None (one draw per row: a [B, 1] table) or [N] int64 column ids ([B, N]).
    """

    def __init__(self, key: int, rows: torch.Tensor, cols=None):
        k_row = _mix32(_mix32(key & _M32) ^ 0x68E31DA4)
        k_col = _mix32(_mix32((key >> 32) & _M32) ^ 0x1B56C4E9)
        self._rows = _int32(_mix32((rows.long() & _M32) ^ k_row))[:, None]
        self._cols = self._rows.new_zeros(1) if cols is None else _int32(_mix32((cols.long() & _M32) ^ k_col))
        self.shape = torch.Size((self._rows.shape[0], self._cols.shape[0]))

    @staticmethod
    def _erfinv(h, out=None):
        """erfinv(u) of the hashes ``h`` (int32, overwritten): N(0, 1/2) draws."""
        u = _lowbias32(h, torch.empty_like(h)).bitwise_right_shift_(7).bitwise_or_(1)
        return torch.erfinv(torch.mul(u, 2.0 ** -24), out=out)

    def half_var(self, rows: slice, cols: slice) -> torch.Tensor:
        """The block ``z[rows, cols] / sqrt(2)`` (N(0, 1/2) draws: the caller's scale absorbs the
        sqrt(2), one pass less)."""
        return self._erfinv(torch.bitwise_xor(self._rows[rows], self._cols[cols]))

    def half_var_gather(self, index: torch.Tensor) -> torch.Tensor:
        """``z[i, index[i, k]] / sqrt(2)``."""
        return self._erfinv(torch.bitwise_xor(self._rows, self._cols[index]))

    def full(self) -> torch.Tensor:
        """The whole [B, N] table, computed block by block (in cache on CPU: ``core.blocks``)."""
        out = torch.empty(self.shape, device=self._rows.device)
        for r, c in blocks(*self.shape, out.device):
            self._erfinv(torch.bitwise_xor(self._rows[r], self._cols[c]), out=out[r, c]).mul_(math.sqrt(2.0))
        return out


def keyed_normal(key: int, rows: torch.Tensor, cols=None) -> torch.Tensor:
    """Standard normal draws that are a pure function of ``(key, row, col)``: the [B, 1] (cols
    None) or [B, N] table of :class:`KeyedNormal`."""
    return KeyedNormal(key, rows, cols).full()


class _CloudAlpha:
    """Per-logit alpha = std[row] * z[row, col] (Eq. 7 / 8) over a :class:`KeyedNormal` table, as a
    block source for ``leap_logits`` (a block is drawn when it is read), or whole (``full``)."""

    def __init__(self, table: KeyedNormal, std: torch.Tensor, cloud: FeatureCloud):
        self.table, self.std, self.cloud = table, std, cloud
        self.shape = table.shape
        self._half_std = std * math.sqrt(2.0)  # z / sqrt(2) * (sqrt(2) std): one pass a block

    def __getitem__(self, index):
        block = self.table.half_var(*index)
        return self.cloud.alpha_from_noise(block, self._half_std[index[0]], block.shape[1])

    def gather(self, dim: int, index: torch.Tensor) -> torch.Tensor:
        if dim != 1:
            raise ValueError("the alpha of a block source is gathered along columns (dim=1)")
        return self.cloud.alpha_from_noise(self.table.half_var_gather(index), self._half_std, index.shape[1])

    def full(self) -> torch.Tensor:
        out = torch.empty(self.shape, device=self.std.device)
        for r, c in blocks(*self.shape, out.device):
            out[r, c] = self[r, c]
        return out


def _step_key(seed: int, step: int) -> int:
    """A 64-bit key from (seed, step): two mixed 32-bit halves."""
    lo = _mix32((seed & _M32) ^ _mix32(step & _M32))
    hi = _mix32(((seed >> 32) & _M32) ^ _mix32((step >> 32) & _M32) ^ 0x9E3779B9)
    return (hi << 32) | lo


def _world():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class LEAPMarginLoss(nn.Module):
    """CosFace / ArcFace margin logits with the LEAP feature cloud, PartialFC_V2 contract.

    ``forward(logits, labels)`` takes what PartialFC_V2 passes to its margin loss -- clamped
    cosines ``[B_global, C_cols]`` of this rank's (sampled) class columns and labels ``[B_global, 1]``
    remapped to those columns (-1: the class is on another rank) -- and returns scaled logits
    ``[B_global, C_cols]`` for PartialFC's distributed cross entropy. With the cloud off (before
    ``start_epoch``, or in eval mode) they equal CosFace / ArcFace.

    Args:
        class_counts: K_i, images per class for ALL classes (LongTensor [C], C = cfg.num_classes).
        embedding_size: D, the embedding dimension (cfg.embedding_size).
        margin: "cos" (CosFace, Eq. 7) or "arc" (ArcFace, Eq. 8).
        scale: s (arcface_torch uses 64).
        margin_value: m_c (CosFace, paper: 0.35) or m_a (ArcFace, paper: 0.5).
        version: "full" (Eq. 9) or "vanilla" (Eq. 6; needs ``head_threshold``). The paper's face
            results (Table 6, LEAP-CV / LEAP-AV) use the vanilla version.
        head_threshold: T for "vanilla": a class with K_i > T images is a head class.
        memory_factor: P in Eq. 5 (angle memory of K_i * P angles per class).
        center_rate: gamma in Eq. 4 (paper: 0.1).
        center_rate_weights: which term of Eq. 4 gamma weighs: "batch_mean" (default: a step gamma
            toward the batch mean, centre loss's learning rate) or "previous_centre" (Eq. 4 as
            printed: gamma on the old centre; the behaviour before this option). docs/choices.md.
        start_epoch: the cloud is on from this epoch (``set_epoch``); the statistics are tracked
            from the start. Paper (faces): the start of the third triangular-LR cycle.
        update_every: update centres/angles every N training steps (default 5: the paper's
            setting for faces, Section 4.3; 1 updates on every step).
        alpha_per_logit: one alpha per (sample, class logit) -- the paper's "alpha_x in R^{1 x C}"
            -- (True) or one alpha per sample (False).
        target_only: alpha on the target logit only (Eq. 7 / 8 put it on every logit: False).
        signed_alpha: alpha ~ N(0, s^2) as the paper (True) or |alpha| (False).
        min_angles: angles a class needs in memory before its variance is trusted (>= 2).
        angle_reference: Eq. 3's angles to the EMA feature centre after this update's Eq. 4,
            "updated_centre" (also "centre"), or before it, "previous_centre" (default: the reading
            that matches the true variance under uniform batches with ``update_every``,
            tests/core/test_stats_truth.py); or "weight" (angles to the class's FC weight row W_y;
            needs ``attach``).
        center_dtype: storage of the centres (a torch dtype or its name): float16 (default: half
            the bytes of the FC weight block; Eq. 4 is still computed in float32), bfloat16 or
            float32.
        seed: base seed of the alpha draws; together with the step it keys every draw.
        straight_through: take the gradient w.r.t. the cosines as s (identity), with the values
            of Eq. 7 / 8. arcface_torch's ``CombinedMarginLoss`` computes its ArcFace margin under
            ``no_grad``, i.e. exactly this; False (default) differentiates Eq. 7 / 8.
        interclass_filtering_threshold: as ``CombinedMarginLoss``: non-target cosines above it
            are zeroed (0 = off).
        inplace: write the logits into the float32 cosines passed in (overwriting them) and
            return that tensor, as ``CombinedMarginLoss`` overwrites its input: one [B, C] buffer
            and its page faults less per step. Not done for a leaf (or a view of one) that
            requires grad.

    Must be constructed after ``torch.distributed`` is initialised (as PartialFC_V2); without a
    process group it is a single-process loss over all classes.
    """

    def __init__(self, class_counts, embedding_size: int, margin: str = "arc", scale: float = 64.0,
                 margin_value: float = 0.5, version: str = "full", head_threshold=None,
                 memory_factor: int = 1, center_rate: float = 0.1, center_rate_weights: str = "batch_mean",
                 start_epoch: int = 0,
                 update_every: int = 5, alpha_per_logit: bool = True, target_only: bool = False,
                 signed_alpha: bool = True, min_angles: int = 2, angle_reference: str = "previous_centre",
                 center_dtype: torch.dtype = torch.float16, seed: int = 0,
                 straight_through: bool = False, interclass_filtering_threshold: float = 0.0,
                 inplace: bool = True):
        super().__init__()
        if margin not in MARGINS:
            raise ValueError(f"margin must be one of {MARGINS} (cos: CosFace Eq. 7, arc: ArcFace Eq. 8), "
                             f"got {margin!r}")
        if not float(scale) > 0:
            raise ValueError(f"scale (s) must be > 0, got {scale}")
        if not 0.0 <= float(margin_value) < math.pi:
            raise ValueError(f"margin_value must lie in [0, pi), got {margin_value}")
        for name, value, low in (("start_epoch", start_epoch, 0), ("update_every", update_every, 1),
                                 ("seed", seed, 0)):
            if int(value) != value or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if angle_reference not in ANGLE_REFERENCES:
            raise ValueError(f"angle_reference must be one of {ANGLE_REFERENCES} (Eq. 3: the EMA centre, "
                             f"or W_y), got {angle_reference!r}")
        if not 0.0 <= float(interclass_filtering_threshold) <= 1.0:
            raise ValueError(f"interclass_filtering_threshold must lie in [0, 1] (0 = off), "
                             f"got {interclass_filtering_threshold}")
        counts = torch.as_tensor(class_counts)
        if counts.dim() != 1 or counts.numel() == 0 or counts.dtype.is_floating_point:
            raise ValueError(f"class_counts must be a 1-D integer tensor with K_i of every class "
                             f"(cfg.num_classes entries), got dtype {counts.dtype} and shape "
                             f"{tuple(counts.shape)}")
        counts = counts.long()
        self.margin = margin
        self.scale = float(scale)
        self.margin_value = float(margin_value)
        self.start_epoch = int(start_epoch)
        self.update_every = int(update_every)
        self.seed = int(seed)
        self.straight_through = bool(straight_through)
        self.inplace = bool(inplace)
        self.interclass_filtering_threshold = float(interclass_filtering_threshold)
        self.cloud = FeatureCloud(version, head_threshold, alpha_per_logit, target_only, signed_alpha, min_angles)
        self.angle_to_weight = angle_reference == "weight"
        if isinstance(center_dtype, str):
            center_dtype = getattr(torch, center_dtype, center_dtype)

        self.rank, self.world_size = _world()
        num_classes = counts.numel()
        self.class_start, self.num_local = class_block(num_classes, self.rank, self.world_size)
        if self.num_local == 0:
            raise ValueError(f"num_classes={num_classes} is smaller than the world size "
                             f"{self.world_size}: rank {self.rank} holds no class")
        self.embedding_size = int(embedding_size)
        block = counts[self.class_start: self.class_start + self.num_local]
        self.stats = AngularStats(block, self.embedding_size, memory_factor=memory_factor,
                                  center_rate=center_rate, sync=False, center_dtype=center_dtype,
                                  center_rate_weights=center_rate_weights,
                                  angles_to=angles_to_of(angle_reference))
        self.num_classes = num_classes
        self.step = 0
        self.epoch = 0
        self._pending = None  # (global labels, step) from observe(), consumed by forward()
        self._partial_fc = None  # weakref: PartialFC_V2 owns this loss, a strong ref would be a cycle
        self._hook = None

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def from_margin_list(cls, margin_list, scale, class_counts, embedding_size, **leap):
        """Build from arcface_torch's ``cfg.margin_list = (m1, m2, m3)``.

        ``(1.0, m, 0.0)`` is ArcFace with m_a = m, ``(1.0, 0.0, m)`` CosFace with m_c = m; other
        combinations (SphereFace m1 != 1, combined margins) are not what Eq. 7 / 8 define.
        """
        m1, m2, m3 = (float(m) for m in margin_list)
        if m1 == 1.0 and m3 == 0.0:
            margin, value = "arc", m2
        elif m1 == 1.0 and m2 == 0.0 and m3 > 0.0:
            margin, value = "cos", m3
        else:
            raise ValueError(f"margin_list={tuple(margin_list)}: LEAP defines CosFace (1.0, 0.0, m) and "
                             f"ArcFace (1.0, m, 0.0) only (paper Eq. 7, Eq. 8)")
        return cls(class_counts, embedding_size, margin=margin, scale=scale, margin_value=value, **leap)

    def __getstate__(self):
        # pickling / deepcopy: the weak link to PartialFC_V2 and the step's pending batch stay behind
        state = self.__dict__.copy()
        state.update(_partial_fc=None, _hook=None, _pending=None)
        return state

    def extra_repr(self) -> str:
        return (f"margin={self.margin!r}, scale={self.scale}, margin_value={self.margin_value}, "
                f"{self.cloud}, start_epoch={self.start_epoch}, update_every={self.update_every}, "
                f"num_classes={self.num_classes}, class_block=[{self.class_start}, "
                f"{self.class_start + self.num_local}), straight_through={self.straight_through}")

    # ------------------------------------------------------------------ epoch / step state
    def set_epoch(self, epoch: int) -> None:
        """Tell the loss the training epoch (0-based, as train_v2's loop); the cloud is on from
        ``start_epoch``."""
        if int(epoch) != epoch or epoch < 0:
            raise ValueError(f"epoch must be a non-negative integer, got {epoch!r}")
        self.epoch = int(epoch)

    @property
    def cloud_active(self) -> bool:
        return self.epoch >= self.start_epoch

    def get_extra_state(self):
        return {"step": self.step, "epoch": self.epoch, "num_classes": self.num_classes}

    def set_extra_state(self, state):
        if state.get("num_classes", self.num_classes) != self.num_classes:
            raise ValueError(f"checkpoint of a LEAPMarginLoss over {state['num_classes']} classes loaded "
                             f"into one over {self.num_classes} (cfg.num_classes differs)")
        self.step = int(state["step"])
        self.epoch = int(state["epoch"])

    # config.leap['reset_stats'] (tools/train_arcface_leap.py sets it): resume without the statistics
    reset_stats = False

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # refuse statistics of other options or corrupt ones, naming the config key (core.integrity)
        load_checked(self.stats, state_dict, prefix + "stats.", self.reset_stats, STATS_OPTIONS,
                     "set config.leap['reset_stats'] = True to resume the model and start the "
                     "statistics afresh")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ------------------------------------------------------------------ embeddings in
    def attach(self, partial_fc: nn.Module) -> "LEAPMarginLoss":
        """Feed this loss the embeddings of ``partial_fc`` (a PartialFC_V2 built with it).

        Registers a forward pre-hook that passes ``(local_embeddings, local_labels)`` to
        :meth:`observe` in training mode, and lets ``forward`` read the sampled columns
        (``weight_index``) when ``sample_rate < 1``. Returns self.
        """
        if getattr(partial_fc, "margin_softmax", None) is not self:
            raise ValueError("attach() needs the PartialFC_V2 module that was built with this loss "
                             "(its margin_softmax must be this LEAPMarginLoss)")
        start, local = getattr(partial_fc, "class_start", None), getattr(partial_fc, "num_local", None)
        if (start, local) != (self.class_start, self.num_local):
            raise ValueError(f"class block mismatch: PartialFC holds [{start}, {start}+{local}) but the "
                             f"loss was built for [{self.class_start}, {self.class_start}+{self.num_local}) "
                             f"(different num_classes or world size?)")
        if getattr(partial_fc, "embedding_size", self.embedding_size) != self.embedding_size:
            raise ValueError(f"embedding_size mismatch: PartialFC {partial_fc.embedding_size}, "
                             f"loss {self.embedding_size}")
        if self._hook is not None:
            self._hook.remove()
        self._partial_fc = weakref.ref(partial_fc)
        self._hook = partial_fc.register_forward_pre_hook(self._pre_hook, with_kwargs=True)
        return self

    def _pre_hook(self, module, args, kwargs):
        if not module.training:
            return None
        values = list(args) + [kwargs[k] for k in ("local_embeddings", "local_labels") if k in kwargs]
        if len(values) < 2:
            raise RuntimeError("LEAPMarginLoss expected PartialFC_V2(local_embeddings, local_labels)")
        self.observe(values[0], values[1])
        return None

    def _all_gather(self, tensor):
        if self.world_size == 1:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    @torch.no_grad()
    def observe(self, local_embeddings: torch.Tensor, local_labels: torch.Tensor) -> None:
        """One training step's embeddings: gather, update the statistics, prime ``forward``.

        Called by the pre-hook that :meth:`attach` registers (or by hand, once per step before
        ``forward``, when there is no PartialFC_V2). Collective: every rank calls it each step
        with the same batch size (PartialFC_V2 requires that too).

        Args:
            local_embeddings: [B, D] this rank's embeddings (any float dtype; not differentiated).
            local_labels: [B] or [B, 1] this rank's global class labels.
        """
        labels = local_labels.reshape(-1).long()
        if local_embeddings.dim() != 2 or local_embeddings.shape != (labels.shape[0], self.embedding_size):
            raise ValueError(f"local_embeddings must have shape [B, {self.embedding_size}] with B = "
                             f"{labels.shape[0]} labels, got {tuple(local_embeddings.shape)}")
        global_labels = self._all_gather(labels)
        inside = (global_labels >= self.class_start) & (global_labels < self.class_start + self.num_local)
        block_labels = torch.where(inside, global_labels - self.class_start, torch.full_like(global_labels, -1))
        block_labels = block_labels.to(self.stats.centers.device)
        if self.step % self.update_every == 0:
            features = self._all_gather(local_embeddings.detach().float())
            reference = None
            if self.angle_to_weight:
                pfc = self._partial_fc() if self._partial_fc is not None else None
                if pfc is None:
                    raise RuntimeError("angle_reference='weight' measures angles to PartialFC_V2's weight: "
                                       "attach() the PartialFC_V2 module built with this loss")
                reference = pfc.weight.detach()[block_labels.clamp(min=0)].float()
            self.stats.update(features, block_labels, reference)
        std = self._cloud_std(block_labels) if self.cloud_active else None
        self._pending = (global_labels, self.step, std)
        self.step += 1

    def _cloud_std(self, block_labels):
        """[B_global] cloud std of every row (Eq. 6 / 9), the same on every rank.

        The reference variance's two sums and sigma_y of the rows whose class is in this block are
        summed over the ranks in one all-reduce (every row's class lives in exactly one block).
        """
        var = self.cloud.trusted_var(self.stats)
        sums = self.cloud.reference_sums(var, self.stats.class_counts)
        var_y, eligible = self.cloud.cloud_rows(var, self.stats.class_counts, block_labels)
        if self.world_size > 1:
            packed = torch.cat([sums, var_y, eligible.float()])
            dist.all_reduce(packed)
            batch = var_y.shape[0]
            sums, var_y, eligible = packed[:2], packed[2: 2 + batch], packed[2 + batch:] > 0
        return self.cloud.std_of(sums[0] / sums[1], var_y, eligible)

    # ------------------------------------------------------------------ logits out
    def _columns(self, num_cols: int, columns, device):
        """Global class id of each logit column."""
        if columns is not None:
            columns = torch.as_tensor(columns, device=device).long().reshape(-1)
        else:
            pfc = self._partial_fc() if self._partial_fc is not None else None
            if pfc is not None and getattr(pfc, "sample_rate", 1) < 1:
                columns = pfc.weight_index.to(device).long() + self.class_start
            elif num_cols == self.num_local:
                return torch.arange(self.class_start, self.class_start + num_cols, device=device)
            else:
                raise ValueError(f"logits have {num_cols} columns but this rank holds {self.num_local} "
                                 f"classes: pass columns= (global class of each column) or attach() "
                                 f"the PartialFC_V2 module that samples them")
        if columns.numel() != num_cols:
            raise ValueError(f"columns has {columns.numel()} entries for {num_cols} logit columns")
        return columns

    def alpha(self, std: torch.Tensor, step: int, num_logits: int, columns=None, labels=None, lazy=False):
        """alpha ~ N(0, std^2) for the rows of the global batch at ``step`` (``FeatureCloud`` options).

        [B, 1] (per sample), [B, len(columns)] (per logit, columns = global class of each column)
        or, with target_only, [B, num_logits] zero but in each row's target column (``labels``).
        ``lazy``: a per-logit alpha comes back as a block source for ``leap_logits`` (each block
        drawn where it is used, never held whole) instead of a tensor.
        """
        rows = torch.arange(std.shape[0], device=std.device)
        cols = columns if self.cloud.noise_columns(num_logits) > 1 else None
        table = KeyedNormal(_step_key(self.seed, step), rows, cols)
        if cols is None:
            return self.cloud.alpha_from_noise(table.full(), std, num_logits, labels)
        alpha = _CloudAlpha(table, std, self.cloud)
        return alpha if lazy else alpha.full()

    def forward(self, logits: torch.Tensor, labels: torch.Tensor, columns=None) -> torch.Tensor:
        """Scaled margin logits (Eq. 7 / Eq. 8) for PartialFC_V2's distributed cross entropy.

        Args:
            logits: [B, C_cols] cosines, B = the global batch (all ranks), C_cols = this rank's
                classes or the sampled subset of them.
            labels: [B] or [B, 1] target column of each row, -1 where it is not in this shard.
            columns: optional [C_cols] global class of each column; needed only for a per-logit
                alpha with a sampled subset when no PartialFC_V2 is attached.
        """
        if logits.dim() != 2:
            raise ValueError(f"logits must have shape [B, C], got {tuple(logits.shape)}")
        labels = labels.reshape(-1).long()
        alpha = None
        if self.training:
            pending, self._pending = self._pending, None
            if pending is None:
                raise RuntimeError(
                    "LEAPMarginLoss got no embeddings for this step: call loss.attach(partial_fc) once "
                    "after building PartialFC_V2 (or loss.observe(local_embeddings, local_labels) before "
                    "each forward); the angular statistics of Section 3.3 are computed from them")
            global_labels, step, std = pending
            if global_labels.shape[0] != logits.shape[0]:
                raise ValueError(f"logits have {logits.shape[0]} rows but the observed global batch has "
                                 f"{global_labels.shape[0]}")
            if std is not None:
                num_logits = logits.shape[1]
                cols = None
                if self.cloud.noise_columns(num_logits) > 1:
                    cols = self._columns(num_logits, columns, std.device)
                alpha = self.alpha(std, step, num_logits, cols, labels.to(std.device),
                                   lazy=std.device == logits.device)
                if torch.is_tensor(alpha):
                    alpha = alpha.to(logits.device)
        with torch.autocast(logits.device.type, enabled=False):
            cosine = logits.float()
            if self.interclass_filtering_threshold > 0:
                cosine = self._filter(cosine, labels)
            inplace = (self.inplace and cosine.dtype == torch.float32
                       and (not cosine.requires_grad or (not cosine.is_leaf and cosine._base is None)))
            return leap_logits(cosine, labels, alpha, margin=self.margin, scale=self.scale,
                               margin_value=self.margin_value, inplace=inplace,
                               straight_through=self.straight_through)

    def _filter(self, cosine, labels):
        """CombinedMarginLoss's inter-class filtering: zero non-target cosines above the threshold."""
        with torch.no_grad():
            dirty = cosine > self.interclass_filtering_threshold
            target = torch.zeros_like(dirty)
            target.scatter_(1, labels.clamp(min=0)[:, None], (labels >= 0)[:, None])
            keep = (~(dirty & ~target)).float()
        return cosine * keep
