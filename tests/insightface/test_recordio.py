"""leap_plugin.insightface.recordio against the real mxnet 1.9.1.

The reference files come from tools/make_recordio_golden.py run with the real mxnet: freshly,
in the mxnet venv of conftest.py, or, where that venv cannot be made, the committed copies in
tests/insightface/golden/. Either way: files mxnet wrote read the same with ours, and ours
writes byte-identical files. With mxnet live, mxnet also reads what ours writes.
"""
import base64
import json
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from leap_plugin.insightface.recordio import (
    MAGIC, IndexedRecordReader, IndexedRecordWriter, IRHeader, RecordReader, RecordWriter,
    encode_record, pack, pack_img, unpack, unpack_img)

HERE = Path(__file__).resolve().parent
GOLDEN = HERE / "golden"
GOLDEN_SCRIPT = HERE.parents[1] / "tools" / "make_recordio_golden.py"
M = struct.pack("<I", MAGIC)


@pytest.fixture(scope="module")
def reference(mxnet_env, tmp_path_factory):
    """Folder of mxnet-written reference files (fresh if mxnet is live, else the golden copy)."""
    if not mxnet_env.available:
        return GOLDEN
    out = tmp_path_factory.mktemp("mxnet_reference")
    mxnet_env.run(GOLDEN_SCRIPT.read_text(), "--out", out)
    return out


@pytest.fixture(scope="module")
def manifest(reference):
    return json.loads((reference / "manifest.json").read_text())


def _header(d):
    return IRHeader(d["flag"], d["label"], d["id"], d["id2"])


def _pixels(b64, shape):
    return np.frombuffer(base64.b64decode(b64), np.uint8).reshape(shape)


# --------------------------------------------------------------------------- mxnet files, our reader

def test_reads_mxnet_sequential_file(reference, manifest):
    with RecordReader(reference / "seq.rec") as reader:
        payloads = [p.hex() for p in reader]
    assert payloads == manifest["seq"]
    assert any(M in bytes.fromhex(p) for p in payloads)  # the split cases are really there


def test_reads_mxnet_indexed_file(reference, manifest):
    with IndexedRecordReader(reference / "indexed.idx", reference / "indexed.rec") as reader:
        assert reader.keys == manifest["keys"]
        # backwards, to exercise seeking
        for entry in reversed(manifest["indexed"]):
            record = reader.read_idx(entry["key"])
            assert record.hex() == entry["record_hex"]
            header, payload = unpack(record)
            want = entry["header"]
            assert (header.flag, header.id, header.id2) == (want["flag"], want["id"], want["id2"])
            if want["flag"] > 0:
                assert isinstance(header.label, np.ndarray) and header.label.dtype == np.float32
                assert header.label.tolist() == want["label"]
            else:
                assert isinstance(header.label, float) and header.label == want["label"]
            assert payload.hex() == entry["payload_hex"]


def test_unpack_img_matches_mxnet(reference, manifest):
    images = [e for e in manifest["indexed"] if "fmt" in e]
    assert {e["fmt"] for e in images} == {".jpg", ".png"}
    for entry in images:
        header, bgr = unpack_img(bytes.fromhex(entry["record_hex"]))
        want = _pixels(entry["unpack_img_bgr_b64"], entry["decoded_shape"])
        assert bgr.shape == want.shape and bgr.dtype == np.uint8
        diff = np.abs(bgr.astype(int) - want.astype(int)).max()
        # PNG is lossless; a JPEG may decode 1 level apart between libjpeg builds
        assert diff == 0 if entry["fmt"] == ".png" else diff <= 1, (entry["fmt"], diff)
        # mx.image.imdecode (what MXFaceDataset uses) is the same picture in RGB
        rgb = _pixels(entry["imdecode_rgb_b64"], entry["decoded_shape"])
        assert np.abs(bgr[..., ::-1].astype(int) - rgb.astype(int)).max() <= 1


# --------------------------------------------------------------------------- our writer, mxnet's bytes

def test_writes_sequential_file_byte_identical(reference, manifest, tmp_path):
    with RecordWriter(tmp_path / "seq.rec") as writer:
        for payload in manifest["seq"]:
            writer.write(bytes.fromhex(payload))
    assert (tmp_path / "seq.rec").read_bytes() == (reference / "seq.rec").read_bytes()


def test_writes_indexed_file_byte_identical(reference, manifest, tmp_path):
    idx, rec = tmp_path / "indexed.idx", tmp_path / "indexed.rec"
    with IndexedRecordWriter(idx, rec) as writer:
        for entry in manifest["indexed"]:
            if "fmt" in entry:
                record = bytes.fromhex(entry["record_hex"])  # image bytes: OpenCV's, not ours
            else:
                record = pack(_header(entry["pack_header"]), bytes.fromhex(entry["payload_hex"]))
            writer.write_idx(entry["key"], record)
    assert rec.read_bytes() == (reference / "indexed.rec").read_bytes()
    assert idx.read_bytes() == (reference / "indexed.idx").read_bytes()


def test_pack_matches_mxnet_pack(manifest):
    for entry in manifest["indexed"]:
        record = bytes.fromhex(entry["record_hex"])
        header, payload = unpack(record)
        assert pack(_header(entry["pack_header"]), payload) == record
        assert pack(header, payload) == record  # unpack -> pack round trip


def test_pack_img_png_is_lossless_and_matches_mxnet_header(manifest):
    img = _pixels(manifest["image"]["bgr_b64"], manifest["image"]["shape"])
    entry = next(e for e in manifest["indexed"] if e.get("fmt") == ".png")
    record = pack_img(_header(entry["pack_header"]), img, quality=entry["quality"], img_fmt=".png")
    header, decoded = unpack_img(record)
    assert np.array_equal(decoded, img)
    assert record[:24 + 4 * header.flag] == bytes.fromhex(entry["record_hex"])[:24 + 4 * header.flag]


# --------------------------------------------------------------------------- mxnet reads our files

_MX_READ = r"""
import json, sys
import mxnet as mx
seq, idx, rec = sys.argv[1:4]
out = {"seq": [], "indexed": {}}
r = mx.recordio.MXRecordIO(seq, "r")
while True:
    item = r.read()
    if item is None:
        break
    out["seq"].append(item.hex())
r.close()
r = mx.recordio.MXIndexedRecordIO(idx, rec, "r")
out["keys"] = list(r.keys)
for key in reversed(r.keys):
    header, payload = mx.recordio.unpack(r.read_idx(key))
    label = header.label.tolist() if header.flag > 0 else header.label
    out["indexed"][str(key)] = [header.flag, label, header.id, header.id2, payload.hex()]
print(json.dumps(out))
"""


def _tricky_payloads(count=200, seed=0):
    """Random payloads with the magic number planted at aligned and unaligned offsets."""
    rng = np.random.default_rng(seed)
    payloads = []
    for i in range(count):
        data = bytearray(rng.integers(0, 256, size=int(rng.integers(0, 64)), dtype=np.uint8))
        for _ in range(int(rng.integers(0, 4))):
            at = int(rng.integers(0, len(data) + 1))
            data[at:at] = M
        payloads.append(bytes(data))
    return payloads


def test_mxnet_reads_what_we_write(mxnet_env, tmp_path):
    mxnet_env.require()
    payloads = _tricky_payloads()
    assert sum(len(encode_record(p)) > 8 + ((len(p) + 3) & ~3) for p in payloads) > 20  # splits
    with RecordWriter(tmp_path / "seq.rec") as writer:
        for payload in payloads:
            writer.write(payload)
    headers = {7: IRHeader(0, 3.0, 7, 0), 0: IRHeader(2, [11.0, 15.0], 0, 0),
               3: IRHeader(0, [1.0, 2.5, -4.0], MAGIC, 2 ** 63), 12: IRHeader(0, 0.5, 12, 0)}
    with IndexedRecordWriter(tmp_path / "i.idx", tmp_path / "i.rec") as writer:
        for n, (key, header) in enumerate(headers.items()):
            writer.write_idx(key, pack(header, payloads[n * 7] + M + b"end"))
    got = mxnet_env.run_json(_MX_READ, tmp_path / "seq.rec", tmp_path / "i.idx", tmp_path / "i.rec")
    assert got["seq"] == [p.hex() for p in payloads]
    assert got["keys"] == list(headers)
    for n, (key, header) in enumerate(headers.items()):
        flag, label, id_, id2, payload = got["indexed"][str(key)]
        ours, our_payload = unpack(pack(header, payloads[n * 7] + M + b"end"))
        our_label = ours.label.tolist() if ours.flag > 0 else ours.label
        assert [flag, label, id_, id2, payload] == [ours.flag, our_label, ours.id, ours.id2,
                                                    our_payload.hex()]


_MX_WRITE = r"""
import json, sys
import mxnet as mx
payloads = [bytes.fromhex(p) for p in json.load(open(sys.argv[1]))]
w = mx.recordio.MXRecordIO(sys.argv[2], "w")
for p in payloads:
    w.write(p)
w.close()
print(json.dumps({"ok": True}))
"""


def test_random_payloads_byte_identical_to_mxnet(mxnet_env, tmp_path):
    mxnet_env.require()
    payloads = _tricky_payloads(count=300, seed=1)
    (tmp_path / "p.json").write_text(json.dumps([p.hex() for p in payloads]))
    mxnet_env.run_json(_MX_WRITE, tmp_path / "p.json", tmp_path / "mx.rec")
    with RecordWriter(tmp_path / "ours.rec") as writer:
        for payload in payloads:
            writer.write(payload)
    assert (tmp_path / "ours.rec").read_bytes() == (tmp_path / "mx.rec").read_bytes()


def test_committed_golden_files_are_current(mxnet_env, reference):
    """The fallback files must be what the pinned mxnet writes today (regenerate otherwise)."""
    mxnet_env.require()
    for name in ("seq.rec", "indexed.rec", "indexed.idx"):
        assert (GOLDEN / name).read_bytes() == (reference / name).read_bytes(), (
            f"tests/insightface/golden/{name} is stale: run "
            f".venv-mxnet/bin/python tools/make_recordio_golden.py --out tests/insightface/golden")
    assert json.loads((GOLDEN / "manifest.json").read_text()) == \
        json.loads((reference / "manifest.json").read_text())


# --------------------------------------------------------------------------- the format itself

def test_split_record_layout_by_hand():
    """Magic at aligned offsets 4 and 8: pieces 'abcd' (cflag 1), '' (2), 'xy' (3, padded)."""
    payload = b"abcd" + M + M + b"xy"
    expected = (M + struct.pack("<I", 1 << 29 | 4) + b"abcd"
                + M + struct.pack("<I", 2 << 29 | 0)
                + M + struct.pack("<I", 3 << 29 | 2) + b"xy\0\0")
    assert encode_record(payload) == expected
    assert encode_record(b"a" + M + b"bcd") == M + struct.pack("<I", 8) + b"a" + M + b"bcd"


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.sampled_from([b"\x00", b"\x0a", b"\x23", b"\xd7", b"\xce", M, b"xyz"]),
                         max_size=12).map(b"".join), max_size=6))
def test_roundtrip_any_payloads(tmp_path_factory, payloads):
    path = tmp_path_factory.mktemp("rt") / "x.rec"
    with RecordWriter(path) as writer:
        offsets = []
        for payload in payloads:
            offsets.append(writer.tell())
            writer.write(payload)
    assert path.stat().st_size % 4 == 0
    with RecordReader(path) as reader:
        assert list(reader) == payloads
        for offset, payload in reversed(list(zip(offsets, payloads))):
            reader.seek(offset)
            assert reader.read() == payload


def test_pack_flag_follows_label_like_mxnet():
    assert unpack(pack(IRHeader(9, 2.0, 1, 0), b"x"))[0] == IRHeader(0, 2.0, 1, 0)
    header, payload = unpack(pack((0, [1, 2], 3, 4), b"img"))
    assert header.flag == 2 and header.label.tolist() == [1.0, 2.0] and payload == b"img"
    assert len(pack(IRHeader(0, 1.0, 0, 0), b"")) == 24


# --------------------------------------------------------------------------- errors

def _write(path, payloads):
    with RecordWriter(path) as writer:
        for payload in payloads:
            writer.write(payload)
    return path.read_bytes()


def test_truncated_file_names_file_and_offset(tmp_path):
    data = _write(tmp_path / "a.rec", [b"first record", b"second record!"])
    (tmp_path / "cut.rec").write_bytes(data[:-3])
    with RecordReader(tmp_path / "cut.rec") as reader:
        assert reader.read() == b"first record"
        with pytest.raises(ValueError, match=r"cut\.rec.*past the end.*at byte 20"):
            reader.read()
    (tmp_path / "cut.rec").write_bytes(data[:24])  # half a segment header
    with RecordReader(tmp_path / "cut.rec") as reader:
        reader.read()
        with pytest.raises(ValueError, match=r"truncated segment header \(4 of 8 bytes\) at byte 20"):
            reader.read()


def test_truncated_split_record(tmp_path):
    data = _write(tmp_path / "a.rec", [b"abcd" + M + b"efgh"])
    (tmp_path / "cut.rec").write_bytes(data[:12])  # first piece only
    with RecordReader(tmp_path / "cut.rec") as reader:
        with pytest.raises(ValueError, match=r"ends inside a record split in segments at byte 12"):
            reader.read()


def test_bad_magic_names_offset(tmp_path):
    data = bytearray(_write(tmp_path / "a.rec", [b"12345678", b"x"]))
    data[16:20] = b"JUNK"
    (tmp_path / "bad.rec").write_bytes(bytes(data))
    with RecordReader(tmp_path / "bad.rec") as reader:
        reader.read()
        with pytest.raises(ValueError, match=r"bad\.rec: bad magic number 0x4b4e554a .* at byte 16"):
            reader.read()


def test_continuation_segment_where_a_record_starts(tmp_path):
    data = _write(tmp_path / "a.rec", [b"abcd" + M + b"efgh"])
    with RecordReader(tmp_path / "a.rec") as reader:
        reader.seek(12)  # the cflag-3 piece
        with pytest.raises(ValueError, match="unexpected segment flag 3 where a record starts at byte 12"):
            reader.read()
    assert len(data) == 24


def test_idx_errors(tmp_path):
    _write(tmp_path / "a.rec", [b"abc", b"defg"])
    (tmp_path / "a.idx").write_text("0\t0\n1\t12\n")
    with IndexedRecordReader(tmp_path / "a.idx", tmp_path / "a.rec") as reader:
        assert reader.read_idx(1) == b"defg" and reader.read_idx(0) == b"abc"
        assert len(reader) == 2 and 1 in reader and 2 not in reader
        with pytest.raises(KeyError, match="no key 2"):
            reader.read_idx(2)
    for text, pattern in [("0\t0\n1 12\n", r"a\.idx, line 2: expected 'key<TAB>offset'"),
                          ("0\t0\n0\t12\n", r"line 2: key 0 appears twice"),
                          ("0\t0\n1\t24\n", r"line 2: key 1 points at byte 24, past the end")]:
        (tmp_path / "a.idx").write_text(text)
        with pytest.raises(ValueError, match=pattern):
            IndexedRecordReader(tmp_path / "a.idx", tmp_path / "a.rec")
    (tmp_path / "a.idx").write_text("0\t0\n1\t4\n")  # not a record boundary
    with IndexedRecordReader(tmp_path / "a.idx", tmp_path / "a.rec") as reader:
        with pytest.raises(ValueError, match=r"a\.rec: bad magic number .* at byte 4"):
            reader.read_idx(1)


def test_unpack_errors():
    with pytest.raises(ValueError, match="too short for the 24-byte IRHeader"):
        unpack(b"short")
    with pytest.raises(ValueError, match="announces 3 float32 labels"):
        unpack(struct.pack("<IfQQ", 3, 0.0, 0, 0) + b"\0" * 8)
    with pytest.raises(ValueError, match=r"cannot pack .*uint64"):
        pack(IRHeader(0, 1.0, -1, 0), b"")


def test_golden_files_present():
    """The fallback must be committed, or a machine without mxnet checks nothing."""
    for name in ("seq.rec", "indexed.rec", "indexed.idx", "manifest.json"):
        assert (GOLDEN / name).is_file(), f"missing tests/insightface/golden/{name}"
    assert json.loads((GOLDEN / "manifest.json").read_text())["versions"]["mxnet"] == "1.9.1"
