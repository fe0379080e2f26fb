"""K_i, the training images per class, for the LEAP loss: from the config, a dataset or a train.rec."""
import os
from pathlib import Path

import numpy as np
import torch

__all__ = ["read_class_counts", "class_counts_from_dataset", "class_counts_from_rec"]


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
    from .ms1m import read_ms1m_identities
    from .recordio import IndexedRecordReader

    rec_dir = Path(rec_dir)
    with IndexedRecordReader(rec_dir / "train.idx", rec_dir / "train.rec") as reader:
        identities = read_ms1m_identities(reader)
    if identities and max(identities) >= num_classes:
        raise ValueError(f"{rec_dir} has identity {max(identities)} but cfg.num_classes = {num_classes}")
    counts = torch.zeros(num_classes, dtype=torch.long)
    for ordinal, keys in identities.items():
        counts[ordinal] = len(keys)
    return counts
