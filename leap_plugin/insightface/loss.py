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
* **alpha.** A row's softmax is split over the ranks, so its alpha must be the same on every rank:
  it is keyed by ``(seed, step, global row, global class)`` (``core.noise``), so each rank draws
  the columns it holds and the union is the single-process draw, whatever the world size, the
  class split or the ``sample_rate < 1`` sampling. A per-logit alpha is never held whole:
  ``leap_logits`` draws it block by block, in cache, where Eq. 7 / 8 use it, and the logits
  overwrite the cosines passed in (as ``CombinedMarginLoss`` does; ``inplace``), so the step holds
  one [B, C] buffer more than the host's: the saved derivative (``benchmarks/bench_face_step.py``).
* **Sampled columns.** With ``sample_rate < 1`` PartialFC_V2 stores the sampled local class
  indices in ``weight_index`` right before it calls the margin loss; the attached loss reads them
  to know the global class of each column (used by the per-logit alpha). The statistics never
  need them: they use the true labels that the pre-hook gathered.
* **Checkpoints.** The loss is PartialFC_V2's ``margin_softmax`` submodule, so the statistics
  (buffers, ``margin_softmax.stats.*``) and the step/epoch counters (extra state) are in
  ``module_partial_fc.state_dict()``,
  i.e. in train_v2's per-rank ``checkpoint_gpu_{rank}.pt``, and come back on resume.
"""
import weakref
from typing import NamedTuple, Optional

import torch
import torch.distributed as dist
from torch import nn

from ..core import LEAP, LEAPOptions, leap_logits
from ..core.integrity import load_checked
from ..core.margins import check_margin
from ..core.stats import check_class_counts

__all__ = ["LEAPMarginLoss", "FACE_DEFAULTS", "class_block"]

# the face recipe's values where they differ from the option defaults (core.options.OPTIONS):
# centres every 5 iterations (Section 4.3), angles to the centre before its update (the reading that
# matches the true variance under uniform batches, tests/core/test_stats_truth.py), 16-bit centres
# (the statistics stay below the FC weight per rank, benchmarks/bench_memory.py)
FACE_DEFAULTS = {"update_every": 5, "angle_reference": "previous_center", "center_dtype": "float16"}
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


def _world():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class Observed(NamedTuple):
    """What ``observe`` learnt of a step, for that step's ``forward``."""
    global_labels: torch.Tensor  # [B_global] class of every row of the global batch
    step: int  # the training step (keys the alpha draw)
    cloud: bool  # the cloud is on this step (epoch >= start_epoch)
    std: torch.Tensor  # [B_global] cloud std of every row (Eq. 6 / 9), the same on every rank
    reference_var: torch.Tensor  # the reference variance (Eq. 6 / 9)
    angles: Optional[torch.Tensor]  # Eq. 3 angles of the rows in this rank's block; None: no update


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
        **options: the LEAP options, by name (``core.options.OPTIONS``: version, head_threshold,
            memory_factor, start_epoch, ...; the paper's face results, Table 6 LEAP-CV / LEAP-AV,
            use version "vanilla"), with ``FACE_DEFAULTS`` where the face recipe differs.
        option_key: how the user wrote an option, for its errors (``name -> key``; e.g.
            ``config.leap['name']``); default the argument name.

    Must be constructed after ``torch.distributed`` is initialised (as PartialFC_V2); without a
    process group it is a single-process loss over all classes. ``leap`` is the core ``LEAP``
    object (options, statistics of this rank's class block, cloud, epoch, step); ``last_metrics``
    what the training log shows (``LEAP.record_metrics``), refreshed every training step.
    """

    def __init__(self, class_counts, embedding_size: int, margin: str = "arc", scale: float = 64.0,
                 margin_value: float = 0.5, seed: int = 0, straight_through: bool = False,
                 interclass_filtering_threshold: float = 0.0, inplace: bool = True, option_key=None, **options):
        super().__init__()
        check_margin(margin, scale, margin_value)
        if not 0.0 <= float(interclass_filtering_threshold) <= 1.0:
            raise ValueError(f"interclass_filtering_threshold must lie in [0, 1] (0 = off), "
                             f"got {interclass_filtering_threshold}")
        counts = check_class_counts(class_counts, "(cfg.num_classes entries: K_i of every class)")
        self.margin, self.scale, self.margin_value = margin, float(scale), float(margin_value)
        self.straight_through = bool(straight_through)
        self.inplace = bool(inplace)
        self.interclass_filtering_threshold = float(interclass_filtering_threshold)
        self.rank, self.world_size = _world()
        self.num_classes = counts.numel()
        self.class_start, self.num_local = class_block(self.num_classes, self.rank, self.world_size)
        if self.num_local == 0:
            raise ValueError(f"num_classes={self.num_classes} is smaller than the world size "
                             f"{self.world_size}: rank {self.rank} holds no class")
        self.embedding_size = int(embedding_size)
        block = counts[self.class_start: self.class_start + self.num_local]
        leap_options = LEAPOptions.from_mapping({**FACE_DEFAULTS, **options}, key=option_key or (lambda name: name))
        self.leap = LEAP(block, self.embedding_size, leap_options, sync=False, seed=seed)
        self.stats = self.leap.stats  # a submodule: margin_softmax.stats.* in train_v2's checkpoints
        self.observed = None  # Observed by observe(), consumed by forward()
        self.last_metrics = {}
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
        state.update(_partial_fc=None, _hook=None, observed=None)
        return state

    def extra_repr(self) -> str:
        return (f"margin={self.margin!r}, scale={self.scale}, margin_value={self.margin_value}, "
                f"{self.leap.options}, seed={self.leap.seed}, num_classes={self.num_classes}, class_block=["
                f"{self.class_start}, {self.class_start + self.num_local}), straight_through={self.straight_through}")

    # ------------------------------------------------------------------ epoch / step state
    def set_epoch(self, epoch: int) -> None:
        """Tell the loss the training epoch (0-based, as train_v2's loop); the cloud is on from
        ``start_epoch``."""
        self.leap.set_epoch(epoch)

    def get_extra_state(self):
        return {"step": self.leap.step, "epoch": self.leap.epoch, "num_classes": self.num_classes}

    def set_extra_state(self, state):
        if state.get("num_classes", self.num_classes) != self.num_classes:
            raise ValueError(f"checkpoint of a LEAPMarginLoss over {state['num_classes']} classes loaded "
                             f"into one over {self.num_classes} (cfg.num_classes differs)")
        self.leap.step = int(state["step"])
        self.leap.set_epoch(state["epoch"])

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # refuse statistics of other options or corrupt ones, naming the config key (core.integrity)
        load_checked(self.stats, state_dict, prefix + "stats.", self.leap.options.reset_stats, STATS_OPTIONS,
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
        step = self.leap.step
        angles = self.leap.observe(lambda: self._all_gather(local_embeddings.detach().float()), block_labels,
                                   lambda: self._weight_rows(block_labels))
        std, ref = self.leap.cloud_std(block_labels, dist.all_reduce if self.world_size > 1 else None)
        self.observed = Observed(global_labels, step, self.leap.cloud_active, std, ref, angles)

    def _weight_rows(self, block_labels):
        """W_y of every row (angle_reference 'weight'), from the attached PartialFC_V2's weight."""
        pfc = self._partial_fc() if self._partial_fc is not None else None
        if pfc is None:
            raise RuntimeError("angle_reference='weight' measures angles to PartialFC_V2's weight: "
                               "attach() the PartialFC_V2 module built with this loss")
        return pfc.weight.detach()[block_labels.clamp(min=0)].float()

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
            observed, self.observed = self.observed, None
            if observed is None:
                raise RuntimeError(
                    "LEAPMarginLoss got no embeddings for this step: call loss.attach(partial_fc) once "
                    "after building PartialFC_V2 (or loss.observe(local_embeddings, local_labels) before "
                    "each forward); the angular statistics of Section 3.3 are computed from them")
            if observed.global_labels.shape[0] != logits.shape[0]:
                raise ValueError(f"logits have {logits.shape[0]} rows but the observed global batch has "
                                 f"{observed.global_labels.shape[0]}")
            std = observed.std
            if observed.cloud:
                num_logits = logits.shape[1]
                cols = None
                if self.leap.cloud.noise_columns(num_logits) > 1:
                    cols = self._columns(num_logits, columns, std.device)
                alpha = self.leap.alpha(std, num_logits, labels.to(std.device), step=observed.step, columns=cols,
                                        lazy=std.device == logits.device)
                if torch.is_tensor(alpha):
                    alpha = alpha.to(logits.device)
            self.last_metrics = self.leap.record_metrics(observed.angles, std, alpha, observed.reference_var)
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
