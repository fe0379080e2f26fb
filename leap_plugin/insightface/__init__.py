"""InsightFace arcface_torch adapter.

* :class:`LEAPMarginLoss` (``loss.py``): drop-in for arcface_torch's ``CombinedMarginLoss`` with
  PartialFC_V2's ``margin_loss(logits, labels)`` contract; ``attach(partial_fc)`` feeds it the
  embeddings.
* :func:`evaluate_bin` (``verification.py``): the standard 10-fold verification accuracy on the
  ``.bin`` pair files (LFW, CFP-FP, AgeDB-30, ...), numpy/OpenCV/scikit-learn, no mxnet.

``tools/train_arcface_leap.py`` runs an unmodified arcface_torch ``train_v2.py`` with the loss
swapped in. The RecordIO / long-tailed subset tools are the submodules ``recordio`` and
``ms1m`` (imported on their own: they are not needed for training).
"""
from ..core.noise import keyed_normal
from .loss import LEAPMarginLoss, class_block

__all__ = ["LEAPMarginLoss", "class_block", "keyed_normal", "evaluate_bin", "load_bin",
           "verification_accuracy"]


def __getattr__(name):
    # verification pulls in OpenCV and scikit-learn: load it on first use, not on the training path
    if name in ("evaluate_bin", "load_bin", "verification_accuracy"):
        from . import verification
        return getattr(verification, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
