#!/usr/bin/env python
"""Run InsightFace arcface_torch's own, unmodified ``train_v2.py`` with the LEAP margin loss.

    torchrun --nproc_per_node=8 tools/train_arcface_leap.py \\
        --insightface-root /path/to/insightface configs/insightface/ms1m_h5k_t10k_r18_cosface_leap.py

(``--insightface-root`` is the insightface checkout or its ``recognition/arcface_torch`` folder.)

Nothing in arcface_torch is edited, and none of its modules is patched. ``train_v2.py`` is imported
as a module (so its ``main`` does not start), the host names it imported into its own globals are
rebound to thin wrappers around the originals, then its ``main`` runs with the config:

* ``get_config``: the original, remembering the config. The config file may live outside
  arcface_torch (its folder is put on the ``configs`` package path, so arcface_torch's
  ``configs/base.py`` is still merged first, as always).
* ``get_dataloader``: the original; then ``cfg.num_image = len(dataset)`` when the config leaves it
  None, and the sampler's ``set_epoch(epoch)`` (called by train_v2 at the start of every epoch,
  resume included) also tells the LEAP loss the epoch.
* ``CombinedMarginLoss``: a ``LEAPMarginLoss`` with the same margins when the config has a ``leap``
  dict (the host's own loss otherwise: baseline configs run unchanged).
* ``PartialFC_V2``: the original class; the LEAP loss is then ``attach``-ed to the module.
* ``PolynomialLRWarmup``: the original, or, with ``cfg.lr_policy = "triangular"``, torch's
  ``CyclicLR`` (the paper's triangular policy, cycles of ``cfg.lr_cycle_epochs`` epochs between
  ``cfg.lr_min`` and ``cfg.lr``).
* ``CallBackLogging``: the original, also passing the loop's epoch to the loss (the only per-step
  call that carries the epoch; it matters for DALI loaders, which have no sampler).

The LEAP statistics are buffers of the loss, which is PartialFC_V2's ``margin_softmax``: they are
in train_v2's ``checkpoint_gpu_{rank}.pt`` (set ``save_all_states``) and come back with
``resume``. See docs/insightface.md for the equivalent three-line change to train_v2.py.
"""
import argparse
import logging
import os
import sys
import weakref
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from leap_plugin.insightface import LEAPMarginLoss  # noqa: E402

LEAP_KEYS = ("version", "head_threshold", "memory_factor", "center_rate", "center_rate_weights", "start_epoch",
             "update_every", "alpha_per_logit", "target_only", "signed_alpha", "min_angles",
             "angle_reference", "center_dtype", "seed", "straight_through", "class_counts", "reset_stats")


def find_arcface_torch(root) -> Path:
    """The arcface_torch folder: ``root`` itself or ``root/recognition/arcface_torch``."""
    root = Path(root).expanduser().resolve()
    for candidate in (root, root / "recognition" / "arcface_torch"):
        if (candidate / "train_v2.py").is_file() and (candidate / "partial_fc_v2.py").is_file():
            return candidate
    raise FileNotFoundError(f"no arcface_torch (train_v2.py, partial_fc_v2.py) in {root} or "
                            f"{root / 'recognition' / 'arcface_torch'}")


def read_class_counts(value, num_classes: int) -> torch.Tensor:
    """K_i from a list/array or a file (.npy, or text with one integer per line)."""
    if isinstance(value, (str, os.PathLike)):
        path = Path(value).expanduser()
        counts = np.load(path) if path.suffix == ".npy" else np.loadtxt(path, dtype=np.int64, ndmin=1)
    else:
        counts = np.asarray(value)
    counts = torch.as_tensor(np.asarray(counts, dtype=np.int64))
    if counts.dim() != 1 or counts.numel() != num_classes:
        raise ValueError(f"class counts must have cfg.num_classes = {num_classes} entries, got shape "
                         f"{tuple(counts.shape)}")
    return counts


def class_counts_from_dataset(dataset, num_classes: int) -> torch.Tensor:
    """K_i of a dataset that lists its labels (torchvision ImageFolder: ``targets``)."""
    if not hasattr(dataset, "targets"):
        raise ValueError(f"cannot count the images per class of a {type(dataset).__name__}: set "
                         f"config.leap['class_counts'] (a list, or a .npy / text file of cfg.num_classes "
                         f"integers)")
    labels = torch.as_tensor(np.asarray(dataset.targets, dtype=np.int64))
    return torch.bincount(labels, minlength=num_classes)


def class_counts_from_rec(rec_dir, num_classes: int) -> torch.Tensor:
    """K_i of an MS1M-style ``train.rec`` / ``train.idx`` (what arcface_torch's MXFaceDataset reads
    and ``tools/make_longtail_rec.py`` writes): from its identity records, no image is read."""
    from leap_plugin.insightface.longtail import read_ms1m_identities
    from leap_plugin.insightface.recordio import IndexedRecordReader

    rec_dir = Path(rec_dir)
    with IndexedRecordReader(rec_dir / "train.idx", rec_dir / "train.rec") as reader:
        identities = read_ms1m_identities(reader)
    if identities and max(identities) >= num_classes:
        raise ValueError(f"{rec_dir} has identity {max(identities)} but cfg.num_classes = {num_classes}")
    counts = torch.zeros(num_classes, dtype=torch.long)
    for ordinal, keys in identities.items():
        counts[ordinal] = len(keys)
    return counts


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

    def build_loss(self, scale, margin_list, interclass_filtering_threshold=0.0) -> LEAPMarginLoss:
        cfg = self.cfg
        options = dict(cfg.leap)
        counts = options.pop("class_counts", None)
        rec = Path(str(cfg.get("rec") or ""))
        if counts is not None:
            counts = read_class_counts(counts, cfg.num_classes)
        elif self.dataset is not None and hasattr(self.dataset, "targets"):
            counts = class_counts_from_dataset(self.dataset, cfg.num_classes)
        elif (rec / "train.idx").is_file() and (rec / "train.rec").is_file():
            counts = class_counts_from_rec(rec, cfg.num_classes)
        else:
            raise ValueError("the LEAP loss needs the images per class K_i: set config.leap['class_counts'] "
                             "(a list, or a .npy / text file), or train from an MS1M-style train.rec or "
                             "an image folder, where they are counted")
        empty = int((counts <= 0).sum())
        if empty:
            logging.warning("LEAP: %d classes have no training image (counted as 1)", empty)
            counts = counts.clamp(min=1)
        options.setdefault("seed", int(cfg.get("seed", 0) or 0))
        loss = LEAPMarginLoss.from_margin_list(margin_list, scale, counts, cfg.embedding_size,
                                               interclass_filtering_threshold=interclass_filtering_threshold,
                                               **options)
        if loss.leap.options.start_epoch >= int(cfg.get("num_epoch") or 0) > 0:
            logging.warning("LEAP: config.leap['start_epoch'] %d >= config.num_epoch %d: the feature cloud "
                            "never switches on", loss.leap.options.start_epoch, cfg.num_epoch)
        never = loss.leap.cloud.never_on_reason(counts)
        if never:
            logging.warning("LEAP: config.leap['head_threshold']: %s", never)
        if loss.leap.options.reset_stats:
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
            def __call__(self, global_step, loss, epoch, *args, **kwargs):
                session.set_epoch(epoch)
                return super().__call__(global_step, loss, epoch, *args, **kwargs)
        return LEAPCallBackLogging

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


def triangular_scheduler(optimizer, total_iters: int, num_epoch: int, cycle_epochs: int, lr_min: float,
                         lr_max: float):
    """The triangular cyclical LR (Smith, 2017): cycles of ``cycle_epochs`` epochs, from lr_min up
    to lr_max at mid-cycle and back. Steps per epoch as train_v2 counts them
    (``total_iters // num_epoch``)."""
    steps_per_epoch = max(total_iters // num_epoch, 1)
    half = max(steps_per_epoch * cycle_epochs // 2, 1)
    return torch.optim.lr_scheduler.CyclicLR(optimizer, base_lr=lr_min, max_lr=lr_max, step_size_up=half,
                                             mode="triangular", cycle_momentum=False)


def _resolve_config(arcface: Path, config: str):
    """(the ``configs/<name>.py`` argument for train_v2, folder to put on the configs package path)."""
    path = Path(config).expanduser()
    if path.is_file():
        path = path.resolve()
        if path.stem == "base":
            raise ValueError("a config named base.py would shadow arcface_torch's configs/base.py")
        extra = None if path.parent == (arcface / "configs").resolve() else path.parent
        return f"configs/{path.stem}.py", extra
    if (arcface / "configs" / path.name).is_file():
        return f"configs/{path.name}", None
    raise FileNotFoundError(f"config {config} not found (nor {arcface / 'configs' / path.name})")


def prepare(arcface_root, config: str):
    """Put arcface_torch first on sys.path and the config's folder on its ``configs`` package path.

    Returns (arcface_torch folder, the ``configs/<name>.py`` argument its get_config expects).
    """
    import importlib

    arcface = find_arcface_torch(arcface_root)
    if str(arcface) not in sys.path:
        sys.path.insert(0, str(arcface))
    for name in ("configs", "utils"):  # a same-named module from elsewhere must not shadow theirs
        module = sys.modules.get(name)
        if module is not None and not str(getattr(module, "__file__", "") or "").startswith(str(arcface)):
            del sys.modules[name]
    config_arg, extra = _resolve_config(arcface, config)
    configs = importlib.import_module("configs")
    if extra is not None and str(extra) not in configs.__path__:
        configs.__path__.insert(0, str(extra))
    return arcface, config_arg


def load_train_v2(arcface: Path):
    """Import arcface_torch's train_v2.py as a module (not as __main__: its main() does not run).

    Its top level runs as usual: imports, ``init_process_group("nccl")``.
    """
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_v2", arcface / "train_v2.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--insightface-root", required=True,
                        help="insightface checkout, or its recognition/arcface_torch folder")
    parser.add_argument("config", help="arcface_torch-style python config (e.g. configs/insightface/...)")
    args = parser.parse_args(argv)
    arcface, config_arg = prepare(args.insightface_root, args.config)
    try:
        train_v2 = load_train_v2(arcface)
    except ImportError as error:
        raise SystemExit(f"arcface_torch's train_v2.py cannot be imported here ({error}); install its "
                         f"requirements (mxnet, ...) as in its docs/install.md") from error
    session = Session()
    session.patch(vars(train_v2))
    torch.backends.cudnn.benchmark = True  # as train_v2's own __main__ block
    train_v2.main(argparse.Namespace(config=config_arg))
    return session


if __name__ == "__main__":
    main()
