"""Write RecordIO reference files with the REAL mxnet, for tests/insightface/test_recordio.py.

Runs inside a venv that has mxnet 1.9.1 (it needs numpy < 1.24), not the project's .venv::

    python3.11 -m venv .venv-mxnet
    .venv-mxnet/bin/pip install numpy==1.23.5 mxnet==1.9.1 opencv-python-headless==4.8.1.78
    .venv-mxnet/bin/python tools/make_recordio_golden.py --out tests/insightface/golden

(the tests create that venv themselves; see tests/insightface/conftest.py). Output, all written by
mxnet's own ``mx.recordio``:

* ``seq.rec``: ``MXRecordIO`` records, among them payloads that hold the magic number 4-byte
  aligned (mxnet splits those into segments) and unaligned (not split);
* ``indexed.rec`` + ``indexed.idx``: ``MXIndexedRecordIO`` with ``mx.recordio.pack``-ed records:
  an MS1M-style header (flag 2), scalar and multi-label headers, a header whose id field is the
  magic number (split inside the header), JPEG and PNG images from ``pack_img``;
* ``manifest.json``: what went in and what mxnet reads back (payloads in hex, headers, decoded
  pixels of the image records from ``unpack_img`` (BGR) and ``mx.image.imdecode`` (RGB)).

Everything is deterministic: rerunning with the same pinned versions gives the same bytes.
"""
import argparse
import base64
import json
import os
import struct

import cv2
import mxnet as mx
import numpy as np

MAGIC = struct.pack("<I", 0xCED7230A)


def seq_payloads():
    """Payloads for seq.rec: padding cases, and the magic number at aligned/unaligned offsets."""
    rng = np.random.RandomState(1234)
    noise = bytearray(rng.randint(0, 256, size=1000, dtype=np.uint8).tobytes())
    noise[400:404] = MAGIC  # aligned: split
    noise[601:605] = MAGIC  # unaligned: not split
    return [
        b"",
        b"a",
        b"abcd",
        b"hello world",
        MAGIC + b"xyz",                               # magic first: empty first piece
        b"1234" + MAGIC,                              # magic last: empty last piece
        b"ab" + MAGIC + b"cd",                        # unaligned: one plain segment
        MAGIC * 3,                                    # only magic: four empty pieces
        b"12345678" + MAGIC + b"abcdefgh" + MAGIC + b"z",
        bytes(noise),
        MAGIC[:3],
    ]


def gradient_image(height=12, width=16):
    """A small deterministic BGR image with some texture."""
    y, x = np.mgrid[0:height, 0:width]
    img = np.stack([x * 15, y * 20, (x * y) % 256], axis=-1)
    return img.astype(np.uint8)


def indexed_entries():
    """(key, header as given to pack, payload, image format or None) for indexed.rec."""
    img = gradient_image()
    return img, [
        (0, (0, [5.0, 9.0], 0, 0), b"", None),               # MS1M record 0: [first id rec, end)
        (1, (0, 3.0, 1, 0), b"payload", None),
        (2, (0, [1.5, -2.25, 7.0], 2, 0), b"multi", None),
        (3, (0, 1.0, 2 ** 40 + 3, 7), b"abcd" + MAGIC + b"tail", None),
        (4, (0, 2.0, 0xCED7230A, 0), b"id is magic", None),  # split inside the header itself
        (5, (0, 4.0, 5, 0), None, ".jpg"),
        (6, (0, [6.0, 1.0], 6, 0), None, ".png"),
        (10, (2, [1.0, 5.0], 10, 0), b"", None),             # identity record, non-contiguous key
    ]


def header_json(header):
    label = header.label
    label = [float(v) for v in label] if isinstance(label, np.ndarray) else float(label)
    return {"flag": int(header.flag), "label": label, "id": int(header.id), "id2": int(header.id2)}


def b64(array):
    return base64.b64encode(np.ascontiguousarray(array).tobytes()).decode()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for the reference files")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    manifest = {"versions": {"mxnet": mx.__version__, "numpy": np.__version__,
                             "cv2": cv2.__version__}}

    payloads = seq_payloads()
    writer = mx.recordio.MXRecordIO(os.path.join(args.out, "seq.rec"), "w")
    for payload in payloads:
        writer.write(payload)
    writer.close()
    manifest["seq"] = [p.hex() for p in payloads]

    img, entries = indexed_entries()
    idx_path, rec_path = (os.path.join(args.out, f"indexed.{ext}") for ext in ("idx", "rec"))
    writer = mx.recordio.MXIndexedRecordIO(idx_path, rec_path, "w")
    records = []
    for key, header, payload, fmt in entries:
        header = mx.recordio.IRHeader(*header)
        if fmt is None:
            record = mx.recordio.pack(header, payload)
        else:
            record = mx.recordio.pack_img(header, img, quality=90, img_fmt=fmt)
        writer.write_idx(key, record)
        records.append((key, header, payload, fmt, record))
    writer.close()

    reader = mx.recordio.MXIndexedRecordIO(idx_path, rec_path, "r")
    manifest["keys"] = [int(k) for k in reader.keys]
    manifest["image"] = {"shape": list(img.shape), "bgr_b64": b64(img)}
    manifest["indexed"] = []
    for key, header, payload, fmt, record in records:
        read_back = reader.read_idx(key)
        assert read_back == record, f"mxnet did not read back record {key}"
        unpacked_header, unpacked_payload = mx.recordio.unpack(read_back)
        entry = {
            "key": key,
            "pack_header": {"flag": header.flag, "label": header.label, "id": header.id,
                            "id2": header.id2},
            "record_hex": record.hex(),
            "header": header_json(unpacked_header),
            "payload_hex": unpacked_payload.hex(),
        }
        if fmt is not None:
            _, bgr = mx.recordio.unpack_img(read_back)
            rgb = mx.image.imdecode(unpacked_payload).asnumpy()
            entry.update(fmt=fmt, quality=90, decoded_shape=list(bgr.shape),
                         unpack_img_bgr_b64=b64(bgr), imdecode_rgb_b64=b64(rgb))
        manifest["indexed"].append(entry)
    reader.close()

    with open(os.path.join(args.out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.write("\n")
    print(f"wrote seq.rec, indexed.rec, indexed.idx, manifest.json to {args.out} "
          f"with mxnet {mx.__version__}")


if __name__ == "__main__":
    main()
