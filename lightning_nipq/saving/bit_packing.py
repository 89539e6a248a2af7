"""Bit-packing signed integer codes at their true width, for the artifact."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_nipq.quant.codes import check_bit_width, code_dtype, num_levels

#: Values packed per vectorised step. A multiple of 8, so that every step but the last
#: ends on a byte boundary and the steps' bytes simply concatenate.
CHUNK = 1 << 16


def packed_size(numel: int, bits: int) -> int:
    """Bytes that ``numel`` codes of ``bits`` bits take once packed."""
    return (numel * bits + 7) // 8


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """Bit-pack signed codes in ``[-n, n]`` into a flat ``uint8`` tensor.

    Each code is stored as ``code + n`` in ``bits`` bits, least significant bit first, and
    the bits of consecutive codes follow each other with no gap, the stream filling each
    byte from its least significant bit; the last byte is padded with zeros.
    """
    n = num_levels(check_bit_width("bits", bits, signed=True), True)
    flat = codes.detach().reshape(-1).cpu().to(torch.int64) + n
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) > 2 * n):
        raise ValueError(f"codes outside [-{n}, {n}] cannot be packed in {bits} bits")
    value_shifts = torch.arange(bits, dtype=torch.int64)
    byte_weights = torch.pow(2, torch.arange(8, dtype=torch.int64))
    chunks = []
    for start in range(0, flat.numel(), CHUNK):
        stream = ((flat[start : start + CHUNK, None] >> value_shifts) & 1).reshape(-1)
        tail = -stream.numel() % 8
        if tail:
            stream = torch.cat([stream, stream.new_zeros(tail)])
        chunks.append((stream.view(-1, 8) * byte_weights).sum(1).to(torch.uint8))
    return torch.cat(chunks) if chunks else torch.zeros(0, dtype=torch.uint8)


def unpack_codes(packed: Tensor, bits: int, numel: int) -> Tensor:
    """Inverse of `pack_codes`: ``numel`` signed codes, flat, in `code_dtype`.

    Raises:
        ValueError: ``packed`` is not exactly the bytes `pack_codes` gives for ``numel``
            codes of ``bits`` bits: another size, a value above the code range, or padding
            bits that are not zero. Checked before anything is allocated from ``numel``.
    """
    n = num_levels(check_bit_width("bits", bits, signed=True), True)
    if isinstance(numel, bool) or not isinstance(numel, int) or numel < 0:
        raise ValueError(f"numel must be a whole number >= 0, got {numel!r}")
    expected = packed_size(numel, bits)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != expected:
        raise ValueError(
            f"{numel} codes of {bits} bits need a flat uint8 tensor of {expected} bytes, "
            f"got {packed.dtype} of shape {tuple(packed.shape)}"
        )
    used = numel * bits % 8
    # pack_codes pads with zeros: set padding bits are damage, and one layout per codes keeps files comparable.
    if used and int(packed[-1]) >> used:
        raise ValueError(f"the padding bits of the last byte are not zero ({int(packed[-1]):#010b}, {used} bits used)")
    bit_shifts = torch.arange(8, dtype=torch.int64)
    value_weights = torch.pow(2, torch.arange(bits, dtype=torch.int64))
    step = CHUNK * bits // 8
    values = []
    for index, start in enumerate(range(0, expected, step)):
        count = min(CHUNK, numel - index * CHUNK)
        stream = ((packed[start : start + step].to(torch.int64)[:, None] >> bit_shifts) & 1).reshape(-1)
        values.append((stream[: count * bits].view(count, bits) * value_weights).sum(1))
    unsigned = torch.cat(values) if values else torch.zeros(0, dtype=torch.int64)
    if unsigned.numel() and int(unsigned.max()) > 2 * n:
        raise ValueError(f"packed data holds values above {2 * n}, which no {bits}-bit code gives")
    return (unsigned - n).to(code_dtype(bits))
