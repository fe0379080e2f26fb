"""The standard 10-fold face verification accuracy on InsightFace ``.bin`` pair files, on CPU.

A ``.bin`` file (LFW, CFP-FP, AgeDB-30, ... as shipped with the MS1M / Glint datasets) is a
pickle of ``(bins, issame_list)``: ``bins`` the encoded images (JPEG/PNG bytes), 2 per pair,
``issame_list`` one bool per pair. The protocol is arcface_torch's ``eval/verification.py``:

* images decoded to RGB; resized (shorter side, bicubic) when their width is not the input size;
* embedding = model(image) + model(horizontally flipped image), then l2-normalised; the input is
  ``(pixel / 255 - 0.5) / 0.5`` in CHW RGB;
* distance = squared Euclidean distance of the two normalised embeddings of a pair;
* 10 folds (scikit-learn ``KFold``, no shuffle); in each fold the threshold in
  ``0, 0.01, ..., 3.99`` with the best accuracy on the other 9 folds (first one on ties) is applied
  to the fold (a pair is "same" when its distance is strictly below it);
* reported: mean and std of the 10 fold accuracies (arcface_torch's "Accuracy-Flip").

Only numpy, OpenCV and scikit-learn: no mxnet.
"""
import pickle
from typing import NamedTuple, Sequence, Tuple

import cv2
import numpy as np
import torch
from sklearn.model_selection import KFold

__all__ = ["evaluate_bin", "load_bin", "verification_accuracy", "tar_at_far", "embed", "VerificationResult",
           "THRESHOLDS"]

THRESHOLDS = np.arange(0, 4, 0.01)


class VerificationResult(NamedTuple):
    accuracy: float  # mean of the fold accuracies
    std: float  # std of the fold accuracies (numpy's, ddof=0, as arcface_torch)
    fold_accuracies: np.ndarray  # [folds]
    best_thresholds: np.ndarray  # [folds] the threshold chosen on the other folds


def _decode(data, image_size: Tuple[int, int]) -> np.ndarray:
    """Encoded image -> uint8 RGB [H, W, 3], resized like ``mx.image.resize_short`` if needed."""
    buf = np.frombuffer(bytes(data), dtype=np.uint8) if not isinstance(data, np.ndarray) else data
    img = cv2.imdecode(buf.reshape(-1), cv2.IMREAD_COLOR)
    if img is None:
        raise ValueError("a .bin entry could not be decoded as an image")
    img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    if img.shape[1] != image_size[0]:  # arcface_torch's test (width against image_size[0])
        height, width = img.shape[:2]
        short = image_size[0]
        if height < width:
            new = (int(round(width * short / height)), short)
        else:
            new = (short, int(round(height * short / width)))
        img = cv2.resize(img, new, interpolation=cv2.INTER_CUBIC)
    if img.shape[:2] != tuple(image_size):
        raise ValueError(f"image of shape {img.shape[:2]} after resizing, expected {tuple(image_size)}")
    return img


def load_bin(path, image_size=(112, 112)):
    """Read a ``.bin`` pair file.

    Returns:
        (images, issame): uint8 RGB images [2 * pairs, H, W, 3] (pair i = rows 2i, 2i+1) and a bool
        array [pairs].
    """
    with open(path, "rb") as f:
        try:
            bins, issame = pickle.load(f)
        except UnicodeDecodeError:  # written by Python 2
            f.seek(0)
            bins, issame = pickle.load(f, encoding="bytes")
    issame = np.asarray(issame, dtype=bool)
    if len(bins) != 2 * len(issame):
        raise ValueError(f"{path}: {len(bins)} images for {len(issame)} pairs (need 2 per pair)")
    images = np.stack([_decode(b, image_size) for b in bins]) if len(bins) else \
        np.zeros((0, image_size[0], image_size[1], 3), np.uint8)
    return images, issame


@torch.no_grad()
def embed(model: torch.nn.Module, images: np.ndarray, batch_size: int = 64, device="cpu") -> np.ndarray:
    """Flip-augmented embeddings: model(x) + model(flip(x)) for uint8 RGB images [N, H, W, 3].

    Returns float64 [N, D], not normalised.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    was_training = model.training
    model.eval()
    out = []
    try:
        for start in range(0, len(images), batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(images[start: start + batch_size]))
            x = batch.permute(0, 3, 1, 2).float().to(device)
            x = (x / 255 - 0.5) / 0.5
            feats = model(x).float() + model(torch.flip(x, dims=[3])).float()
            out.append(feats.cpu().double().numpy())
    finally:
        model.train(was_training)
    return np.concatenate(out) if out else np.zeros((0, 0))


def _accuracy(threshold: float, dist: np.ndarray, issame: np.ndarray) -> float:
    predict = dist < threshold
    return float(np.sum(predict == issame)) / dist.size


def verification_accuracy(embeddings: np.ndarray, issame: Sequence[bool], folds: int = 10,
                          thresholds: np.ndarray = THRESHOLDS) -> VerificationResult:
    """The k-fold verification accuracy of pair embeddings (rows 2i, 2i+1 are pair i).

    Args:
        embeddings: [2 * pairs, D]; l2-normalised here.
        issame: [pairs] bools.
        folds: number of folds (10 in the standard protocol).
        thresholds: candidate thresholds on the squared distance.
    """
    embeddings = np.asarray(embeddings, dtype=np.float64)
    issame = np.asarray(issame, dtype=bool)
    if embeddings.ndim != 2 or embeddings.shape[0] != 2 * issame.shape[0]:
        raise ValueError(f"embeddings must have shape [2 * pairs, D] = [{2 * issame.shape[0]}, D], "
                         f"got {embeddings.shape}")
    if issame.shape[0] < folds:
        raise ValueError(f"{issame.shape[0]} pairs cannot be split into {folds} folds")
    norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
    normed = embeddings / np.maximum(norms, 1e-12)  # sklearn.preprocessing.normalize
    dist = np.sum(np.square(normed[0::2] - normed[1::2]), axis=1)
    accuracies = np.zeros(folds)
    best = np.zeros(folds)
    indices = np.arange(issame.shape[0])
    for fold, (train, test) in enumerate(KFold(n_splits=folds, shuffle=False).split(indices)):
        train_acc = np.array([_accuracy(t, dist[train], issame[train]) for t in thresholds])
        best[fold] = thresholds[int(np.argmax(train_acc))]
        accuracies[fold] = _accuracy(best[fold], dist[test], issame[test])
    return VerificationResult(float(np.mean(accuracies)), float(np.std(accuracies)), accuracies, best)


def tar_at_far(embeddings: np.ndarray, issame: Sequence[bool], far: float) -> Tuple[float, float]:
    """TAR at a FAR: the share of same pairs accepted at the largest threshold that accepts at most a
    fraction ``far`` of the different pairs (a pair is accepted when its squared distance of the
    l2-normalised embeddings is strictly below the threshold; all pairs, no folds).

    Returns (TAR, the FAR reached). With N different pairs the FAR moves in steps of 1 / N: a ``far``
    below 1 / N is met at FAR 0.
    """
    issame = np.asarray(issame, dtype=bool)
    embeddings = np.asarray(embeddings, dtype=np.float64)
    if embeddings.shape[0] != 2 * issame.shape[0] or issame.all() or not issame.any():
        raise ValueError(f"need [2 * pairs, D] embeddings and both same and different pairs, got "
                         f"{embeddings.shape} for {issame.sum()} same / {(~issame).sum()} different pairs")
    normed = embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
    dist = np.sum(np.square(normed[0::2] - normed[1::2]), axis=1)
    negatives = np.sort(dist[~issame])
    allowed = int(np.floor(far * negatives.size + 1e-9))  # false accepts allowed
    threshold = negatives[allowed] if allowed < negatives.size else np.inf
    return float(np.mean(dist[issame] < threshold)), float(np.mean(negatives < threshold))


def evaluate_bin(model: torch.nn.Module, bin_path, image_size=(112, 112), batch_size: int = 64,
                 folds: int = 10, device="cpu") -> VerificationResult:
    """10-fold verification accuracy of ``model`` on a ``.bin`` pair file (flip-augmented).

    Args:
        model: maps a float batch [N, 3, H, W] in [-1, 1] (RGB) to embeddings [N, D].
        bin_path: the ``.bin`` file (e.g. ``lfw.bin`` next to ``train.rec``).
        image_size: (H, W) the model expects.
        batch_size: images per forward pass.
        folds: number of folds (10: the standard protocol).
        device: where the model runs.

    Returns:
        VerificationResult(accuracy, std, fold_accuracies, best_thresholds).
    """
    images, issame = load_bin(bin_path, image_size)
    embeddings = embed(model, images, batch_size=batch_size, device=device)
    return verification_accuracy(embeddings, issame, folds=folds)
