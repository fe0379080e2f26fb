"""The LEAP wiring of one arcface_torch ``train_v2`` run: wrappers for the host names it imports.

``Session.patch(vars(train_v2))`` rebinds, in train_v2's module globals only, the names it imported:

* ``get_config``: the original, remembering the config and checking its LEAP keys. The config file
  may live outside arcface_torch (``host.prepare`` puts its folder on the ``configs`` package path,
  so arcface_torch's ``configs/base.py`` is still merged first, as always).
* ``get_dataloader``: the original; then ``cfg.num_image = len(dataset)`` when the config leaves it
  None, and the sampler's ``set_epoch(epoch)`` (called by train_v2 at the start of every epoch,
  resume included) also tells the LEAP loss the epoch.
* ``CombinedMarginLoss``: a ``LEAPMarginLoss`` with the same margins when the config has a ``leap``
  dict (the host's own loss otherwise: baseline configs run unchanged).
* ``PartialFC_V2``: the original class; the LEAP loss is then ``attach``-ed to the module.
* ``PolynomialLRWarmup``: the original, or, with ``cfg.lr_policy = "triangular"``, the paper's
  triangular policy (``schedule.py``).
* ``CallBackLogging``: the original, also passing the loop's epoch to the loss (the only per-step
  call that carries the epoch; it matters for DALI loaders, which have no sampler), and writing the
  LEAP statistics (``loss.last_metrics``) to the log and the tensorboard writer at its ``frequent``.
"""
import logging
import weakref

from .class_counts import class_counts_from_dataset, class_counts_from_rec, read_class_counts
from ..core.options import OPTIONS
from .loss import LEAPMarginLoss
from .schedule import triangular_scheduler

__all__ = ["LEAP_KEYS", "Session"]

# config.leap: the LEAP options (one list, core.options) and the face loss's own arguments
FACE_ONLY_KEYS = ("seed", "straight_through", "class_counts")
LEAP_KEYS = tuple(option.name for option in OPTIONS) + FACE_ONLY_KEYS


class Session:
    """Wrappers for the host names train_v2 imported (see ``patch``), and what they learn."""

    def __init__(self):
        self.cfg = None
        self.dataset = None
        self.losses = []  # weakrefs to the LEAP losses built

    # -- utils.utils_config.get_config
    def wrap_get_config(self, get_config):
        def leap_get_config(config_file):
            cfg = get_config(config_file)
            leap = cfg.get("leap")
            if leap is not None:
                unknown = sorted(set(leap) - set(LEAP_KEYS))
                if unknown:
                    raise ValueError(f"config.leap has unknown keys {unknown}; known: {list(LEAP_KEYS)}")
            policy = cfg.get("lr_policy", "poly")
            if policy not in ("poly", "triangular"):
                raise ValueError(f"config.lr_policy must be 'poly' (arcface_torch's PolynomialLRWarmup) or "
                                 f"'triangular', got {policy!r}")
            if policy == "triangular":
                missing = [key for key in ("lr_min", "lr_cycle_epochs") if cfg.get(key) is None]
                if missing:
                    raise ValueError(f"config.lr_policy = 'triangular' needs "
                                     f"config.{' and config.'.join(missing)}")
            self.cfg = cfg
            return cfg
        return leap_get_config

    # -- dataset.get_dataloader
    def wrap_get_dataloader(self, get_dataloader):
        def leap_get_dataloader(*args, **kwargs):
            loader = get_dataloader(*args, **kwargs)
            self.dataset = getattr(loader, "dataset", None)
            if self.cfg is not None and self.cfg.get("num_image") is None:
                if self.dataset is None:
                    raise ValueError("config.num_image is None and the loader (DALI?) has no dataset to "
                                     "count: set config.num_image")
                self.cfg.num_image = len(self.dataset)
                logging.info("LEAP: num_image = %d (counted from the dataset)", self.cfg.num_image)
            sampler = getattr(loader, "sampler", None)
            if sampler is not None and hasattr(sampler, "set_epoch"):
                original = sampler.set_epoch

                def set_epoch(epoch):
                    original(epoch)
                    self.set_epoch(epoch)
                sampler.set_epoch = set_epoch
            return loader
        return leap_get_dataloader

    # -- losses.CombinedMarginLoss
    def wrap_margin_loss(self, combined_margin_loss):
        def leap_margin_loss(s, m1, m2, m3, interclass_filtering_threshold=0):
            leap = None if self.cfg is None else self.cfg.get("leap")
            if leap is None:
                return combined_margin_loss(s, m1, m2, m3, interclass_filtering_threshold)
            loss = self.build_loss(s, (m1, m2, m3), interclass_filtering_threshold)
            logging.info("LEAP: %s", loss)
            return loss
        return leap_margin_loss

    def _class_counts(self):
        cfg = self.cfg
        counts = cfg.leap.get("class_counts")
        rec = cfg.get("rec") or ""
        if counts is not None:
            return read_class_counts(counts, cfg.num_classes)
        if self.dataset is not None and hasattr(self.dataset, "targets"):
            return class_counts_from_dataset(self.dataset, cfg.num_classes)
        if rec:
            try:
                return class_counts_from_rec(rec, cfg.num_classes)
            except FileNotFoundError:
                pass
        raise ValueError("the LEAP loss needs the images per class K_i: set config.leap['class_counts'] "
                         "(a list, or a .npy / text file), or train from an MS1M-style train.rec or "
                         f"an image folder, where they are counted (config.rec = {rec!r})")

    def build_loss(self, scale, margin_list, interclass_filtering_threshold=0.0) -> LEAPMarginLoss:
        cfg = self.cfg
        counts = self._class_counts()
        options = {k: v for k, v in cfg.leap.items() if k != "class_counts"}
        empty = int((counts <= 0).sum())
        if empty:
            logging.warning("LEAP: %d classes have no training image (counted as 1)", empty)
            counts = counts.clamp(min=1)
        options.setdefault("seed", int(cfg.get("seed", 0) or 0))
        loss = LEAPMarginLoss.from_margin_list(margin_list, scale, counts, cfg.embedding_size,
                                               interclass_filtering_threshold=interclass_filtering_threshold,
                                               option_key=lambda name: f"config.leap[{name!r}]", **options)
        leap = loss.leap.options
        if leap.start_epoch >= int(cfg.get("num_epoch") or 0) > 0:
            logging.warning("LEAP: config.leap['start_epoch'] %d >= config.num_epoch %d: the feature cloud "
                            "never switches on", leap.start_epoch, cfg.num_epoch)
        never = loss.leap.cloud.never_on_reason(counts)
        if never:
            logging.warning("LEAP: config.leap['head_threshold']: %s", never)
        if leap.reset_stats:
            logging.warning("LEAP: config.leap['reset_stats']: the angular statistics start afresh")
        self.losses.append(weakref.ref(loss))
        return loss

    # -- partial_fc_v2.PartialFC_V2
    def wrap_partial_fc(self, partial_fc_cls):
        def leap_partial_fc(margin_loss, *args, **kwargs):
            module = partial_fc_cls(margin_loss, *args, **kwargs)
            if isinstance(margin_loss, LEAPMarginLoss):
                margin_loss.attach(module)
            return module
        return leap_partial_fc

    # -- lr_scheduler.PolynomialLRWarmup
    def wrap_scheduler(self, polynomial):
        def leap_scheduler(optimizer, warmup_iters, total_iters=5, *args, **kwargs):
            cfg = self.cfg
            if cfg is None or cfg.get("lr_policy", "poly") == "poly":
                return polynomial(optimizer, warmup_iters, total_iters, *args, **kwargs)
            return triangular_scheduler(optimizer, total_iters, cfg.num_epoch, cfg.lr_cycle_epochs,
                                        cfg.lr_min, cfg.lr)
        return leap_scheduler

    # -- utils.utils_callbacks.CallBackLogging
    def wrap_logging_callback(self, callback_cls):
        session = self

        class LEAPCallBackLogging(callback_cls):
            """The host's logging callback; at its ``frequent`` (rank 0) also the LEAP statistics."""

            def __call__(self, global_step, loss, epoch, *args, **kwargs):
                session.set_epoch(epoch)
                result = super().__call__(global_step, loss, epoch, *args, **kwargs)
                if self.rank == 0 and global_step > 0 and global_step % self.frequent == 0:
                    session.log_metrics(global_step, getattr(self, "writer", None))
                return result
        return LEAPCallBackLogging

    def metrics(self) -> dict:
        """The LEAP losses' statistics of the last step (``last_metrics``), as floats."""
        out = {}
        for loss in filter(None, (ref() for ref in self.losses)):
            out.update({key: float(value) for key, value in getattr(loss, "last_metrics", {}).items()})
        return out

    def log_metrics(self, global_step: int, writer=None) -> dict:
        """One ``LEAP ...`` line in the host's log, and each statistic as a tensorboard scalar."""
        metrics = self.metrics()
        if metrics:
            text = "   ".join(f"{key.split('/')[-1]} {value:.4g}" for key, value in sorted(metrics.items()))
            logging.info("LEAP: %s   Global Step: %d", text, global_step)
            if writer is not None:
                for key, value in metrics.items():
                    writer.add_scalar(key, value, global_step)
        return metrics

    def patch(self, namespace: dict) -> list:
        """Rebind, in ``namespace`` (train_v2's globals), the host names it imported to the
        wrappers. The hosts' modules themselves are untouched (PartialFC_V2's ``__init__`` looks
        its own class up by name). Returns the names rebound."""
        wraps = {"get_config": self.wrap_get_config, "get_dataloader": self.wrap_get_dataloader,
                 "CombinedMarginLoss": self.wrap_margin_loss, "PartialFC_V2": self.wrap_partial_fc,
                 "PolynomialLRWarmup": self.wrap_scheduler, "CallBackLogging": self.wrap_logging_callback}
        missing = [name for name in ("get_config", "CombinedMarginLoss", "PartialFC_V2")
                   if name not in namespace]
        if missing:
            raise RuntimeError(f"train_v2 no longer imports {missing}: this arcface_torch version is not "
                               f"supported")
        rebound = []
        for name, wrap in wraps.items():
            if name in namespace:
                namespace[name] = wrap(namespace[name])
                rebound.append(name)
        return rebound

    def set_epoch(self, epoch: int) -> None:
        for ref in self.losses:
            loss = ref()
            if loss is not None:
                loss.set_epoch(epoch)
