"""The ONLY place that patches fastreid 1.4.0, for Python 3.11, torch 2.x and CPU-only machines.

FastReID 1.4.0 (the last release on PyPI) was written for Python <= 3.9 and torch 1.x. Each patch
below names its upstream cause. ``apply()`` is idempotent and runs once, on
``import leap_plugin.fastreid``, before anything from fastreid is imported; on a CUDA machine the
host's GPU data pipeline (``DataLoaderX``) is left exactly as it is.
"""
import collections
import collections.abc
import importlib
import logging
import math
import sys
import types

import torch

logger = logging.getLogger(__name__)

_applied = False


def _patch_collections_abcs():
    # fastreid/data/build.py and fastreid/evaluation/testing.py do `from collections import Mapping`;
    # the ABC aliases in `collections` were removed in Python 3.10.
    for name in ("Mapping", "MutableMapping", "Sequence", "Iterable", "Container"):
        if not hasattr(collections, name):
            setattr(collections, name, getattr(collections.abc, name))


def _patch_torch_six():
    # fastreid/data/build.py does `from torch._six import string_classes`; torch._six was removed
    # in torch 2.0. Provide the three names fastreid-era code used from it.
    try:
        importlib.import_module("torch._six")
    except ImportError:
        six = types.ModuleType("torch._six")
        six.string_classes = (str, bytes)
        six.int_classes = (int,)
        six.container_abcs = collections.abc
        six.inf = math.inf
        sys.modules["torch._six"] = six
        torch._six = six


class CPUDataLoader(torch.utils.data.DataLoader):
    """DataLoaderX's signature (``local_rank`` first) on a plain DataLoader.

    fastreid's ``DataLoaderX.__init__`` creates a ``torch.cuda.Stream`` and its ``__next__`` waits
    on one: both fail without CUDA. On CPU there is nothing to prefetch to, so the plain
    DataLoader (with its worker processes) is the whole pipeline.
    """

    def __init__(self, local_rank, **kwargs):
        kwargs["pin_memory"] = False  # pinning needs an accelerator
        super().__init__(**kwargs)
        self.local_rank = local_rank


def _patch_dataloader():
    if torch.cuda.is_available():
        return
    from fastreid.data import build, data_utils

    data_utils.DataLoaderX = CPUDataLoader
    build.DataLoaderX = CPUDataLoader


def _patch_rank_evaluator():
    # ReidEvaluator.__init__ -> _compile_dependencies() runs `make` in site-packages to build the
    # Cython rank module and calls sys.exit(1) if that fails (no compiler, read-only install, or
    # the Makefile's `python3` not being the venv's). tools/bootstrap.sh compiles it at install
    # time; if it is still missing, fastreid's own pure-Python evaluate_py gives the same numbers.
    from fastreid.evaluation import reid_evaluation

    def _compile_dependencies(self):
        try:
            from fastreid.evaluation.rank_cylib.rank_cy import evaluate_cy  # noqa: F401
        except ImportError:
            logger.warning("fastreid's Cython rank module is not compiled (run tools/bootstrap.sh); "
                           "using fastreid's Python evaluator (same results, slower)")

    reid_evaluation.ReidEvaluator._compile_dependencies = _compile_dependencies


def _patch_contiguous_optimizer():
    # DefaultTrainer.build_optimizer -> fastreid.solver.build_optimizer(contiguous=True) flattens
    # the parameters into one buffer whose .grad the optimizer reads. torch >= 2.0's
    # optimizer.zero_grad() defaults to set_to_none=True: it drops that buffer's .grad while
    # backward keeps writing into the per-parameter views, so step() skips every parameter and
    # the model never trains (the loss stays flat; no error). Build the plain parameter groups.
    from fastreid.engine import defaults
    from fastreid.solver import build_optimizer

    def build_plain_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model, contiguous=False)

    defaults.DefaultTrainer.build_optimizer = classmethod(build_plain_optimizer)


def apply():
    """Apply every patch once (idempotent)."""
    global _applied
    if _applied:
        return
    _patch_collections_abcs()
    _patch_torch_six()
    _patch_dataloader()
    _patch_rank_evaluator()
    _patch_contiguous_optimizer()
    _applied = True


def rank_cython_available() -> bool:
    """Whether fastreid's compiled Cython rank module imports."""
    try:
        from fastreid.evaluation.rank_cylib.rank_cy import evaluate_cy  # noqa: F401
    except ImportError:
        return False
    return True
