"""Cache-sized blocks for the [B, C] elementwise chains of the feature cloud.

The cloud's per-logit work (the alpha draw, Eq. 7 / 8 with alpha) is a chain of a dozen or more
elementwise passes. Over a whole [B, C] tensor on a CPU each pass streams the tensor through
memory, and each fresh [B, C] temporary costs page faults; over a block of ~128k elements the
chain runs in cache and the temporaries are small buffers the allocator reuses. On a GPU one
kernel per pass over the whole tensor is already the fast way: there the whole tensor is one block.
"""
import torch

__all__ = ["blocks", "BLOCK_ELEMENTS"]

BLOCK_ELEMENTS = 1 << 17  # 512 KiB of float32: the chain's few buffers stay in L2 / L3


def blocks(rows: int, cols: int, device, elements=None):
    """``(row slice, column slice)`` pairs that tile a [rows, cols] tensor, row-major.

    On CPU each block holds about ``elements`` (default ``BLOCK_ELEMENTS``) entries: whole rows
    when a row is shorter, else one row cut into column ranges. On any other device a single
    block covers everything. A loop over these is a loop over fixed-size tiles (B * C / elements
    of them), not over samples or classes.
    """
    elements = BLOCK_ELEMENTS if elements is None else elements
    if torch.device(device).type != "cpu" or rows * cols <= elements:
        yield slice(0, rows), slice(0, cols)
        return
    if cols >= elements:
        for r in range(rows):
            for c in range(0, cols, elements):
                yield slice(r, r + 1), slice(c, min(c + elements, cols))
    else:
        step = elements // cols
        for r in range(0, rows, step):
            yield slice(r, min(r + step, rows)), slice(0, cols)
