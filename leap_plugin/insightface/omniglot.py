"""Omniglot as a face-recognition benchmark in arcface_torch's formats: a ``train.rec`` and ``.bin``
verification pairs.

The characters and their roles are the FastReID Omniglot protocol (``leap_plugin.omniglot``:
round-robin order over alphabets, position % 4 == 3 test, == 2 validation). Here:

* ``split="test"``: training identities are the characters of roles 0, 1, 2; the pairs come from the
  test characters (role 3), never trained on;
* ``split="val"``: training identities are roles 0, 1; the pairs come from the validation characters
  (role 2). Choose settings here, never on the test characters.

Images: each drawing, grayscale, resized to 112 x 112 (arcface_torch's input size) and stored as an
RGB PNG. ``train.rec`` has the MS1M layout (``ms1m.write_ms1m``), one identity per character,
so ``make_longtail_rec`` cuts it to the paper's <H, T> rule like MS1M. Pairs: for every held-out
character, ``pairs_per_character`` same-character pairs of distinct drawers and as many pairs with a
drawing of another held-out character (seeded), in arcface_torch's ``.bin`` layout.
"""
import io
import pickle
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
from PIL import Image

from .ms1m import write_ms1m
from .recordio import IndexedRecordWriter

__all__ = ["IMAGE_SIZE", "make_omniglot_face"]

IMAGE_SIZE = 112
_ROLES = {"test": ((0, 1, 2), 3), "val": ((0, 1), 2)}


def _encode(path: str) -> bytes:
    with Image.open(path) as img:
        img = img.convert("L").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC).convert("RGB")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _characters(cache: Path) -> List[List[str]]:
    """Every character's drawing paths (sorted by drawer), in the protocol's round-robin order."""
    from ..omniglot import find_omniglot_source, index_characters, prepare, round_robin
    folder = prepare(find_omniglot_source(str(cache)), str(cache))
    characters = index_characters(folder)
    return [[path for path, _ in sorted(characters[key], key=lambda item: item[1])]
            for key in round_robin(characters)]


def _pairs(held_out: List[List[str]], per_character: int, seed: int) -> Tuple[List[str], List[bool]]:
    rng = np.random.default_rng(seed)
    images, issame = [], []
    for index, drawings in enumerate(held_out):
        order = rng.permutation(len(drawings))
        if 2 * per_character > len(drawings):
            raise ValueError(f"{per_character} same-character pairs need {2 * per_character} drawings, a "
                             f"character has {len(drawings)}")
        for i in range(per_character):
            images += [drawings[order[2 * i]], drawings[order[2 * i + 1]]]
            issame.append(True)
        for i in range(per_character):
            other = (index + 1 + rng.integers(len(held_out) - 1)) % len(held_out)
            images += [drawings[order[i]], held_out[other][rng.integers(len(held_out[other]))]]
            issame.append(False)
    return images, issame


def make_omniglot_face(dst, split: str = "test", pairs_per_character: int = 6, seed: int = 0) -> Dict:
    """Write ``dst/train.rec``, ``train.idx`` and ``dst/omniglot_<split>.bin``.

    Returns {"rec": dst, "bin": the .bin path, "num_classes", "num_image", "pairs"}. Reuses a
    complete earlier output (``dst/.complete``).
    """
    if split not in _ROLES:
        raise ValueError(f"split must be one of {sorted(_ROLES)}, got {split!r}")
    dst = Path(dst)
    bin_path = dst / f"omniglot_{split}.bin"
    train_roles, held_role = _ROLES[split]
    characters = _characters(dst.parent / "omniglot-cache")
    train = [c for i, c in enumerate(characters) if i % 4 in train_roles]
    held_out = [c for i, c in enumerate(characters) if i % 4 == held_role]
    info = {"rec": str(dst), "bin": str(bin_path), "num_classes": len(train),
            "num_image": sum(map(len, train)), "pairs": len(held_out) * 2 * pairs_per_character}
    if (dst / ".complete").is_file():
        return info
    dst.mkdir(parents=True, exist_ok=True)
    with IndexedRecordWriter(dst / "train.idx", dst / "train.rec") as writer:
        write_ms1m(writer, [len(c) for c in train],
                   ((float(label), _encode(path)) for label, c in enumerate(train) for path in c))
    images, issame = _pairs(held_out, pairs_per_character, seed)
    with open(bin_path, "wb") as f:
        pickle.dump(([_encode(path) for path in images], issame), f, protocol=pickle.HIGHEST_PROTOCOL)
    (dst / ".complete").write_text("")
    return info
