"""InsightFace arcface_torch adapter.

* :class:`LEAPMarginLoss` (``loss.py``): drop-in for arcface_torch's ``CombinedMarginLoss`` with
  PartialFC_V2's ``margin_loss(logits, labels)`` contract; ``attach(partial_fc)`` feeds it the
  embeddings.
* :func:`evaluate_bin` (``verification.py``): the standard 10-fold verification accuracy on the
  ``.bin`` pair files (LFW, CFP-FP, AgeDB-30, ...), numpy/OpenCV/scikit-learn, no mxnet.

``tools/train_arcface_leap.py`` runs an unmodified arcface_torch ``train_v2.py`` with the loss
swapped in: ``host`` finds and loads arcface_torch, ``compat`` patches the host for this environment
(CPU/gloo, no mxnet, torch 2.x, scipy), ``session`` wires the loss into train_v2's names,
``schedule`` is the triangular LR, ``class_counts`` reads K_i. ``omniglot`` writes the Omniglot face
benchmark (``train.rec`` and ``.bin`` pairs). The RecordIO / long-tailed subset tools are the
submodules ``recordio`` and ``ms1m``. All of these are imported on their own, not by this package.
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
