"""leap_plugin.insightface.compat: each host patch fixes the failure it names, and only that.

The patches that touch arcface_torch's modules run here, in this process (the ``host_modules``
fixture drops those modules afterwards); the CPU/gloo patches change torch itself and are run by
the end-to-end test (test_train_v2.py), in the tool's own processes.
"""
import inspect
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from leap_plugin.insightface import compat
from leap_plugin.insightface.recordio import IndexedRecordReader, unpack
from leap_plugin.insightface.verification import load_bin, verification_accuracy
from torch.optim.lr_scheduler import LRScheduler

# the host's own code warns on this torch / Python (torch.cuda.amp, "is" with a literal)
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::SyntaxWarning")


def test_polynomial_lr_warmup_on_torch2(host_modules):
    import lr_scheduler
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    if not compat._polynomial_lr_on_torch2():
        pytest.skip("this torch's LRScheduler still takes verbose=: nothing to patch")
    sched = lr_scheduler.PolynomialLRWarmup(opt, warmup_iters=2, total_iters=6)
    lrs = []
    for _ in range(7):
        opt.step()
        sched.step()
        lrs.append(sched.get_last_lr()[0])
    # the host's own schedule: linear warmup over 2 steps, then linear decay to 0 at step 6
    assert lrs == pytest.approx([0.05, 0.1, 0.075, 0.05, 0.025, 0.0, 0.0])


def test_polynomial_lr_warmup_fails_unpatched(host_modules):
    if "verbose" in inspect.signature(LRScheduler.__init__).parameters:
        pytest.skip("this torch's LRScheduler still takes verbose=")
    import lr_scheduler
    with pytest.raises(TypeError, match="verbose"):
        lr_scheduler.PolynomialLRWarmup(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1), 2, 6)


def _pairs(n=60, seed=0):
    rng = np.random.default_rng(seed)
    issame = np.arange(n) % 2 == 0
    base = rng.normal(size=(n, 8))
    other = np.where(issame[:, None], base + rng.normal(scale=0.5, size=base.shape), rng.normal(size=base.shape))
    emb = np.empty((2 * n, 8))
    emb[0::2], emb[1::2] = base, other
    return emb / np.linalg.norm(emb, axis=1, keepdims=True), issame


def test_verification_survives_repeated_far(host_modules):
    compat._records_without_mxnet()  # eval/verification.py imports mxnet
    from eval import verification
    emb, issame = _pairs()
    patched = compat._val_far_with_repeated_far()
    if not patched:
        pytest.skip("this scipy accepts repeated x in interp1d: nothing to patch")
    _, _, accuracy, val, _, far = verification.evaluate(emb, issame)
    assert np.mean(accuracy) == pytest.approx(verification_accuracy(emb, issame).accuracy)
    assert 0 <= far <= 1 and 0 <= val <= 1  # VAL at FAR 1e-3 (per test fold), as the host reports it


def test_repeated_far_keeps_the_largest_threshold():
    # FAR is non-decreasing in the threshold: a run of equal FAR keeps its last (largest) threshold
    f = compat._interp1d_unique_x([0.0, 0.0, 0.0, 0.5, 0.5, 1.0], [0.0, 1.0, 2.0, 3.0, 4.0, 5.0], kind="slinear")
    assert float(f(0.0)) == 2.0 and float(f(0.25)) == pytest.approx(3.0) and float(f(1.0)) == 5.0


def test_verification_fails_unpatched(host_modules):
    compat._records_without_mxnet()
    from eval import verification
    emb, issame = _pairs()
    try:
        verification.evaluate(emb, issame)
    except ValueError as error:
        assert "duplicates" in str(error)
    else:
        pytest.skip("this scipy accepts repeated x in interp1d")


def test_mxface_dataset_reads_through_the_plugin(host_modules, tiny_face):
    try:
        import mxnet  # noqa: F401
        pytest.skip("mxnet imports here: the host's own reader runs (cross-checked with real mxnet below)")
    except Exception:
        pass
    assert compat._records_without_mxnet()
    assert "mxnet" not in sys.modules  # the placeholder is gone again
    import dataset
    from eval import verification
    with pytest.raises(ImportError, match="mxnet.ndarray: mxnet is not importable here"):
        verification.nd.transpose  # a use compat does not replace fails saying so

    ds = dataset.MXFaceDataset(root_dir=str(tiny_face), local_rank=0)  # the host's own class
    assert len(ds) == 4 * 20 + 8 * 5
    ds.transform = None  # the raw decoded image: compare with the record itself
    with IndexedRecordReader(tiny_face / "train.idx", tiny_face / "train.rec") as reader:
        for index in (0, 25, len(ds) - 1):
            header, payload = unpack(reader.read_idx(index + 1))
            image, label = ds[index]
            expect = cv2.cvtColor(cv2.imdecode(np.frombuffer(payload, np.uint8), cv2.IMREAD_COLOR),
                                  cv2.COLOR_BGR2RGB)
            np.testing.assert_array_equal(image, expect)
            assert int(label) == int(header.label)
    # DataLoader workers are forked: each reads through its own file handle, same items
    ds2 = dataset.MXFaceDataset(root_dir=str(tiny_face), local_rank=0)
    ds2.transform = ds.transform = lambda x: torch.from_numpy(np.ascontiguousarray(x))
    labels = [int(y) for _, y in torch.utils.data.DataLoader(ds2, batch_size=1, num_workers=2)]
    assert labels == [int(ds[i][1]) for i in range(len(ds))]

    data, issame = verification.load_bin(str(tiny_face / "omniglot_test.bin"), (112, 112))
    images, expect_same = load_bin(tiny_face / "omniglot_test.bin", (112, 112))
    assert issame == expect_same.tolist() and len(data) == 2
    np.testing.assert_array_equal(data[0].permute(0, 2, 3, 1).numpy(), images.astype(np.float32))
    torch.testing.assert_close(data[1], torch.flip(data[0], dims=[3]))


CROSS_CHECK = r"""
import json, sys
main_site, arcface, repo, rec = sys.argv[1:5]
sys.path.append(main_site)  # torch, torchvision, easydict: after this venv's numpy 1.23 / mxnet
sys.path[:0] = [arcface, repo]
import numpy as np, torch
from leap_plugin.insightface import compat
assert compat._records_without_mxnet() is False  # mxnet imports: the host's own code runs
import dataset, mxnet, types
assert dataset.mx is mxnet
# eval/verification.py imports scikit-learn and scipy for its metrics (not load_bin); the other
# venv's builds need numpy 2: stand-ins for the names it imports
stubs = {"sklearn": {}, "sklearn.decomposition": {"PCA": None}, "sklearn.model_selection": {"KFold": None},
         "scipy": {"interpolate": None}}
for name, attrs in stubs.items():
    sys.modules[name] = types.ModuleType(name)
    vars(sys.modules[name]).update(attrs)
from eval import verification
ds = dataset.MXFaceDataset(root_dir=rec, local_rank=0)
ds.transform = None
images = np.stack([ds[i][0] for i in range(len(ds))])
labels = [int(ds[i][1]) for i in range(len(ds))]
data, issame = verification.load_bin(rec + "/omniglot_test.bin", (112, 112))
np.savez(sys.argv[5], images=images, labels=labels, data0=data[0].numpy(), data1=data[1].numpy(),
         issame=np.asarray(issame))
print(json.dumps({"n": len(ds)}))
"""


def test_plugin_reader_equals_real_mxnet(host_modules, tiny_face, mxnet_env, tmp_path):
    """The host's MXFaceDataset and load_bin under real mxnet 1.9.1 (side venv) give what they give
    here through the plugin's reader."""
    import site
    mxnet_env.require()
    out = tmp_path / "mxnet.npz"
    mxnet_env.run_json(CROSS_CHECK, site.getsitepackages()[0], host_modules,
                       str(Path(__file__).resolve().parents[2]), tiny_face, out)
    real = np.load(out)
    compat._records_without_mxnet()
    import dataset
    from eval import verification
    ds = dataset.MXFaceDataset(root_dir=str(tiny_face), local_rank=0)
    ds.transform = None
    np.testing.assert_array_equal(np.stack([ds[i][0] for i in range(len(ds))]), real["images"])
    assert [int(ds[i][1]) for i in range(len(ds))] == real["labels"].tolist()
    data, issame = verification.load_bin(str(tiny_face / "omniglot_test.bin"), (112, 112))
    np.testing.assert_array_equal(data[0].numpy(), real["data0"])
    np.testing.assert_array_equal(data[1].numpy(), real["data1"])
    assert issame == real["issame"].tolist()
