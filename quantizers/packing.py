"""Dense bit packing of low-bit integer codes: how quantized weights are stored (DESIGN §7).

Codes are offset to unsigned (a signed ``b``-bit code gains ``2^(b-1)``), then written as one
little-endian bit stream: code ``i`` occupies stream bits ``[i*b, (i+1)*b)``, least significant bit
first, and stream bit ``k`` is bit ``k % 8`` of byte ``k // 8``. Two 4-bit codes share a byte (the
first in the low nibble), eight 3-bit codes fill three bytes, a 16-bit code is two little-endian
bytes, and the unused tail of the last byte is zero::

    3-bit codes c0..c7 -> byte0 = c0 | c1<<3 | (c2&3)<<6,  byte1 = c2>>2 | c3<<1 | c4<<4 | (c5&1)<<7, ...

Eight codes always fill exactly ``b`` bytes, so the codes are padded to a multiple of eight and
packed block by block. Which bits of which code land in which byte of a block is the same for
every block: a table of fewer than ``b + 8`` (code, byte, shift) entries, each applied as one
vectorised shift-and-mask over all blocks at once. There is no loop over elements.
"""
from __future__ import annotations

import functools

import torch

from yoloq.quantizers.spec import MAX_BITS, MIN_BITS

CODES_PER_BLOCK = 8  # eight codes of b bits are b whole bytes, for every b


def packed_nbytes(numel: int, bits: int) -> int:
    """Bytes that ``numel`` codes of ``bits`` bits take when packed: ``ceil(numel * bits / 8)``."""
    return -(-numel * bits // 8)


def code_range(bits: int, signed: bool) -> tuple[int, int]:
    """The inclusive integer range of a ``bits``-bit code (the same as ``QuantSpec.qmin/qmax``)."""
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)


def pack_codes(codes: torch.Tensor, bits: int, signed: bool) -> torch.Tensor:
    """Pack integer ``codes`` (any shape, any integer dtype) into a flat uint8 tensor."""
    _check_bits(bits)
    unsigned = _to_unsigned(codes, bits, signed)
    numel = unsigned.numel()
    padding = unsigned.new_zeros(-numel % CODES_PER_BLOCK)
    blocks = torch.cat([unsigned, padding]).view(-1, CODES_PER_BLOCK)
    out = blocks.new_zeros(blocks.shape[0], bits)
    for code, byte, shift in _layout(bits):
        out[:, byte] |= _shift_left(blocks[:, code], shift) & 0xFF
    return out.to(torch.uint8).flatten()[: packed_nbytes(numel, bits)]


def unpack_codes(packed: torch.Tensor, bits: int, signed: bool, numel: int) -> torch.Tensor:
    """The ``numel`` codes that ``pack_codes`` packed into ``packed``, flat, as int32."""
    _check_bits(bits)
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ValueError(f"packed: expected a 1-D uint8 tensor, got {_describe(packed)}")
    if not isinstance(numel, int) or isinstance(numel, bool) or numel < 0:
        raise ValueError(f"numel: {numel!r} is not a non-negative integer")
    expected = packed_nbytes(numel, bits)
    if packed.numel() != expected:
        raise ValueError(f"packed: {packed.numel()} bytes, but {numel} codes of {bits} bits take {expected}")
    blocks = -(-numel // CODES_PER_BLOCK)
    data = packed.to(torch.int32)
    data = torch.cat([data, data.new_zeros(blocks * bits - expected)]).view(blocks, bits)
    unsigned = data.new_zeros(blocks, CODES_PER_BLOCK)
    for code, byte, shift in _layout(bits):
        unsigned[:, code] |= _shift_left(data[:, byte], -shift)
    # Each term also carries the neighbouring code's bits above bit ``bits - 1``; drop them once.
    unsigned &= (1 << bits) - 1
    return unsigned.flatten()[:numel] + code_range(bits, signed)[0]


@functools.lru_cache(maxsize=None)
def _layout(bits: int) -> tuple[tuple[int, int, int], ...]:
    """(code, byte, shift) for every overlap of a code and a byte within one block.

    ``shift`` is the code's first stream bit minus the byte's: shifting the code left by it puts
    the code's bits where they sit in the byte (a negative shift drops bits that earlier bytes hold).
    """
    entries = []
    for code in range(CODES_PER_BLOCK):
        start = code * bits
        for byte in range(start // 8, (start + bits - 1) // 8 + 1):
            entries.append((code, byte, start - 8 * byte))
    return tuple(entries)


def _shift_left(values: torch.Tensor, shift: int) -> torch.Tensor:
    return values << shift if shift >= 0 else values >> -shift


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or isinstance(bits, bool) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits: {bits!r} is not an integer in [{MIN_BITS}, {MAX_BITS}]")


def _to_unsigned(codes: torch.Tensor, bits: int, signed: bool) -> torch.Tensor:
    """Flat int32 codes offset to ``[0, 2^bits - 1]``, after checking they fit ``bits``."""
    if not isinstance(codes, torch.Tensor) or codes.dtype.is_floating_point or codes.dtype.is_complex \
            or codes.dtype == torch.bool:
        raise ValueError(f"codes: expected an integer tensor, got {_describe(codes)}")
    low, high = code_range(bits, signed)
    if codes.numel():
        found_min, found_max = (int(v) for v in torch.aminmax(codes))
        if found_min < low or found_max > high:
            kind = "signed" if signed else "unsigned"
            raise ValueError(f"codes: out of range for {bits}-bit {kind} codes [{low}, {high}]: "
                             f"min {found_min}, max {found_max}")
    # The range check above makes the int32 cast exact whatever the input dtype.
    return codes.reshape(-1).to(torch.int32) - low


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dim()}-D {value.dtype} tensor"
    return type(value).__name__
