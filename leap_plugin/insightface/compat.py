"""The ONLY place that makes arcface_torch's own ``train_v2.py`` run in this project's environment.

arcface_torch is written for CUDA machines with mxnet, an older torch and an older scipy. Each patch
below names its cause; ``apply()`` runs them once, after ``host.prepare`` (arcface_torch on sys.path)
and before ``train_v2`` is imported. arcface_torch's files are never edited or copied: a patch
rebinds a name in one of its modules (or, for a CPU-only machine, in torch), and each patch is a
no-op where its cause is absent (CUDA present, mxnet importable, torch 1.x, old scipy).
"""
import functools
import importlib
import inspect
import logging
import os
import socket
import sys
import types
from typing import List, Optional

import numpy as np
import torch

from .recordio import IndexedRecordReader, unpack

__all__ = ["apply", "single_process_env", "RecordIOBackend", "load_bin_as_host"]

logger = logging.getLogger(__name__)
_applied: Optional[List[str]] = None


# ---------------------------------------------------------------- one process, no torchrun

def single_process_env() -> None:
    """Started without torchrun, train_v2 joins a process group at ``tcp://127.0.0.1:12584``, a
    fixed port: two runs on one machine (tests, a second experiment) collide. Set torchrun's
    variables for a world of 1 on a free port instead; under torchrun nothing changes."""
    if "RANK" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))


# ---------------------------------------------------------------- no CUDA: CPU and gloo

class _CPUDistributedDataParallel(torch.nn.parallel.DistributedDataParallel):
    """train_v2 builds DDP with ``device_ids=[local_rank]``, which torch refuses for a CPU module."""

    def __init__(self, module, device_ids=None, output_device=None, **kwargs):
        super().__init__(module, **kwargs)


class _CPULoader(torch.utils.data.DataLoader):
    """``DataLoaderX``'s signature (``local_rank`` first) on a plain DataLoader: DataLoaderX makes a
    ``torch.cuda.Stream`` and copies batches to ``device=local_rank`` in a thread that calls
    ``torch.cuda.set_device``; on CPU there is nothing to copy to."""

    def __init__(self, local_rank, **kwargs):
        kwargs["pin_memory"] = False  # pinning needs an accelerator
        super().__init__(**kwargs)
        self.local_rank = local_rank


def _cpu_without_cuda() -> bool:
    """Without CUDA: the process group is gloo, not nccl (train_v2's ``init_process_group("nccl")``);
    ``torch.cuda.set_device`` is a no-op and ``.cuda()`` (backbone, PartialFC_V2 and its buffers)
    returns the CPU object; DDP drops ``device_ids``; the loader is a plain DataLoader; the sampler's
    seed is broadcast from a CPU tensor (``sync_random_seed(seed, device="cuda")``, world > 1)."""
    if torch.cuda.is_available():
        return False
    init_process_group = torch.distributed.init_process_group

    @functools.wraps(init_process_group)
    def gloo_process_group(backend=None, *args, **kwargs):
        return init_process_group("gloo" if backend == "nccl" else backend, *args, **kwargs)

    torch.distributed.init_process_group = gloo_process_group
    torch.cuda.set_device = lambda device: None
    torch.nn.Module.cuda = lambda self, device=None: self
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    torch.nn.parallel.DistributedDataParallel = _CPUDistributedDataParallel
    importlib.import_module("dataset").DataLoaderX = _CPULoader
    sampler = importlib.import_module("utils.utils_distributed_sampler")
    sampler.sync_random_seed = functools.partial(sampler.sync_random_seed, device="cpu")
    return True


# ---------------------------------------------------------------- no mxnet: the plugin's RecordIO

class _ForkSafeRecordIO:
    """``mx.recordio.MXIndexedRecordIO(idx, rec, "r")`` on the plugin's reader. DataLoader workers
    are forked: each process reopens the files (as mxnet does), so they never share a file offset."""

    def __init__(self, idx_path, uri, flag="r"):
        if flag != "r":
            raise ValueError(f"the mxnet-free RecordIO backend only reads (flag 'r'), got {flag!r}")
        self.idx_path, self.uri = idx_path, uri
        self._open()

    def _open(self):
        self._pid = os.getpid()
        self._reader = IndexedRecordReader(self.idx_path, self.uri)
        self.keys = self._reader.keys

    def read_idx(self, key) -> bytes:
        if os.getpid() != self._pid:
            self._open()
        return self._reader.read_idx(key)


class _Image:
    """``mx.image.imdecode(buf)``: decoded to RGB uint8 [H, W, 3], with ``asnumpy()``."""

    def __init__(self, array: np.ndarray):
        self.array = array

    def asnumpy(self) -> np.ndarray:
        return self.array


def _imdecode(buf) -> _Image:
    import cv2
    img = cv2.imdecode(np.frombuffer(bytes(buf), dtype=np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        raise ValueError("a train.rec record could not be decoded as an image (corrupt record?)")
    return _Image(cv2.cvtColor(img, cv2.COLOR_BGR2RGB))


#: What arcface_torch's ``MXFaceDataset`` uses of mxnet, on the plugin's byte-compatible reader.
RecordIOBackend = types.SimpleNamespace(
    recordio=types.SimpleNamespace(MXIndexedRecordIO=_ForkSafeRecordIO, unpack=unpack),
    image=types.SimpleNamespace(imdecode=_imdecode))


def load_bin_as_host(path, image_size):
    """arcface_torch's ``eval.verification.load_bin`` result without mxnet: ``([images, flipped
    images], issame_list)``, float tensors [2 * pairs, 3, H, W] of 0..255 RGB values."""
    from .verification import load_bin
    images, issame = load_bin(path, image_size)
    data = torch.from_numpy(images).permute(0, 3, 1, 2).float().contiguous()
    return [data, torch.flip(data, dims=[3])], [bool(v) for v in issame]


class _Missing:
    """A name from the placeholder ``mxnet``: using it (call or attribute) raises, saying why."""

    def __init__(self, name: str):
        self._name = name

    def _fail(self, *args, **kwargs):
        raise ImportError(f"{self._name}: mxnet is not importable here; leap_plugin.insightface.compat "
                          f"replaced arcface_torch's uses of it, this one is not covered")

    __call__ = _fail

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        self._fail()


def _placeholder_attribute(name: str) -> _Missing:
    if name.startswith("__"):  # dunder names, which tools like ``inspect`` probe, are absent
        raise AttributeError(name)
    return _Missing(f"mxnet.{name}")


def _records_without_mxnet() -> bool:
    """``dataset.py`` and ``eval/verification.py`` import mxnet at their top; mxnet 1.9.1 is not
    installed, or cannot import beside numpy >= 1.24 (``np.bool``, ``np.PZERO``). Import them with a
    placeholder ``mxnet`` (gone from sys.modules afterwards), then let ``MXFaceDataset`` read through
    ``RecordIOBackend`` and ``load_bin`` through the plugin's ``.bin`` reader. Where mxnet imports,
    the host's own code runs unchanged."""
    try:
        import mxnet  # noqa: F401
        return False
    except Exception as error:  # ImportError, or AttributeError from numpy >= 1.24
        reason = f"{type(error).__name__}: {error}"
    for name in [n for n in sys.modules if n == "mxnet" or n.startswith("mxnet.")]:
        del sys.modules[name]  # a half-imported mxnet must not be found again
    placeholder = types.ModuleType("mxnet")
    placeholder.__getattr__ = _placeholder_attribute
    sys.modules["mxnet"] = placeholder
    try:
        dataset = importlib.import_module("dataset")
        verification = importlib.import_module("eval.verification")
    finally:
        del sys.modules["mxnet"]
    dataset.mx = RecordIOBackend
    verification.load_bin = load_bin_as_host
    logger.info("mxnet not importable (%s): arcface_torch reads train.rec and .bin files through "
                "leap_plugin.insightface.recordio", reason)
    return True


# ---------------------------------------------------------------- torch 2.x, scipy >= 1.15

def _polynomial_lr_on_torch2() -> bool:
    """``PolynomialLRWarmup.__init__`` passes ``verbose=`` to torch's LRScheduler, which torch 2.x
    no longer accepts (TypeError). Give it a base that takes and drops ``verbose``."""
    from torch.optim.lr_scheduler import LRScheduler
    if "verbose" in inspect.signature(LRScheduler.__init__).parameters:
        return False
    lr_scheduler = importlib.import_module("lr_scheduler")
    host = lr_scheduler.PolynomialLRWarmup

    class AcceptsVerbose(*host.__bases__):
        def __init__(self, optimizer, last_epoch=-1, verbose=False):
            super().__init__(optimizer, last_epoch)

    host.__bases__ = (AcceptsVerbose,)
    return True


def _interp1d_unique_x(x, y, *args, **kwargs):
    """scipy's interp1d on (x, y) with repeated x values collapsed to the last (largest-threshold)
    one, as FAR is non-decreasing in the threshold."""
    from scipy import interpolate
    x, y = np.asarray(x), np.asarray(y)
    last = len(x) - 1 - np.unique(x[::-1], return_index=True)[1]
    return interpolate.interp1d(x[last], y[last], *args, **kwargs)


def _val_far_with_repeated_far() -> bool:
    """The verification callback's ``calculate_val`` interpolates the threshold at FAR 1e-3 with
    ``interp1d(far_train, thresholds, kind="slinear")``; FAR repeats over thresholds, and scipy
    >= 1.15 raises "Expect x to not have duplicates", killing training at step ``verbose``."""
    from scipy import interpolate
    try:
        interpolate.interp1d([0.0, 0.0, 1.0], [0.0, 1.0, 2.0], kind="slinear")
        return False
    except ValueError:
        pass
    verification = importlib.import_module("eval.verification")
    verification.interpolate = types.SimpleNamespace(interp1d=_interp1d_unique_x)
    return True


def apply() -> List[str]:
    """Apply the patches whose cause is present (once per process). Returns their names."""
    global _applied
    if _applied is None:
        single_process_env()
        patches = [_records_without_mxnet, _cpu_without_cuda, _polynomial_lr_on_torch2,
                   _val_far_with_repeated_far]
        _applied = [patch.__name__.lstrip("_") for patch in patches if patch()]
    return list(_applied)
