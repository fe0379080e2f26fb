"""Fixtures shared by every test folder."""
import numpy as np
import pytest
from PIL import Image


def _check_png(path):
    """Assert ``path`` is a PNG with something drawn on it; returns its (height, width)."""
    with Image.open(path) as img:
        assert img.format == "PNG"
        img.load()
        pixels = np.asarray(img.convert("L"), dtype=np.float64)
    assert pixels.shape[0] > 100 and pixels.shape[1] > 100
    assert pixels.std() > 5  # something is drawn, not a blank canvas
    return pixels.shape


@pytest.fixture
def png():
    """``png(path)``: assert a plot was written as a real, non-blank PNG (returns its shape)."""
    return _check_png
