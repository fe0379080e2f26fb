"""Omniglot / Omniglot_LT: the identity-disjoint protocol on the real data, sources, errors."""
import os

import numpy as np
import pytest
from PIL import Image

from fastreid.data.data_utils import read_image
from fastreid.data.datasets import DATASET_REGISTRY
from leap_plugin import omniglot  # the source both hosts read (the FastReID datasets: DATASET_REGISTRY)

SHARED = os.path.normpath(omniglot.SHARED_ZIP)
needs_shared = pytest.mark.skipif(not os.path.isfile(SHARED), reason=f"no Omniglot copy at {SHARED}")


def write_omniglot_folder(root, alphabets=("Alpha", "Beta"), characters=4, drawers=20):
    """A tiny Omniglot-layout folder of real 1-bit PNGs, as in the original data."""
    rng = np.random.default_rng(0)
    for a, alphabet in enumerate(alphabets):
        for c in range(1, characters + 1):
            folder = os.path.join(root, alphabet, f"character{c:02d}")
            os.makedirs(folder, exist_ok=True)
            for d in range(1, drawers + 1):
                img = Image.fromarray(rng.random((20, 20)) > 0.5).convert("1")
                img.save(os.path.join(folder, f"{a * 100 + c:04d}_{d:02d}.png"))
    return root


@pytest.fixture(scope="module")
def shared_omniglot(tmp_path_factory):
    if not os.path.isfile(SHARED):
        pytest.skip(f"no Omniglot copy at {SHARED}")
    root = str(tmp_path_factory.mktemp("datasets"))
    os.environ.pop("OMNIGLOT_ROOT", None)
    return root, DATASET_REGISTRY.get("Omniglot")(root=root), DATASET_REGISTRY.get("OmniglotVal")(root=root)


@needs_shared
def test_protocol_is_identity_disjoint(shared_omniglot):
    _, test, val = shared_omniglot
    train_chars = {os.path.dirname(p) for p, _, _ in test.train}
    query_chars = {os.path.dirname(p) for p, _, _ in test.query}
    assert len(train_chars) == 102 and len(query_chars) == 34  # 136 characters: 3/4 train, 1/4 test
    assert not train_chars & query_chars
    assert {os.path.dirname(p) for p, _, _ in test.gallery} == query_chars
    assert len(test.query) == 34 * 5 and len(test.gallery) == 34 * 15
    for path, pid, camid in test.query + test.gallery:  # camera = drawer, so no true match is filtered
        assert camid == int(path[-6:-4]) - 1
    # validation: its query characters come from the training characters, the test ones are unused
    val_query = {os.path.dirname(p) for p, _, _ in val.query}
    val_train = {os.path.dirname(p) for p, _, _ in val.train}
    assert val_query <= train_chars and not val_query & val_train and not val_train & query_chars
    assert len(val_train) == 68
    # round-robin order: the test characters span all five alphabets
    assert len({p.split(os.sep)[-2] for p in query_chars}) == 5


@needs_shared
def test_long_tail_split_on_omniglot(shared_omniglot):
    root, test, _ = shared_omniglot
    lt = DATASET_REGISTRY.get("Omniglot_LT")(root=root, long_tail={"num_head": 20, "tail_images": 3, "seed": 7})
    counts = {}
    for _, pid, _ in lt.train:
        counts[pid] = counts.get(pid, 0) + 1
    assert sorted(counts.values(), reverse=True) == [20] * 20 + [3] * 82
    heads = sorted(pid for pid, n in counts.items() if n == 20)
    alphabets = {p.split(os.sep)[-3] for p, pid, _ in lt.train if pid in heads}
    assert len(alphabets) == 5  # the head classes are not all from one alphabet
    assert lt.query == test.query and lt.gallery == test.gallery
    assert set(lt.train) <= set(test.train)


def test_any_omniglot_folder_works_and_1bit_pngs_are_readable(tmp_path, monkeypatch):
    src = write_omniglot_folder(str(tmp_path / "src"))
    monkeypatch.setenv("OMNIGLOT_ROOT", src)
    data = DATASET_REGISTRY.get("Omniglot")(root=str(tmp_path / "datasets"))
    assert len(data.train) == 6 * 20 and len(data.query) == 2 * 5 and len(data.gallery) == 2 * 15
    with pytest.raises(TypeError, match="Cannot handle this data type"):  # why prepare() exists
        read_image(os.path.join(src, "Alpha", "character01", "0001_01.png"))
    img = read_image(data.train[0][0])
    assert img.mode == "RGB" and img.size == (20, 20)


def test_missing_source_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("OMNIGLOT_ROOT", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="OMNIGLOT_ROOT"):
        DATASET_REGISTRY.get("Omniglot")(root=str(tmp_path))
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("OMNIGLOT_ROOT", str(empty))
    with pytest.raises(FileNotFoundError, match="no Omniglot images"):
        DATASET_REGISTRY.get("Omniglot")(root=str(tmp_path))


def test_download_checks_sha256_and_says_what_to_do_offline(tmp_path, monkeypatch):
    wrong = tmp_path / "wrong.zip"
    wrong.write_bytes(b"not omniglot")
    monkeypatch.setattr(omniglot, "OMNIGLOT_URL", wrong.as_uri())
    with pytest.raises(ValueError, match="wrong sha256"):
        omniglot._download(str(tmp_path / "dl" / "x.zip"))
    assert not os.path.exists(tmp_path / "dl" / "x.zip")
    monkeypatch.setattr(omniglot, "OMNIGLOT_URL", (tmp_path / "missing.zip").as_uri())
    with pytest.raises(FileNotFoundError, match="OMNIGLOT_ROOT"):
        omniglot._download(str(tmp_path / "dl" / "x.zip"))
