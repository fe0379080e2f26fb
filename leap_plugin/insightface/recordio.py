"""RecordIO read/write, byte-compatible with mxnet 1.9.1 (``mx.recordio``), without mxnet.

arcface_torch keeps its training sets (MS1M, Glint360K, ...) as ``train.rec`` + ``train.idx``
written by mxnet. This module reads and writes those files with the standard library and numpy
only, so the plugin's tools run where mxnet (which needs numpy < 1.24) cannot be installed.

The file format (dmlc-core's RecordIO, as mxnet writes it)
----------------------------------------------------------
A ``.rec`` file is a sequence of *segments*::

    uint32 magic = 0xced7230a        little-endian
    uint32 lrec  = cflag << 29 | n   cflag: top 3 bits, n: 29-bit payload length
    n bytes of payload, then zero bytes up to the next multiple of 4

A record is one segment (cflag 0) unless its payload holds the magic number at an offset that is a
multiple of 4. The writer then cuts the payload at every such occurrence and drops those 4 bytes:
the first piece gets cflag 1, the pieces between two occurrences cflag 2, the piece after the last
one cflag 3 (pieces may be empty). Only the last piece is padded (the others have lengths that
are multiples of 4). The reader joins the pieces with the magic number put back.

A ``.idx`` file is text, one ``key<TAB>byte offset<LF>`` line per record, in writing order.

An image record's payload starts with an ``IRHeader`` packed as ``<IfQQ`` (uint32 flag, float32
label, uint64 id, uint64 id2; 24 bytes). If ``flag > 0`` the label is an array: ``flag`` float32
values follow the header (the header's own label field is then 0). The rest is the encoded image.

Errors: a file that does not follow this format raises ``ValueError`` naming the file and the byte
offset where it goes wrong. Reading streams: one record in memory at a time.
"""
import numbers
import os
import struct
from collections import namedtuple
from typing import Callable, Dict, Iterator, List, Optional, Tuple, Union

import numpy as np

__all__ = [
    "MAGIC", "IRHeader", "pack", "unpack", "pack_img", "unpack_img", "encode_record",
    "RecordWriter", "RecordReader", "IndexedRecordWriter", "IndexedRecordReader",
]

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_SEGMENT_HEAD = struct.Struct("<II")
_LENGTH_BITS = 29
_MAX_SEGMENT = (1 << _LENGTH_BITS) - 1
_IR_HEADER = struct.Struct("<IfQQ")

Path = Union[str, "os.PathLike[str]"]

IRHeader = namedtuple("IRHeader", ["flag", "label", "id", "id2"])
IRHeader.__doc__ = """Header of an image record (mxnet's ``mx.recordio.IRHeader``).

flag: 0 for a scalar label, else the number of float32 labels; ``pack`` sets it from ``label``.
label: a number, or a sequence / array of numbers (a multi-label record).
id, id2: unsigned 64-bit ids (arcface_torch: id = the record's key, id2 = 0).
"""


# --------------------------------------------------------------------------- records <-> segments

def _pad(length: int) -> int:
    return (length + 3) & ~3


def _segment(cflag: int, piece) -> bytes:
    """One segment: magic, lrec, the piece, zero padding to 4 bytes."""
    head = _SEGMENT_HEAD.pack(MAGIC, (cflag << _LENGTH_BITS) | len(piece))
    return head + bytes(piece) + b"\0" * (_pad(len(piece)) - len(piece))


def encode_record(payload) -> bytes:
    """The bytes the dmlc-core writer puts in a ``.rec`` file for one record.

    The payload is cut at every 4-byte-aligned occurrence of the magic number (see the module
    docstring), exactly as dmlc-core's ``RecordIOWriter::WriteRecord`` does.
    """
    data = memoryview(payload).cast("B")
    if len(data) > _MAX_SEGMENT:
        raise ValueError(f"a RecordIO record holds at most {_MAX_SEGMENT} bytes (29-bit length); "
                         f"got {len(data)}: split the data over several records")
    raw = data.tobytes()
    cuts = []
    pos = raw.find(_MAGIC_BYTES)
    while pos >= 0:
        if pos % 4 == 0:
            cuts.append(pos)
            pos = raw.find(_MAGIC_BYTES, pos + 4)
        else:
            pos = raw.find(_MAGIC_BYTES, pos + 1)
    if not cuts:
        return _segment(0, raw)
    parts = []
    start = 0
    for i, cut in enumerate(cuts):
        parts.append(_segment(1 if i == 0 else 2, raw[start:cut]))
        start = cut + 4
    parts.append(_segment(3, raw[start:]))
    return b"".join(parts)


# --------------------------------------------------------------------------- IRHeader

def pack(header, payload: bytes) -> bytes:
    """``mx.recordio.pack``: an ``IRHeader`` (or 4-tuple) and payload bytes -> record bytes.

    As in mxnet, ``flag`` is not taken from the header: a number label gives flag 0, an array
    label gives flag = its size (label field 0, the float32 values written after the header).
    """
    header = IRHeader(*header)
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise TypeError(f"payload must be bytes, got {type(payload).__name__}")
    extra = b""
    if isinstance(header.label, numbers.Number):
        header = header._replace(flag=0)
    else:
        labels = np.asarray(header.label, dtype=np.float32)
        header = header._replace(flag=labels.size, label=0)
        extra = labels.tobytes()
    try:
        head = _IR_HEADER.pack(*header)
    except struct.error as exc:
        raise ValueError(f"cannot pack {header}: {exc} (flag: uint32, label: float32, "
                         f"id/id2: uint64)") from None
    return head + extra + bytes(payload)


def unpack(record: bytes) -> Tuple[IRHeader, bytes]:
    """``mx.recordio.unpack``: record bytes -> (``IRHeader``, payload bytes).

    A multi-label record (flag > 0) returns ``label`` as a float32 array of ``flag`` values.
    """
    if len(record) < _IR_HEADER.size:
        raise ValueError(f"a record of {len(record)} bytes is too short for the "
                         f"{_IR_HEADER.size}-byte IRHeader: not an image record")
    header = IRHeader(*_IR_HEADER.unpack_from(record))
    rest = record[_IR_HEADER.size:]
    if header.flag > 0:
        need = 4 * header.flag
        if len(rest) < need:
            raise ValueError(f"IRHeader flag={header.flag} announces {header.flag} float32 labels "
                             f"({need} bytes) but only {len(rest)} bytes follow the header")
        header = header._replace(label=np.frombuffer(rest, np.float32, header.flag))
        rest = rest[need:]
    return header, bytes(rest)


def _cv2():
    try:
        import cv2
    except ImportError:  # pragma: no cover - opencv is in requirements.txt
        raise ImportError("pack_img/unpack_img need OpenCV: pip install opencv-python-headless") from None
    return cv2


def pack_img(header, img: np.ndarray, quality: int = 95, img_fmt: str = ".jpg") -> bytes:
    """``mx.recordio.pack_img``: encode ``img`` (HxW or HxWx3 BGR uint8) with OpenCV and pack it.

    As in mxnet, ``quality`` is the JPEG quality for .jpg/.jpeg and is passed as the PNG
    compression level for .png (OpenCV clamps it to 0..9).
    """
    cv2 = _cv2()
    fmt = img_fmt.upper()
    params = None
    if fmt in (".JPG", ".JPEG"):
        params = [cv2.IMWRITE_JPEG_QUALITY, quality]
    elif fmt == ".PNG":
        params = [cv2.IMWRITE_PNG_COMPRESSION, quality]
    ok, buf = cv2.imencode(img_fmt, img, params) if params else cv2.imencode(img_fmt, img)
    if not ok:
        raise ValueError(f"OpenCV could not encode an image of shape {np.shape(img)} as {img_fmt}")
    return pack(header, buf.tobytes())


def unpack_img(record: bytes, iscolor: int = -1) -> Tuple[IRHeader, np.ndarray]:
    """``mx.recordio.unpack_img``: record -> (``IRHeader``, image decoded by OpenCV, BGR)."""
    cv2 = _cv2()
    header, payload = unpack(record)
    img = cv2.imdecode(np.frombuffer(payload, dtype=np.uint8), iscolor)
    if img is None:
        raise ValueError(f"the payload of record id={header.id} ({len(payload)} bytes) is not an "
                         f"image OpenCV can decode")
    return header, img


# --------------------------------------------------------------------------- sequential files

class _RecordFile:
    """Closing and context-manager support of the sequential reader and writer (``self._file``)."""

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class RecordWriter(_RecordFile):
    """Writes records to a ``.rec`` file (``mx.recordio.MXRecordIO(path, 'w')``).

    ``with RecordWriter("a.rec") as w: w.write(b"...")``; the file is truncated on open.
    """

    def __init__(self, path: Path):
        self.path = os.fspath(path)
        self._file = open(self.path, "wb")

    def write(self, payload: bytes) -> None:
        """Append one record."""
        if isinstance(payload, str):
            raise TypeError("RecordWriter.write takes bytes, got str: encode it first")
        self._file.write(encode_record(payload))

    def tell(self) -> int:
        """Byte offset where the next record starts (what goes into the ``.idx`` file)."""
        return self._file.tell()



class RecordReader(_RecordFile):
    """Reads records from a ``.rec`` file one at a time (``mx.recordio.MXRecordIO(path, 'r')``).

    ``read()`` returns the next payload, or None at the end of the file; iterating yields every
    remaining payload. ``seek(offset)`` moves to a record boundary (an offset from a ``.idx``).
    """

    def __init__(self, path: Path):
        self.path = os.fspath(path)
        self._file = open(self.path, "rb")
        self._size = os.fstat(self._file.fileno()).st_size

    @property
    def size(self) -> int:
        """The file's size in bytes."""
        return self._size

    def seek(self, offset: int) -> None:
        if not 0 <= offset <= self._size:
            raise ValueError(f"{self.path}: cannot seek to byte {offset}: the file has "
                             f"{self._size} bytes")
        self._file.seek(offset)

    def tell(self) -> int:
        return self._file.tell()

    def _error(self, offset: int, what: str, fix: str) -> ValueError:
        return ValueError(f"{self.path}: {what} at byte {offset}. {fix}")

    def _read_segment(self, first: bool) -> Optional[Tuple[int, bytes]]:
        """(cflag, piece) of the segment at the current offset; None at a clean end of file."""
        offset = self._file.tell()
        head = self._file.read(_SEGMENT_HEAD.size)
        if not head and first:
            return None
        if len(head) < _SEGMENT_HEAD.size:
            what = ("truncated record: the file ends inside a record split in segments" if not head
                    else f"truncated segment header ({len(head)} of 8 bytes)")
            raise self._error(offset, what, "The file was cut short (interrupted copy or "
                                            "download?): write or fetch it again.")
        magic, lrec = _SEGMENT_HEAD.unpack(head)
        if magic != MAGIC:
            raise self._error(offset, f"bad magic number 0x{magic:08x} (expected 0x{MAGIC:08x})",
                              "Not a RecordIO file, a corrupt one, or an offset that is not the "
                              "start of a record (a .idx file that does not belong to this .rec?).")
        cflag, length = lrec >> _LENGTH_BITS, lrec & _MAX_SEGMENT
        if cflag > 3 or (first and cflag not in (0, 1)) or (not first and cflag not in (2, 3)):
            where = "where a record starts" if first else "inside a split record"
            raise self._error(offset, f"unexpected segment flag {cflag} {where}",
                              "The file is corrupt, or the offset is not the start of a record.")
        padded = _pad(length)
        end = offset + _SEGMENT_HEAD.size + padded
        if end > self._size:
            raise self._error(offset, f"record segment of {length} bytes (padded {padded}) runs "
                                      f"past the end of the file ({self._size} bytes)",
                              "The file was cut short (interrupted copy or download?) or is "
                              "corrupt: write or fetch it again.")
        body = self._file.read(padded)
        return cflag, body[:length]

    def read(self) -> Optional[bytes]:
        """The next record's payload, or None at the end of the file."""
        segment = self._read_segment(first=True)
        if segment is None:
            return None
        cflag, piece = segment
        if cflag == 0:
            return piece
        pieces = [piece]
        while cflag != 3:
            cflag, piece = self._read_segment(first=False)
            pieces.append(piece)
        return _MAGIC_BYTES.join(pieces)

    def __iter__(self) -> Iterator[bytes]:
        while True:
            payload = self.read()
            if payload is None:
                return
            yield payload



# --------------------------------------------------------------------------- indexed files

class IndexedRecordWriter(RecordWriter):
    """Writes a ``.rec`` and its ``.idx`` (``mx.recordio.MXIndexedRecordIO(idx, rec, 'w')``).

    The argument order (idx first) is mxnet's. ``write_idx(key, payload)`` appends a record and
    its ``key<TAB>offset`` line.
    """

    def __init__(self, idx_path: Path, rec_path: Path, key_type: Callable = int):
        super().__init__(rec_path)
        self.idx_path = os.fspath(idx_path)
        self.key_type = key_type
        self.idx: Dict = {}
        self.keys: List = []
        self._fidx = open(self.idx_path, "w", newline="\n")

    def write_idx(self, key, payload: bytes) -> None:
        """Append one record under ``key`` (keys must be unique)."""
        key = self.key_type(key)
        if key in self.idx:
            raise ValueError(f"{self.idx_path}: key {key!r} was already written; keys must be unique")
        pos = self.tell()
        self.write(payload)
        self._fidx.write(f"{key}\t{pos}\n")
        self.idx[key] = pos
        self.keys.append(key)

    def close(self) -> None:
        super().close()
        if not self._fidx.closed:
            self._fidx.close()


class IndexedRecordReader(RecordReader):
    """Random access to a ``.rec`` through its ``.idx`` (``MXIndexedRecordIO(idx, rec, 'r')``).

    ``keys`` lists the keys in ``.idx`` order, ``idx`` maps key -> byte offset, ``read_idx(key)``
    returns that record's payload. The ``.idx`` is checked on open (format, unique keys, offsets
    inside the ``.rec``); the records themselves are checked when read.
    """

    def __init__(self, idx_path: Path, rec_path: Path, key_type: Callable = int):
        super().__init__(rec_path)
        self.idx_path = os.fspath(idx_path)
        self.key_type = key_type
        try:
            self.idx, self.keys = self._load_idx()
        except BaseException:
            self.close()
            raise

    def _load_idx(self):
        idx: Dict = {}
        keys: List = []
        with open(self.idx_path, "r", newline="") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                fields = line.rstrip("\r\n").split("\t")
                try:
                    if len(fields) != 2:
                        raise ValueError
                    key, offset = self.key_type(fields[0]), int(fields[1])
                except ValueError:
                    raise ValueError(f"{self.idx_path}, line {lineno}: expected 'key<TAB>offset', got "
                                     f"{line.rstrip()!r}: not a RecordIO .idx file, or a corrupt one"
                                     ) from None
                if key in idx:
                    raise ValueError(f"{self.idx_path}, line {lineno}: key {key!r} appears twice "
                                     f"(first at byte {idx[key]}): the .idx file is corrupt")
                if not 0 <= offset < self._size:
                    raise ValueError(f"{self.idx_path}, line {lineno}: key {key!r} points at byte "
                                     f"{offset}, past the end of {self.path} ({self._size} bytes): "
                                     f"the .rec was cut short or does not belong to this .idx")
                idx[key] = offset
                keys.append(key)
        return idx, keys

    def __len__(self) -> int:
        return len(self.keys)

    def __contains__(self, key) -> bool:
        return key in self.idx

    def read_idx(self, key) -> bytes:
        """The payload of the record stored under ``key``."""
        try:
            offset = self.idx[key]
        except KeyError:
            raise KeyError(f"{self.idx_path} has no key {key!r} ({len(self.keys)} keys)") from None
        self.seek(offset)
        return self.read()
