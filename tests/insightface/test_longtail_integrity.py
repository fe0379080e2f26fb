"""make_longtail_rec refuses a source it would copy wrongly: corrupt image bytes, a garbage
``property``, a dropped ``.idx`` line; each error names the file and key (issue 14)."""
import shutil

import pytest

from leap_plugin.insightface.ms1m import make_longtail_rec, write_ms1m
from leap_plugin.insightface.recordio import IndexedRecordWriter

from face_fixtures import COUNTS, jpeg, make_longtail_rec_tool


def _source_with(tmp_path, key, payload):
    """The test source with image ``key``'s bytes replaced (the record framing stays sound)."""
    images = [(float(i), jpeg(i, n)) for i, count in enumerate(COUNTS) for n in range(count)]
    images[key - 1] = (images[key - 1][0], payload(images[key - 1][1]))
    src = tmp_path / "src"
    src.mkdir()
    with IndexedRecordWriter(src / "train.idx", src / "train.rec") as writer:
        write_ms1m(writer, COUNTS, images)
    return src


@pytest.mark.parametrize("payload", [lambda jpeg: b"\x00garbage" * 20, lambda jpeg: jpeg[:len(jpeg) // 2]],
                         ids=["garbage", "cut-short"])
def test_corrupt_image_bytes_are_not_copied(tmp_path, payload):
    src = _source_with(tmp_path, 7, payload)  # key 7: identity 1 (keys 5-13), kept whole
    with pytest.raises(ValueError, match=r"train\.rec: image key 7 \(byte \d+\) of identity record 1 is "
                                         "not a complete JPEG or PNG"):
        make_longtail_rec(src, tmp_path / "out", num_head=12, progress=False)
    assert not list((tmp_path / "out").glob("train.*"))


def test_a_garbage_property_is_refused_before_anything_is_written(source, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(source[0], src)
    (src / "property").write_bytes(b"\x89\x00garbage\n")
    with pytest.raises(ValueError, match=r"property holds .*expected 'num_classes,height,width'"):
        make_longtail_rec(src, tmp_path / "out", num_head=2, progress=False)
    assert not (tmp_path / "out").exists()


def test_a_dropped_idx_line_names_the_key(source, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(source[0], src)
    lines = (src / "train.idx").read_text().splitlines(keepends=True)
    (src / "train.idx").write_text("".join(line for line in lines if not line.startswith("6\t")))
    rc = make_longtail_rec_tool().main(["--src", str(src), "--dst", str(tmp_path / "out"), "--num-head", "12",
                                        "--no-progress"])
    assert rc == 1
    with pytest.raises(ValueError, match=r"train\.idx has no line for image key 6 of identity record 1"):
        make_longtail_rec(src, tmp_path / "out", num_head=12, progress=False)
