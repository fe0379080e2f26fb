"""tools/make_longtail_rec.py and leap_plugin.insightface.ms1m on a small MS1M-style rec."""
import subprocess
import sys
from pathlib import Path

import pytest

from face_fixtures import COUNTS, make_longtail_rec_tool

from leap_plugin.core.longtail import longtail_split
from leap_plugin.insightface.ms1m import PAPER_SUBSETS, make_longtail_rec
from leap_plugin.insightface.recordio import IndexedRecordReader, IndexedRecordWriter, unpack

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "make_longtail_rec.py"
def _read_subset(dst):
    """(record-0 header, [(label, payload, header)], identity ranges) of an output folder."""
    with IndexedRecordReader(dst / "train.idx", dst / "train.rec") as reader:
        header0, _ = unpack(reader.read_idx(0))
        first, end = (int(v) for v in header0.label)
        assert reader.keys == list(range(end))  # 0, images, identities: nothing else
        images = []
        for key in range(1, first):
            header, payload = unpack(reader.read_idx(key))
            images.append((header.label, payload, header))
        identities = []
        for key in range(first, end):
            header, payload = unpack(reader.read_idx(key))
            assert header.flag == 2 and payload == b""
            identities.append(tuple(int(v) for v in header.label))
    return header0, images, identities


def test_source_layout_is_ms1m(source):
    src, _ = source
    header0, images, identities = _read_subset(src)
    assert header0.flag == 2 and header0.label.tolist() == [len(images) + 1,
                                                            len(images) + 1 + len(COUNTS)]
    assert [end - start for start, end in identities] == COUNTS
    assert [label for label, _, _ in images] == [float(i) for i, c in enumerate(COUNTS)
                                                 for _ in range(c)]


def test_subset_counts_identities_and_relabelling(source, tmp_path):
    src, payload_of = source
    summary = make_longtail_rec(src, tmp_path / "out", num_head=3, num_tail=5, tail_images=4,
                                seed=3, progress=False)
    # ranked counts: 20, 15, 11 | 9, 7, 6, 6, 5 | ...: head keeps 46, tail 5 x min(4, n) = 20
    assert (summary.num_classes, summary.num_image) == (8, 66)
    assert (summary.num_head, summary.num_tail) == (3, 5)
    assert (summary.source_classes, summary.source_images) == (12, sum(COUNTS))
    header0, images, identities = _read_subset(tmp_path / "out")
    assert header0.flag == 2 and header0.label.tolist() == [67.0, 75.0]
    assert len(images) == 66 and len(identities) == 8

    # relabelled contiguously 0..7, identity by identity, in the source's identity order
    labels = [int(label) for label, _, _ in images]
    assert labels == sorted(labels) and sorted(set(labels)) == list(range(8))
    assert [header.id for _, _, header in images] == list(range(1, 67))
    assert identities == [(labels.index(c) + 1, labels.index(c) + 1 + labels.count(c))
                          for c in range(8)]

    # every kept image is a source image, each identity's images come from one source identity
    source_ids = {}
    for label, payload, _ in images:
        key, identity = payload_of[payload]
        source_ids.setdefault(int(label), set()).add(identity)
    assert all(len(ids) == 1 for ids in source_ids.values())
    kept = [ids.pop() for _, ids in sorted(source_ids.items())]
    assert kept == [1, 3, 4, 6, 7, 9, 10, 11]  # ordinals of the counts 9,6,20,11,7,6,15,5

    # exactly the images the shared split rule picks
    class_items = {i: list(range(1 + sum(COUNTS[:i]), 1 + sum(COUNTS[:i + 1])))
                   for i in range(len(COUNTS))}
    split = longtail_split(class_items, num_head=3, tail_images=4, seed=3, num_tail=5)
    assert sorted(payload_of[p][0] for _, p, _ in images) == sorted(k for v in split.values() for k in v)
    assert (tmp_path / "out" / "lfw.bin").resolve() == (src / "lfw.bin").resolve()
    assert (tmp_path / "out" / "property").read_text() == "8,112,112\n"


def test_seeded_and_deterministic(source, tmp_path):
    src, _ = source
    runs = [make_longtail_rec(src, tmp_path / name, num_head=2, num_tail=6, tail_images=2,
                              seed=seed, progress=False) for name, seed in
            (("a", 0), ("b", 0), ("c", 1))]
    assert runs[0] == runs[1]
    rec = {name: (tmp_path / name / "train.rec").read_bytes() for name in "abc"}
    assert rec["a"] == rec["b"] and rec["a"] != rec["c"]


def test_refuses_to_overwrite_without_force(source, tmp_path):
    src, _ = source
    make_longtail_rec(src, tmp_path, num_head=2, num_tail=2, progress=False)
    before = (tmp_path / "train.rec").read_bytes()
    with pytest.raises(FileExistsError, match="--force"):
        make_longtail_rec(src, tmp_path, num_head=4, num_tail=2, progress=False)
    assert (tmp_path / "train.rec").read_bytes() == before
    summary = make_longtail_rec(src, tmp_path, num_head=4, num_tail=2, force=True, progress=False)
    assert summary.num_classes == 6 and not list(tmp_path.glob("*.partial"))


def test_corrupt_source_names_byte_offset(source, tmp_path):
    src, _ = source
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "train.idx").write_bytes((src / "train.idx").read_bytes())
    data = bytearray((src / "train.rec").read_bytes())
    with IndexedRecordReader(src / "train.idx", src / "train.rec") as reader:
        offset = reader.idx[5]  # an image of identity 1 (num_head=12 keeps every image)
    data[offset:offset + 4] = b"\0\0\0\0"
    (bad / "train.rec").write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"bad magic number 0x00000000 .*at byte {offset}\b"):
        make_longtail_rec(bad, tmp_path / "out", num_head=12, progress=False)
    assert not (tmp_path / "out" / "train.rec").exists()
    assert not list((tmp_path / "out").glob("*"))  # no partial file left behind

    (bad / "train.rec").write_bytes((src / "train.rec").read_bytes()[:-100])  # cut short
    with pytest.raises(ValueError, match=r"train\.idx, line \d+: key \d+ points at byte \d+, past"):
        make_longtail_rec(bad, tmp_path / "out", num_head=2, progress=False)


def test_not_ms1m_layout(tmp_path):
    with IndexedRecordWriter(tmp_path / "train.idx", tmp_path / "train.rec") as writer:
        writer.write_idx(0, b"\0" * 24 + b"jpeg")  # flag 0: an im2rec file without header
    with pytest.raises(ValueError, match=r"header record \(key 0, byte 0\) has flag=0.*flag >= 2"):
        make_longtail_rec(tmp_path, tmp_path / "out", num_head=1, progress=False)


def test_paper_subsets():
    assert PAPER_SUBSETS == {"H5K_T10K": (5000, 10000), "H5K_T20K": (5000, 20000),
                             "H3K_T10K": (3000, 10000), "H3K_T20K": (3000, 20000)}


def test_cli(source, tmp_path, capsys):
    src, _ = source
    args = ["--src", str(src), "--dst", str(tmp_path), "--num-head", "4", "--num-tail", "3",
            "--tail-images", "2", "--seed", "0"]
    done = subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True,
                          timeout=120)  # the script as a user runs it
    assert done.returncode == 0, done.stderr
    assert "config.num_classes = 7\nconfig.num_image = 61\n" in done.stdout  # 20+15+11+9 + 3*2
    assert make_longtail_rec_tool().main(args + ["--no-progress"]) == 1  # exists: refused, no traceback
    assert "already exist: pass --force" in capsys.readouterr().err
    assert make_longtail_rec_tool().main(args + ["--no-progress", "--force", "--num-head", "5"]) == 0
    assert "config.num_classes = 8\nconfig.num_image = 68" in capsys.readouterr().out


_MX_FACE_DATASET = r"""
import json, numbers, os, sys
import mxnet as mx
root = sys.argv[1]
# what arcface_torch's MXFaceDataset.__init__ / __getitem__ do
rec = mx.recordio.MXIndexedRecordIO(os.path.join(root, "train.idx"),
                                    os.path.join(root, "train.rec"), "r")
header, _ = mx.recordio.unpack(rec.read_idx(0))
assert header.flag > 0
imgidx = list(range(1, int(header.label[0])))
out = {"flag": header.flag, "label": header.label.tolist(), "keys": list(rec.keys), "images": []}
for idx in imgidx:
    h, img = mx.recordio.unpack(rec.read_idx(idx))
    label = h.label if isinstance(h.label, numbers.Number) else h.label[0]
    out["images"].append([int(label), list(mx.image.imdecode(img).asnumpy().shape)])
out["identities"] = [mx.recordio.unpack(rec.read_idx(k))[0].label.tolist()
                     for k in range(int(header.label[0]), int(header.label[1]))]
print(json.dumps(out))
"""


def test_mxnet_reads_subset_like_mxfacedataset(mxnet_env, source, tmp_path):
    mxnet_env.require()
    src, _ = source
    summary = make_longtail_rec(src, tmp_path, num_head=3, num_tail=5, tail_images=4, seed=3,
                                progress=False)
    got = mxnet_env.run_json(_MX_FACE_DATASET, tmp_path)
    n, c = summary.num_image, summary.num_classes
    assert got["flag"] == 2 and got["label"] == [n + 1, n + 1 + c]
    assert got["keys"] == list(range(n + 1 + c))
    _, images, identities = _read_subset(tmp_path)
    assert [label for label, _ in got["images"]] == [int(label) for label, _, _ in images]
    assert all(shape == [10, 12, 3] for _, shape in got["images"])
    assert [tuple(map(int, r)) for r in got["identities"]] == identities
