"""Cache blocks (core.blocks) and the blocked / in-place / lazily drawn paths of leap_logits: the
same values and gradients as the whole-tensor computation, bit for bit, and the float64 formula."""
import pytest
import torch

import leap_plugin.core.blocks as tiles
from leap_plugin.core import leap_logits
from test_margins import reference


@pytest.mark.parametrize("rows,cols,elements", [(7, 5, 8), (3, 20, 8), (5, 17, 64), (4, 4, 100), (1, 1, 1)])
def test_blocks_tile_every_entry_once(rows, cols, elements):
    seen = torch.zeros(rows, cols, dtype=torch.long)
    for r, c in tiles.blocks(rows, cols, "cpu", elements):
        seen[r, c] += 1
        assert seen[r, c].numel() <= max(elements, cols if cols < elements else elements)
    assert torch.equal(seen, torch.ones_like(seen))
    assert list(tiles.blocks(rows, cols, "meta", elements)) == [(slice(0, rows), slice(0, cols))]


class BlockSource:
    """A [B, C] alpha handed out block by block (what the InsightFace loss's keyed alpha does)."""

    def __init__(self, alpha):
        self.alpha, self.shape, self.reads = alpha, alpha.shape, []

    def __getitem__(self, index):
        self.reads.append(index)
        return self.alpha[index].clone()

    def gather(self, dim, index):
        return self.alpha.gather(dim, index)


def _run(cosine, labels, alpha, margin, inplace=False):
    x = cosine.clone().requires_grad_()
    y = x * 1.0 if inplace else x  # in place needs a non-leaf, as PartialFC's clamp output
    out = leap_logits(y, labels, alpha, margin, scale=30.0, margin_value=0.3, inplace=inplace)
    weights = torch.linspace(-1, 1, out.numel()).reshape(out.shape)
    (out * weights).sum().backward()
    return out.detach(), x.grad, y


@pytest.mark.parametrize("margin", ["cos", "arc"])
@pytest.mark.parametrize("kind", ["per logit", "per sample", "source", "none"])
def test_blocked_inplace_and_source_equal_whole_tensor(margin, kind, monkeypatch):
    gen = torch.Generator().manual_seed(4)
    cosine = torch.rand(9, 13, generator=gen) * 2 - 1
    cosine[0, 0], cosine[1, 1] = 1.0, -1.0
    labels = torch.randint(0, 13, (9,), generator=gen)
    labels[3] = -1
    alpha = torch.randn(9, 13 if kind in ("per logit", "source") else 1, generator=gen) * 0.9
    whole_alpha = None if kind == "none" else alpha
    monkeypatch.setattr(tiles, "BLOCK_ELEMENTS", 1 << 30)
    out, grad, _ = _run(cosine, labels, whole_alpha, margin)
    torch.testing.assert_close(out.double(), reference(cosine, labels, whole_alpha, margin, 30.0, 0.3),
                               atol=1e-4, rtol=0)
    monkeypatch.setattr(tiles, "BLOCK_ELEMENTS", 5)  # 5-column pieces of single rows
    for inplace in (False, True):
        source = BlockSource(alpha) if kind == "source" else whole_alpha
        out_b, grad_b, given = _run(cosine, labels, source, margin, inplace)
        assert torch.equal(out_b, out) and torch.equal(grad_b, grad)
        assert torch.equal(given.detach(), out) == inplace  # the logits were written into the input
        if kind == "source":
            assert len(source.reads) == 9 * 3 and all(r.stop - r.start == 1 for r, _ in source.reads)


def test_inplace_errors_and_single_backward():
    cosine = torch.rand(4, 6) * 2 - 1
    labels = torch.tensor([0, 1, -1, 5])
    with pytest.raises(ValueError, match="float32"):
        leap_logits(cosine.double(), labels, None, "cos", inplace=True)
    with pytest.raises(RuntimeError, match="leaf"):
        leap_logits(cosine.clone().requires_grad_(), labels, None, "cos", inplace=True)
    x = cosine.clone().requires_grad_()
    out = leap_logits(x, labels, torch.rand(4, 6) * 0.2, "arc", scale=8.0, margin_value=0.2)
    out.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        out.sum().backward()
