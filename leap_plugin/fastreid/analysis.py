"""Head-vs-tail intra-class angular variance of a trained FastReID model (paper Section 1).

``analyze_run(cfg, weights, out_dir)`` builds the model from a config, loads its weights, extracts
eval-mode embeddings of the TRAINING set of cfg.DATASETS.NAMES (built exactly as FastReID /
LEAPTrainer build it, including DATASETS.LONG_TAIL for the ``*_LT`` datasets, but with the test
transforms), and measures the angle of every feature to its class centre (head classes: more than
T images). It writes OUT/analysis.json (head/tail variance with 95% CI, per-class var/count) and
OUT/angles.npz (angles, labels, is_head, features per image; class_var, class_count,
class_is_head per class), which ``leap_plugin.analysis.load_run`` reads back to plot several runs
together. ``tools/analyze.py`` is its command line.
"""
import json
import logging
import math
import os

import numpy as np
import torch

import fastreid.data.build as fastreid_build
from fastreid.config import get_cfg
from fastreid.data.common import CommDataset
from fastreid.data.datasets import DATASET_REGISTRY
from fastreid.data.transforms import build_transforms

from ..analysis import (class_angles, head_tail_summary, plot_angle_distributions, plot_tsne,
                        plot_variance_bars)
from .checkpoint import LEAPCheckpointer
from .config import add_leap_config
from .head import find_leap_head
from .trainer import LEAPTrainer, long_tail_kwargs

__all__ = ["analyze_run", "build_train_set", "extract_features", "setup"]

logger = logging.getLogger("leap_plugin.analyze")

# parameters that may legitimately not load: the classifier (another class count) and the LEAP
# statistics (created from the checkpoint itself, or absent); anything else missing is an error
_MAY_SKIP = ("heads.weight", "heads.stats.")


class _Checkpointer(LEAPCheckpointer):
    """The plugin's Checkpointer (clear errors for bad files and statistics), keeping what did not
    load so that analyze_run can refuse to measure a half-random model (FastReID only logs it)."""

    def _load_model(self, checkpoint):
        self.incompatible = super()._load_model(checkpoint)
        return self.incompatible


def build_train_set(cfg):
    """The training set of cfg.DATASETS.NAMES as LEAPTrainer builds it, with the test transforms.

    Labels are CommDataset's relabelled ids, the classes the model was trained on.
    """
    kwargs = {"combineall": cfg.DATASETS.COMBINEALL, **long_tail_kwargs(cfg, publish=False)}
    items = []
    for name in cfg.DATASETS.NAMES:
        items.extend(DATASET_REGISTRY.get(name)(root=fastreid_build._root, **kwargs).train)
    return CommDataset(items, build_transforms(cfg, is_train=False), relabel=True)


@torch.no_grad()
def extract_features(model, dataset, batch_size, num_workers=0):
    """Eval-mode embeddings (what FastReID's evaluator sees, without flip) and labels, in order."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False,
                                         num_workers=num_workers,
                                         collate_fn=fastreid_build.fast_batch_collator)
    model.eval()
    feats, labels = [], []
    for batch in loader:
        batch["images"] = batch["images"].to(model.device)
        feats.append(model(batch).float().cpu())
        labels.append(batch["targets"].cpu())
    return torch.cat(feats), torch.cat(labels)


def _load_model(cfg, weights):
    if not weights or not os.path.isfile(weights):
        raise FileNotFoundError(f"weights {weights!r} is not a file: give the model_final.pth of a "
                                f"training run (analysing an untrained model would be meaningless)")
    model = LEAPTrainer.build_model(cfg)  # FastReID's build_model; MODEL.HEADS.LEAP.RESET_STATS honoured
    checkpointer = _Checkpointer(model)
    checkpointer.load(weights)
    bad = checkpointer.incompatible
    keys = list(bad.missing_keys) + [k for k, *_ in bad.incorrect_shapes]
    missing = list(dict.fromkeys(k for k in keys if not k.startswith(_MAY_SKIP)))
    if missing:
        raise ValueError(f"{len(missing)} parameters of the model built from the config did not load "
                         f"from {weights} (config and checkpoint do not match?): {missing[:8]}")
    return model


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return None if math.isnan(x) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


def analyze_run(cfg, weights, out_dir, head_threshold=None, plots=False) -> dict:
    """Measure the angular variance of a trained model on its training set; write out_dir.

    Args:
        cfg: a FastReID config with the LEAP keys (``add_leap_config``), as used for training.
        weights: the checkpoint (``model_final.pth``), loaded with the plugin's LEAPCheckpointer.
        out_dir: gets analysis.json and angles.npz (and angles.png, variance.png, tsne.png with
            ``plots``).
        head_threshold: T; a class with more than T images is a head class. Default
            cfg.DATASETS.LONG_TAIL.TAIL_IMAGES (every class the long-tail cut shrank is tail).

    Returns the content of analysis.json (NaN as None): ``summary`` is a ``head_tail_summary``.
    """
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.BACKBONE.PRETRAIN = False  # the weights come from the checkpoint
    threshold = int(cfg.DATASETS.LONG_TAIL.TAIL_IMAGES if head_threshold is None else head_threshold)

    train_set = build_train_set(cfg)
    if cfg.MODEL.HEADS.NUM_CLASSES == 0:  # as DefaultTrainer.auto_scale_hyperparams: the classifier loads
        cfg.MODEL.HEADS.NUM_CLASSES = train_set.num_classes
    model = _load_model(cfg, weights)
    features, labels = extract_features(model, train_set, cfg.TEST.IMS_PER_BATCH,
                                        cfg.DATALOADER.NUM_WORKERS)

    angles, classes, var, count = class_angles(features, labels)
    is_head = count > threshold
    summary = head_tail_summary(var, count, is_head)
    inverse = torch.searchsorted(classes, labels)
    mean_angle = torch.zeros(classes.numel(), dtype=torch.float64).index_add_(
        0, inverse, angles.double()) / count
    result = {
        "weights": os.path.abspath(weights),
        "datasets": list(cfg.DATASETS.NAMES),
        "long_tail": {"num_head": cfg.DATASETS.LONG_TAIL.NUM_HEAD,
                      "tail_images": cfg.DATASETS.LONG_TAIL.TAIL_IMAGES, "seed": cfg.DATASETS.LONG_TAIL.SEED},
        "head": cfg.MODEL.HEADS.NAME, "cls_layer": cfg.MODEL.HEADS.CLS_LAYER,
        "head_threshold": threshold,
        "num_images": int(labels.numel()), "num_classes": int(classes.numel()),
        "units": "angles in radians, variances in rad^2",
        "summary": summary,
        "classes": {"label": classes.tolist(), "pid": [train_set.pids[c] for c in classes.tolist()],
                    "count": count.tolist(), "var": var.tolist(), "mean_angle": mean_angle.tolist(),
                    "is_head": is_head.tolist()},
    }
    leap_head = find_leap_head(model)
    if leap_head is not None and leap_head.stats is not None:
        # the head's own training-time view: angle memory to EMA centres (Eq. 3-5)
        stats = leap_head.stats
        if stats.class_counts.cpu().tolist() == count.tolist():
            result["training_memory_summary"] = head_tail_summary(stats.var.cpu(), count, is_head)
        else:
            logger.warning("the LEAP statistics in the checkpoint count other classes than this "
                           "training set: training_memory_summary left out")
    result = _jsonable(result)

    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "analysis.json"), "w") as f:
        json.dump(result, f, indent=1, allow_nan=False)
    np.savez_compressed(os.path.join(out_dir, "angles.npz"), angles=angles.numpy(), labels=labels.numpy(),
                        is_head=is_head[inverse].numpy(), features=features.numpy(),
                        class_var=var.numpy(), class_count=count.numpy(), class_is_head=is_head.numpy())
    head, tail = summary["head"], summary["tail"]
    logger.info(f"head classes (> {threshold} images): var {head['var_mean']:.4g} +- {head['var_ci']:.2g} "
                f"({head['num_classes_with_var']} classes); tail: var {tail['var_mean']:.4g} +- "
                f"{tail['var_ci']:.2g} ({tail['num_classes_with_var']} classes)")

    if plots:
        name = os.path.basename(os.path.normpath(out_dir))
        plot_angle_distributions({name: (angles, is_head[inverse])}, os.path.join(out_dir, "angles.png"))
        plot_variance_bars({name: summary}, os.path.join(out_dir, "variance.png"))
        try:
            plot_tsne(features, labels, is_head, os.path.join(out_dir, "tsne.png"))
        except ValueError as err:  # too few images for a t-SNE
            logger.warning(f"tsne.png not drawn: {err}")
    return result


def setup(config_file, opts=()):
    """get_cfg + add_leap_config + the yaml + opts, on the CPU unless opts say MODEL.DEVICE."""
    cfg = get_cfg()
    add_leap_config(cfg)
    cfg.merge_from_file(config_file)
    cfg.MODEL.DEVICE = "cpu"
    cfg.merge_from_list(list(opts))
    return cfg
