"""Counter-based normal draws: alpha as a pure function of (seed, step, row, column).

The feature cloud's alpha (Eq. 7 / 8) under model parallelism (arcface_torch's PartialFC) is split
over ranks that each hold a block of the class columns; a row's alpha must be the same whatever
rank draws it, the world size or the sampled columns. A seeded ``torch.Generator`` only gives that
for one draw per row (its stream depends on the tensor shape it fills). :class:`KeyedNormal` is a
table of standard normal draws z[row, column] computed where it is read, from integer hashes of
the ids: any subset of rows and columns gets the values the full table has there, on any device.
:class:`CloudAlpha` turns a table into a ``leap_logits`` block source (alpha drawn block by block,
never held whole as a [B, C] tensor).
"""
import math

import torch

from .blocks import blocks

__all__ = ["KeyedNormal", "keyed_normal", "CloudAlpha", "step_key"]

_M32 = 0xFFFFFFFF

def _mix32(x):
    """A 32-bit integer hash (avalanching) of python ints or int64 tensors holding [0, 2^32).

    Multipliers are below 2^27, so no int64 product overflows.
    """
    x = ((x >> 16) ^ x) * 0x45D9F3B & _M32
    x = ((x >> 16) ^ x) * 0x45D9F3B & _M32
    return (x >> 16) ^ x


def _int32(x):
    """The int32 with the bits of ``x`` (python int or int64 tensor in [0, 2^32))."""
    x = (x ^ 0x80000000) - 0x80000000
    return x.int() if torch.is_tensor(x) else x


# lowbias32 (C. Wellons, "hash prospector"): x ^= x >> 16; x *= M1; x ^= x >> 15; x *= M2; x ^= x >> 16
_LOWBIAS = ((16, 0x7FEB352D), (15, _int32(0x846CA68B)), (16, 1))


def _lowbias32(h, tmp):
    """lowbias32 of an int32 tensor, in place. int32 products wrap mod 2^32; a right shift of
    int32 copies the sign bit, so the shifted-in bits are masked off (a logical shift)."""
    for shift, mult in _LOWBIAS:
        torch.bitwise_right_shift(h, shift, out=tmp).bitwise_and_((1 << (32 - shift)) - 1)
        h.bitwise_xor_(tmp)
        if mult != 1:
            h.mul_(mult)
    return h


class KeyedNormal:
    """The table of standard normal draws z[i, j], a pure function of ``(key, rows[i], cols[j])``,
    drawn where it is read: ``half_var(r, c)`` (slices) gives a block of z / sqrt(2),
    ``half_var_gather(index)`` the entries ``z[i, index[i, k]] / sqrt(2)``, ``full()`` all of z.

    Any subset of rows/columns gets the values the full table has at those places, on any device:
    this is what lets every rank draw its shard of a row's alpha without communication.

    Each row and each column id is hashed once with the key (32 bits each); a draw hashes the XOR
    of its row's and column's hashes (lowbias32), takes the top 24 bits as an odd multiple u of
    2^-24 in (-1, 1) (uniform, symmetric, never +-1) and returns the inverse normal CDF of
    (u + 1) / 2, i.e. sqrt(2) erfinv(u): one 32-bit hash and one erfinv per draw, in int32 and
    float32. The tails reach sqrt(2) erfinv(1 - 2^-24) = 5.3 (the 2^-25 quantile).

    Args:
        key: any non-negative python int (e.g. mixed from a seed and the step).
        rows: [B] int64 row ids.
        cols: None (one draw per row: a [B, 1] table) or [N] int64 column ids ([B, N]).
    """

    def __init__(self, key: int, rows: torch.Tensor, cols=None):
        k_row = _mix32(_mix32(key & _M32) ^ 0x68E31DA4)
        k_col = _mix32(_mix32((key >> 32) & _M32) ^ 0x1B56C4E9)
        self._rows = _int32(_mix32((rows.long() & _M32) ^ k_row))[:, None]
        self._cols = self._rows.new_zeros(1) if cols is None else _int32(_mix32((cols.long() & _M32) ^ k_col))
        self.shape = torch.Size((self._rows.shape[0], self._cols.shape[0]))

    @staticmethod
    def _erfinv(h, out=None):
        """erfinv(u) of the hashes ``h`` (int32, overwritten): N(0, 1/2) draws."""
        u = _lowbias32(h, torch.empty_like(h)).bitwise_right_shift_(7).bitwise_or_(1)
        return torch.erfinv(torch.mul(u, 2.0 ** -24), out=out)

    def half_var(self, rows: slice, cols: slice) -> torch.Tensor:
        """The block ``z[rows, cols] / sqrt(2)`` (N(0, 1/2) draws: the caller's scale absorbs the
        sqrt(2), one pass less)."""
        return self._erfinv(torch.bitwise_xor(self._rows[rows], self._cols[cols]))

    def half_var_gather(self, index: torch.Tensor) -> torch.Tensor:
        """``z[i, index[i, k]] / sqrt(2)``."""
        return self._erfinv(torch.bitwise_xor(self._rows, self._cols[index]))

    def full(self) -> torch.Tensor:
        """The whole [B, N] table, computed block by block (in cache on CPU: ``core.blocks``)."""
        out = torch.empty(self.shape, device=self._rows.device)
        for r, c in blocks(*self.shape, out.device):
            self._erfinv(torch.bitwise_xor(self._rows[r], self._cols[c]), out=out[r, c]).mul_(math.sqrt(2.0))
        return out


def keyed_normal(key: int, rows: torch.Tensor, cols=None) -> torch.Tensor:
    """Standard normal draws that are a pure function of ``(key, row, col)``: the [B, 1] (cols
    None) or [B, N] table of :class:`KeyedNormal`."""
    return KeyedNormal(key, rows, cols).full()


class CloudAlpha:
    """Per-logit alpha = std[row] * z[row, col] (Eq. 7 / 8) over a :class:`KeyedNormal` table, as a
    block source for ``leap_logits`` (a block is drawn when it is read), or whole (``full``)."""

    def __init__(self, table: KeyedNormal, std: torch.Tensor, cloud):
        self.table, self.std, self.cloud = table, std, cloud
        self.shape = table.shape
        self._half_std = std * math.sqrt(2.0)  # z / sqrt(2) * (sqrt(2) std): one pass a block

    def __getitem__(self, index):
        block = self.table.half_var(*index)
        return self.cloud.alpha_from_noise(block, self._half_std[index[0]], block.shape[1])

    def gather(self, dim: int, index: torch.Tensor) -> torch.Tensor:
        if dim != 1:
            raise ValueError("the alpha of a block source is gathered along columns (dim=1)")
        return self.cloud.alpha_from_noise(self.table.half_var_gather(index), self._half_std, index.shape[1])

    def full(self) -> torch.Tensor:
        out = torch.empty(self.shape, device=self.std.device)
        for r, c in blocks(*self.shape, out.device):
            out[r, c] = self[r, c]
        return out


def step_key(seed: int, step: int) -> int:
    """A 64-bit key from (seed, step): two mixed 32-bit halves."""
    lo = _mix32((seed & _M32) ^ _mix32(step & _M32))
    hi = _mix32(((seed >> 32) & _M32) ^ _mix32((step >> 32) & _M32) ^ 0x9E3779B9)
    return (hi << 32) | lo
