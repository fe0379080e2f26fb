"""Verification accuracy on .bin pair files: real encoded images, the arcface_torch protocol."""
import io
import pickle

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from leap_plugin.insightface.verification import (THRESHOLDS, evaluate_bin, load_bin, tar_at_far,
                                                  verification_accuracy)

SIZE = 32


def _unit_pairs(sq_distances):
    """Unit 2-d embeddings [2n, 2] whose pairs have the given squared distances (d = 2 - 2 cos)."""
    rows = []
    for d in sq_distances:
        phi = np.arccos(1 - d / 2)
        rows += [[1.0, 0.0], [np.cos(phi), np.sin(phi)]]
    return np.array(rows)


def test_known_answer_perfectly_separable():
    # same pairs at squared distance 0.5, different pairs at 2.0: every fold is right, and the
    # first threshold that separates them (strictly: dist < t) is 0.51
    issame = np.array([True, False] * 10)
    emb = _unit_pairs([0.5 if s else 2.0 for s in issame])
    result = verification_accuracy(emb, issame)
    assert result.accuracy == 1.0 and result.std == 0.0
    np.testing.assert_allclose(result.best_thresholds, 0.51)


def test_known_answer_one_impostor():
    # 20 pairs, 10 folds of 2. Pair 1 (fold 0) is a different pair closer than every same pair:
    # fold 0 is trained on clean folds (t = 0.51) and gets pair 1 wrong -> 0.5; every other fold
    # still picks t = 0.51 (17/18 on its train folds) and is right -> mean 0.95, std 0.15.
    issame = np.array([True, False] * 10)
    dists = [0.5 if s else 2.0 for s in issame]
    dists[1] = 0.3
    result = verification_accuracy(_unit_pairs(dists), issame)
    np.testing.assert_allclose(result.fold_accuracies, [0.5] + [1.0] * 9)
    assert result.accuracy == pytest.approx(0.95)
    assert result.std == pytest.approx(0.15)
    np.testing.assert_allclose(result.best_thresholds, 0.51)


def test_errors_are_explicit():
    with pytest.raises(ValueError, match="2 \\* pairs"):
        verification_accuracy(np.zeros((5, 2)), [True, False])
    with pytest.raises(ValueError, match="folds"):
        verification_accuracy(np.zeros((4, 2)), [True, False])


# ---------------------------------------------------------------- a real .bin file

def _identity_images(rng, n):
    """n smooth random colour images (uint8 RGB SIZE x SIZE), one per identity."""
    out = []
    for _ in range(n):
        small = 128 + rng.uniform(-25, 25, size=(4, 4, 3)).astype(np.float32)
        out.append(cv2.resize(small, (SIZE, SIZE), interpolation=cv2.INTER_LINEAR))
    return out


def _jitter(rng, img, amount):
    return np.clip(img + rng.normal(0, amount, img.shape), 0, 255).astype(np.uint8)


def _encode_png(rgb, path):
    cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))  # a real file on disk
    return path.read_bytes()


@pytest.fixture(scope="module")
def bin_file(tmp_path_factory):
    """A .bin with 40 pairs of PNG files written by OpenCV: pickle (list of bytes, issame list)."""
    root = tmp_path_factory.mktemp("bin")
    rng = np.random.default_rng(0)
    ids = _identity_images(rng, 12)
    bins, issame, raw = [], [], []
    for pair in range(40):
        same = pair % 2 == 0
        a = int(rng.integers(12))
        b = a if same else int((a + 1 + rng.integers(11)) % 12)
        for k, ident in enumerate((a, b)):
            img = _jitter(rng, ids[ident], 90.0)
            raw.append(img)
            bins.append(_encode_png(img, root / f"{pair}_{k}.png"))
        issame.append(same)
    path = root / "pairs.bin"
    with open(path, "wb") as f:
        pickle.dump((bins, issame), f, protocol=pickle.HIGHEST_PROTOCOL)
    return path, np.stack(raw), np.array(issame)


class TinyNet(torch.nn.Module):
    """A fixed deterministic 'face model': pool to 4x4, a seeded linear map to 16-d."""

    def __init__(self):
        super().__init__()
        self.pool = torch.nn.AdaptiveAvgPool2d(4)
        self.fc = torch.nn.Linear(48, 16)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            self.fc.weight.copy_(torch.randn(16, 48, generator=g))
            self.fc.bias.copy_(torch.randn(16, generator=g))

    def forward(self, x):
        return self.fc(self.pool(x).flatten(1))


def _reference_accuracy(images_rgb, issame, model):
    """Independent re-implementation: PIL decode was done by the caller; numpy flip, per-image
    forward, explicit contiguous folds (first n % k folds one larger), explicit threshold scan."""
    def f(img):
        x = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))).double()[None]
        x = (x / 255 - 0.5) / 0.5
        return model.double()(x)[0].detach().numpy()

    emb = np.stack([f(img) + f(img[:, ::-1]) for img in images_rgb])
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    dist = ((emb[0::2] - emb[1::2]) ** 2).sum(1)
    n, k = len(issame), 10
    sizes = [n // k + (1 if i < n % k else 0) for i in range(k)]
    bounds = np.cumsum([0] + sizes)
    accs, ths = [], []
    for i in range(k):
        test = np.zeros(n, bool)
        test[bounds[i]:bounds[i + 1]] = True
        best_t, best_acc = None, -1.0
        for t in [j / 100 for j in range(400)]:
            acc = np.mean((dist[~test] < t) == issame[~test])
            if acc > best_acc + 1e-12:
                best_t, best_acc = t, acc
        ths.append(best_t)
        accs.append(np.mean((dist[test] < best_t) == issame[test]))
    return np.array(accs), np.array(ths), dist


def test_evaluate_bin_matches_independent_pipeline(bin_file):
    path, raw, issame = bin_file
    model = TinyNet()
    result = evaluate_bin(model, path, image_size=(SIZE, SIZE), batch_size=16)
    # decode the same bytes with PIL (a different decoder) for the reference
    with open(path, "rb") as f:
        bins, _ = pickle.load(f)
    pil = np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in bins])
    np.testing.assert_array_equal(pil, raw)  # PNG is lossless: the .bin holds exactly these pixels
    accs, ths, dist = _reference_accuracy(pil, issame, TinyNet())
    assert 0.5 < result.accuracy < 1.0  # a non-trivial case
    # the distances are continuous; make sure none sits on a threshold so the comparison is exact
    assert np.min(np.abs(dist[:, None] - THRESHOLDS[None, :])) > 1e-6
    np.testing.assert_allclose(result.fold_accuracies, accs)
    np.testing.assert_allclose(result.best_thresholds, ths)
    assert result.accuracy == pytest.approx(accs.mean())
    assert result.std == pytest.approx(accs.std())


def test_load_bin_rgb_order_jpeg_and_resize(tmp_path):
    # a red JPEG written by PIL at 2x the size: decoded RGB (red in channel 0), resized to SIZE
    img = np.zeros((2 * SIZE, 2 * SIZE, 3), np.uint8)
    img[..., 0] = 220
    img[..., 2] = 30
    jpg = tmp_path / "red.jpg"
    Image.fromarray(img).save(jpg, quality=95)
    png = tmp_path / "red.png"
    Image.fromarray(img[:SIZE, :SIZE]).save(png)
    path = tmp_path / "one.bin"
    with open(path, "wb") as f:
        pickle.dump(([jpg.read_bytes(), png.read_bytes()], [True]), f)
    images, issame = load_bin(path, (SIZE, SIZE))
    assert images.shape == (2, SIZE, SIZE, 3) and issame.tolist() == [True]
    assert abs(int(images[0, ..., 0].mean()) - 220) <= 3 and abs(int(images[0, ..., 2].mean()) - 30) <= 3
    np.testing.assert_array_equal(images[1], img[:SIZE, :SIZE])


def test_load_bin_rejects_bad_files(tmp_path):
    path = tmp_path / "bad.bin"
    with open(path, "wb") as f:
        pickle.dump(([b"not an image", b"x"], [True]), f)
    with pytest.raises(ValueError, match="decoded"):
        load_bin(path, (SIZE, SIZE))
    with open(path, "wb") as f:
        pickle.dump(([b"x"], [True]), f)
    with pytest.raises(ValueError, match="2 per pair"):
        load_bin(path, (SIZE, SIZE))


# ---------------------------------------------------------------- against the host's own code

MX_DECODE = r'''
import pickle, sys, numpy as np, mxnet as mx
bins, issame = pickle.load(open(sys.argv[1], "rb"))
size = int(sys.argv[2])
out = []
for b in bins:  # arcface_torch eval/verification.py load_bin, decoding part
    img = mx.image.imdecode(b)
    if img.shape[1] != size:
        img = mx.image.resize_short(img, size)
    out.append(img.asnumpy())
np.save(sys.argv[3], np.stack(out))
print("{}")
'''


def test_decoding_matches_mxnet(mxnet_env, tmp_path):
    """The pixels arcface_torch's load_bin gets from mxnet (real mxnet, its own venv)."""
    mxnet_env.require()
    rng = np.random.default_rng(1)
    bins = []
    for _ in range(4):
        img = cv2.resize(rng.uniform(0, 255, (6, 6, 3)).astype(np.float32), (SIZE, SIZE)).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=90)
        bins.append(buf.getvalue())
        buf = io.BytesIO()  # twice the size: resized (shorter side, bicubic) on load
        Image.fromarray(cv2.resize(img, (2 * SIZE, 2 * SIZE))).save(buf, format="PNG")
        bins.append(buf.getvalue())
    path = tmp_path / "mixed.bin"
    with open(path, "wb") as f:
        pickle.dump((bins, [True] * 4), f)
    mxnet_env.run_json(MX_DECODE, path, SIZE, tmp_path / "mx.npy")
    theirs = np.load(tmp_path / "mx.npy").astype(int)
    ours, _ = load_bin(path, (SIZE, SIZE))
    np.testing.assert_array_equal(ours[0::2], theirs[0::2])  # JPEG: identical RGB pixels
    assert np.abs(ours[1::2].astype(int) - theirs[1::2]).max() <= 1  # bicubic resize: rounding only


@pytest.fixture(scope="module")
def host_roc(arcface_torch):
    """arcface_torch's own accuracy code (eval/verification.py ``calculate_roc``, as its
    ``evaluate`` calls it), read from the file with the AST and run as it is; only its mxnet
    imports (used by load_bin) are left out. (Its ``evaluate`` also computes VAL@FAR with
    scipy's interp1d, which current scipy rejects on repeated FAR values: not the accuracy.)"""
    import ast

    tree = ast.parse((arcface_torch / "eval" / "verification.py").read_text())
    keep = [node for node in tree.body
            if (isinstance(node, (ast.Import, ast.ImportFrom)) and "mxnet" not in ast.dump(node))
            or (isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name in (
                "LFold", "calculate_roc", "calculate_accuracy"))]
    namespace = {}
    exec(compile(ast.Module(keep, []), "eval/verification.py", "exec"), namespace)
    return namespace["calculate_roc"]


@pytest.mark.parametrize("pairs", [40, 57])
def test_accuracy_equals_arcface_torch(host_roc, pairs):
    rng = np.random.default_rng(pairs)
    issame = rng.random(pairs) < 0.5
    base = rng.normal(size=(pairs, 16))
    same = base + rng.normal(scale=0.9, size=base.shape)
    other = np.where(issame[:, None], same, rng.normal(size=base.shape))
    emb = np.empty((2 * pairs, 16))
    emb[0::2], emb[1::2] = base, other
    # arcface_torch's test() normalises before evaluate(); verification_accuracy does it itself
    normed = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    _, _, accuracy = host_roc(np.arange(0, 4, 0.01), normed[0::2], normed[1::2], issame, nrof_folds=10)
    ours = verification_accuracy(emb, issame)
    np.testing.assert_allclose(ours.fold_accuracies, accuracy)
    assert ours.accuracy == pytest.approx(np.mean(accuracy)) and ours.std == pytest.approx(np.std(accuracy))
    assert 0.6 < ours.accuracy < 1.0


def test_tar_at_far_known_answer():
    # pairs on a circle: embedding 2i at angle 0, 2i+1 at angle a_i; squared distance 2 - 2 cos a_i
    angles = np.array([0.1, 0.2, 0.3, 1.0, 0.25, 1.5, 2.0, 2.5, 3.0, 0.15])
    issame = np.array([True, True, True, True, False, False, False, False, False, False])
    emb = np.zeros((20, 2))
    emb[0::2] = [1.0, 0.0]
    emb[1::2] = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    # different pairs sorted by distance: 0.15, 0.25, 1.5, ...: FAR 0 -> threshold at 0.15's distance
    assert tar_at_far(emb, issame, 0.0) == (0.25, 0.0)  # only angle 0.1 is closer than 0.15
    assert tar_at_far(emb, issame, 1 / 6) == (0.5, 1 / 6)  # one false accept allowed: below 0.25
    assert tar_at_far(emb, issame, 0.1) == (0.25, 0.0)  # 0.1 * 6 < 1 false accept: FAR 0
    assert tar_at_far(emb, issame, 1.0) == (1.0, 1.0)
    with pytest.raises(ValueError, match="same and different"):
        tar_at_far(emb, np.ones(10, bool), 0.1)
