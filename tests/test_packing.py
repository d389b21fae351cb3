"""Bit packing: exact round trip for every width, dense size, the documented layout, range errors."""
from __future__ import annotations

import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from yoloq.quantizers.packing import code_range, pack_codes, packed_nbytes, unpack_codes


@st.composite
def codes_and_width(draw):
    bits = draw(st.integers(2, 16))
    signed = draw(st.booleans())
    low, high = code_range(bits, signed)
    # Lengths around and off multiples of 8 exercise the padded last block; 0 is the empty tensor.
    values = draw(st.lists(st.integers(low, high), min_size=0, max_size=70))
    return torch.tensor(values, dtype=torch.int64), bits, signed


@settings(deadline=None, max_examples=100)
@given(codes_and_width())
def test_round_trip_and_size(case):
    codes, bits, signed = case
    packed = pack_codes(codes, bits, signed)
    assert packed.dtype == torch.uint8 and packed.dim() == 1
    assert packed.numel() == packed_nbytes(codes.numel(), bits) == -(-codes.numel() * bits // 8)
    unpacked = unpack_codes(packed, bits, signed, codes.numel())
    assert unpacked.dtype == torch.int32
    assert torch.equal(unpacked, codes.to(torch.int32))


def test_round_trip_large_random_tensor():
    generator = torch.Generator().manual_seed(0)
    for bits, signed in [(3, True), (4, False), (13, True)]:
        low, high = code_range(bits, signed)
        codes = torch.randint(low, high + 1, (1001, 77), generator=generator)
        packed = pack_codes(codes, bits, signed)
        assert torch.equal(unpack_codes(packed, bits, signed, codes.numel()), codes.flatten().to(torch.int32))


def test_layout_is_dense_lsb_first():
    assert pack_codes(torch.tensor([1, 2, 15]), 4, signed=False).tolist() == [0x21, 0x0F]
    # Signed codes are offset by 2^(bits-1): -8 -> 0, 7 -> 15.
    assert pack_codes(torch.tensor([-8, 7]), 4, signed=True).tolist() == [0xF0]
    # Eight 3-bit codes in three bytes: 1 | 2<<3 | (3&3)<<6, 3>>2 | 4<<1 | 5<<4 | (6&1)<<7, 6>>1 | 7<<2 | 0<<5.
    assert pack_codes(torch.tensor([1, 2, 3, 4, 5, 6, 7, 0]), 3, signed=False).tolist() == [0xD1, 0x58, 0x1F]
    assert pack_codes(torch.tensor([0x1234]), 16, signed=False).tolist() == [0x34, 0x12]


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64])
def test_any_integer_dtype_and_shape(dtype):
    codes = torch.tensor([[1, 2], [3, 4]], dtype=dtype)
    assert pack_codes(codes, 4, signed=False).tolist() == [0x21, 0x43]


@pytest.mark.parametrize("bits, signed, values, found", [
    (4, True, [-9, 0, 7], "min -9, max 7"),
    (4, True, [0, 8], "min 0, max 8"),
    (3, False, [-1, 2], "min -1, max 2"),
    (2, False, [0, 4], "min 0, max 4"),
    (16, True, [40000], "min 40000, max 40000"),
])
def test_out_of_range_codes_are_rejected(bits, signed, values, found):
    low, high = code_range(bits, signed)
    with pytest.raises(ValueError, match=re.escape(f"[{low}, {high}]: {found}")):
        pack_codes(torch.tensor(values), bits, signed)


@pytest.mark.parametrize("bits", [1, 17, 4.0, True])
def test_bad_bits(bits):
    with pytest.raises(ValueError, match="bits: .* is not an integer in \\[2, 16\\]"):
        pack_codes(torch.tensor([0]), bits, signed=False)


def test_bad_inputs():
    with pytest.raises(ValueError, match="codes: expected an integer tensor, got a 1-D torch.float32"):
        pack_codes(torch.tensor([0.5]), 4, signed=False)
    with pytest.raises(ValueError, match="packed: expected a 1-D uint8 tensor"):
        unpack_codes(torch.zeros(2, dtype=torch.int32), 4, False, 4)
    with pytest.raises(ValueError, match="packed: 2 bytes, but 5 codes of 4 bits take 3"):
        unpack_codes(torch.zeros(2, dtype=torch.uint8), 4, False, 5)
    with pytest.raises(ValueError, match="numel: -1"):
        unpack_codes(torch.zeros(0, dtype=torch.uint8), 4, False, -1)
