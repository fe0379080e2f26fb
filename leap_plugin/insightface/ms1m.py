"""Long-tailed subsets of an MS1M-style ``train.rec`` / ``train.idx`` (paper Section 4.1).

The MS1M layout (insightface's ``faces_emore``, ``ms1m-retinaface-t1``, ...), keys of the ``.idx``:

* key 0: a header record, ``flag > 0``, ``label = [first identity key, end identity key)``;
* keys 1 .. first-1: image records, ``label`` = the identity's id (a number, or an array whose
  first value is the id), payload = the encoded image;
* keys first .. end-1: one identity record per identity, ``label = [first image key, end)``:
  an identity's images have consecutive keys.

arcface_torch's ``MXFaceDataset`` reads record 0 and, as its flag is > 0, trains on the keys
``range(1, int(label[0]))``; DALI's MXNet reader walks the ``.idx``. ``make_longtail_rec`` writes
the subset in the same layout, so both read it unchanged: identities relabelled 0..N-1 (in the
source's identity order), their kept images, then the identity records.

Which identities and images are kept is ``leap_plugin.core.longtail.longtail_split``: rank the
identities by image count, keep the top H whole, the next T with S random images each (seeded).
The paper's face subsets: ``PAPER_SUBSETS``.
"""
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, Optional, Sequence, Tuple, Union

import numpy as np
from tqdm import tqdm

from ..core.longtail import longtail_split
from .recordio import IndexedRecordReader, IndexedRecordWriter, IRHeader, pack, unpack

__all__ = ["PAPER_SUBSETS", "LongtailSummary", "read_ms1m_identities", "write_ms1m",
           "make_longtail_rec"]

#: The paper's long-tailed MS1M subsets: name -> (H, T); S = 5 images per tail identity.
PAPER_SUBSETS = {
    "H5K_T10K": (5000, 10000),
    "H5K_T20K": (5000, 20000),
    "H3K_T10K": (3000, 10000),
    "H3K_T20K": (3000, 20000),
}

REC, IDX = "train.rec", "train.idx"
_MAX_KEY = 2 ** 24  # float32 labels hold every integer up to here
Label = Union[float, Sequence[float], np.ndarray]


@dataclass(frozen=True)
class LongtailSummary:
    """What ``make_longtail_rec`` wrote. ``num_classes`` / ``num_image`` go into the config."""

    num_classes: int
    num_image: int
    num_head: int
    num_tail: int
    tail_images: int
    seed: int
    source_classes: int
    source_images: int

    def config_lines(self) -> str:
        """The two arcface_torch config lines for the new ``train.rec``."""
        return f"config.num_classes = {self.num_classes}\nconfig.num_image = {self.num_image}"


def _first_label(label) -> float:
    return float(label) if np.ndim(label) == 0 else float(np.asarray(label).reshape(-1)[0])


def _range_label(reader: IndexedRecordReader, key: int, what: str) -> Tuple[int, int]:
    """The [start, end) label of a header or identity record."""
    if key not in reader:
        raise ValueError(f"{reader.idx_path} has no key {key}, the {what}: this is not an "
                         f"MS1M-style train.idx (record 0 header, images, identity records)")
    header, _ = unpack(reader.read_idx(key))
    if header.flag < 2:
        raise ValueError(f"{reader.path}: the {what} (key {key}, byte {reader.idx[key]}) has "
                         f"flag={header.flag}, label={header.label!r}; an MS1M-style header or "
                         f"identity record has flag >= 2 and label [start, end)")
    start, end = (int(v) for v in header.label[:2])
    return start, end


def read_ms1m_identities(reader: IndexedRecordReader) -> Dict[int, range]:
    """{identity ordinal: its image keys} from the header and identity records (no image read).

    Identities with no image are left out.
    """
    first, end = _range_label(reader, 0, "header record")
    if not 1 <= first <= end:
        raise ValueError(f"{reader.path}: record 0 says the identity records are keys "
                         f"[{first}, {end}); expected 1 <= first <= end")
    identities = {}
    for ordinal, key in enumerate(range(first, end)):
        start, stop = _range_label(reader, key, f"identity record {ordinal}")
        if not 1 <= start <= stop <= first:
            raise ValueError(f"{reader.path}: identity record key {key} (byte {reader.idx[key]}) "
                             f"has image keys [{start}, {stop}), outside the image keys "
                             f"[1, {first}) given by record 0")
        if stop > start:
            identities[ordinal] = range(start, stop)
    return identities


def write_ms1m(writer: IndexedRecordWriter, class_sizes: Sequence[int],
               images: Iterable[Tuple[Label, bytes]], progress=None) -> int:
    """Write the MS1M layout: record 0, the images, the identity records. Returns #images.

    ``class_sizes[c]`` is the number of images of class c; ``images`` yields ``(label, encoded
    image)`` class by class (class 0's images first), where label (or its first value) is c.
    ``progress``: an optional tqdm-like object, ``update(1)`` per image.
    """
    num_image = int(sum(class_sizes))
    first_identity = num_image + 1
    if first_identity + len(class_sizes) > _MAX_KEY:
        raise ValueError(f"{num_image} images + {len(class_sizes)} identities: the MS1M layout "
                         f"stores record keys as float32 labels, exact only up to {_MAX_KEY}")
    writer.write_idx(0, pack(IRHeader(0, [first_identity, first_identity + len(class_sizes)], 0, 0),
                             b""))
    bounds = np.concatenate([[1], 1 + np.cumsum(class_sizes, dtype=np.int64)])
    key = 1
    for label, payload in images:
        if key > num_image:
            raise ValueError(f"more images than the {num_image} announced by class_sizes")
        cls = int(np.searchsorted(bounds, key, side="right")) - 1
        if _first_label(label) != cls:
            raise ValueError(f"image key {key} has label {label!r}, but class_sizes puts class "
                             f"{cls} there: yield the images class by class")
        writer.write_idx(key, pack(IRHeader(0, label, key, 0), payload))
        key += 1
        if progress is not None:
            progress.update(1)
    if key != first_identity:
        raise ValueError(f"got {key - 1} images, class_sizes announced {num_image}")
    for cls in range(len(class_sizes)):
        writer.write_idx(first_identity + cls,
                         pack(IRHeader(0, [bounds[cls], bounds[cls + 1]], first_identity + cls, 0),
                              b""))
    return num_image


def _relabel(label, new_id: int) -> Label:
    if np.ndim(label) == 0:
        return float(new_id)
    label = np.array(label, dtype=np.float32)
    label.reshape(-1)[0] = new_id
    return label


_IMAGE_MAGIC = {b"\xff\xd8\xff": (b"\xff\xd9", "JPEG"), b"\x89PNG\r\n\x1a\n": (b"IEND", "PNG")}


def _check_image(reader, key: int, ordinal: int, payload: bytes) -> None:
    """Refuse a payload that is not a whole JPEG / PNG (garbage or cut short): it would be copied."""
    for magic, (end, _) in _IMAGE_MAGIC.items():
        if payload.startswith(magic) and end in payload[-16:]:
            return
    raise ValueError(f"{reader.path}: image key {key} (byte {reader.idx[key]}) of identity record {ordinal} "
                     f"is not a complete JPEG or PNG ({len(payload)} bytes, starting {payload[:4].hex()}): "
                     f"corrupt train.rec; re-copy it from its source")


def _kept_images(reader, kept: Dict[int, list]):
    """(new label, image bytes) of the kept images, identity by identity, streamed."""
    for new_id, ordinal in enumerate(sorted(kept)):
        source_label = None
        for key in kept[ordinal]:
            if key not in reader:
                raise ValueError(f"{reader.idx_path} has no line for image key {key} of identity record "
                                 f"{ordinal}: the .idx is incomplete or not the index of {reader.path}")
            header, payload = unpack(reader.read_idx(key))
            _check_image(reader, key, ordinal, payload)
            label = _first_label(header.label)
            if source_label is None:
                source_label = label
            elif label != source_label:
                raise ValueError(f"{reader.path}: image key {key} (byte {reader.idx[key]}) has "
                                 f"label {label:g} but belongs to identity record {ordinal}, whose "
                                 f"other images have label {source_label:g}: corrupt train.rec")
            yield _relabel(header.label, new_id), payload


def _read_property(src: Path) -> Optional[list]:
    """The fields of ``src/property`` (``num_classes,height,width``), None without one."""
    prop = src / "property"
    if not prop.is_file():
        return None
    text = prop.read_text(errors="replace").strip()
    fields = text.split(",")
    if len(fields) != 3 or not all(f.strip().isdigit() for f in fields):
        raise ValueError(f"{prop} holds {text[:60]!r}: expected 'num_classes,height,width' "
                         f"(e.g. 85742,112,112); fix or delete it")
    return [f.strip() for f in fields]


def _link_side_files(src: Path, dst: Path, num_classes: int, prop: Optional[list]) -> None:
    """Symlink the verification sets (``*.bin``; arcface_torch looks for them beside train.rec)
    and write ``property`` with the new class count when the source has one."""
    for bin_file in sorted(src.glob("*.bin")):
        link = dst / bin_file.name
        if link.is_symlink():
            link.unlink()
        if not link.exists():
            link.symlink_to(bin_file.resolve())
    if prop is not None:
        (dst / "property").write_text(",".join([str(num_classes)] + prop[1:]) + "\n")


def make_longtail_rec(src: Union[str, os.PathLike], dst: Union[str, os.PathLike], num_head: int,
                      num_tail: Optional[int] = None, tail_images: int = 5, seed: int = 0,
                      force: bool = False, progress: bool = True) -> LongtailSummary:
    """Write the <H, T> long-tailed subset of ``src/train.rec`` to ``dst/train.rec``.

    Args:
        src, dst: folders holding (src) / to hold (dst) ``train.rec`` and ``train.idx``.
        num_head: H, identities kept whole (the largest ones).
        num_tail: T, the identities after the head that become tail identities (None: all).
        tail_images: S, images kept per tail identity.
        seed: the split's seed (same seed, same subset, on any machine).
        force: replace an existing ``dst/train.rec`` / ``train.idx``.
        progress: show a tqdm progress bar while copying images.

    Streams: reads the ``.idx``, the header and identity records, and then the kept images one
    by one. The new files are written under temporary names and renamed at the end, so a failed
    run never leaves a ``train.rec`` behind. ``*.bin`` verification sets are symlinked into dst.
    """
    src, dst = Path(src), Path(dst)
    for name in (REC, IDX):
        if not (src / name).is_file():
            raise FileNotFoundError(f"{src / name} not found: --src must be an MS1M-style folder "
                                    f"with train.rec and train.idx")
    if dst.resolve() == src.resolve():
        raise ValueError(f"--dst {dst} is the source folder: choose another folder")
    existing = [str(dst / n) for n in (REC, IDX) if (dst / n).exists()]
    if existing and not force:
        raise FileExistsError(f"{' and '.join(existing)} already exist: pass --force "
                              f"(force=True) to overwrite them")
    prop = _read_property(src)
    dst.mkdir(parents=True, exist_ok=True)

    with IndexedRecordReader(src / IDX, src / REC) as reader:
        identities = read_ms1m_identities(reader)
        kept = longtail_split(identities, num_head=num_head, tail_images=tail_images, seed=seed,
                              num_tail=num_tail)
        order = sorted(kept)
        sizes = [len(kept[ordinal]) for ordinal in order]
        tmp_rec, tmp_idx = dst / (REC + ".partial"), dst / (IDX + ".partial")
        try:
            with IndexedRecordWriter(tmp_idx, tmp_rec) as writer, \
                    tqdm(total=sum(sizes), unit="img", desc="train.rec", disable=not progress,
                         leave=False) as bar:
                num_image = write_ms1m(writer, sizes, _kept_images(reader, kept), progress=bar)
            os.replace(tmp_rec, dst / REC)
            os.replace(tmp_idx, dst / IDX)
        finally:
            for tmp in (tmp_rec, tmp_idx):
                if tmp.exists():
                    tmp.unlink()
    _link_side_files(src, dst, len(order), prop)
    return LongtailSummary(
        num_classes=len(order), num_image=num_image, num_head=num_head,
        num_tail=len(order) - num_head, tail_images=tail_images, seed=seed,
        source_classes=len(identities),
        source_images=sum(len(keys) for keys in identities.values()))
