"""Integer matmul and softmax for attention blocks (YOLO11's C2PSA), with the rules of
``integer_ops`` (module docstring there: dyadic multipliers, round half up, overflow bounds):

    matmul          acc = (q_a − z_a) @ (q_b − z_b) (integer matmul), M = s_a·s_b / s_out,
                    q_out = clamp(⌊acc·M0·2^−n + ½⌋ + z_out)
    softmax (last)  d = max_row(q) − q ≥ 0, e = E[d] = round(2^30·exp(−d·s_in)) (int32), S = Σ_row e,
                    1/s_out ≈ R0·2^−r:  q_out = clamp(z_out + ⌊(2·e·R0 + S·2^r) / (2·S·2^r)⌋)

``lower_to_integer`` builds the modules, ``eval_form`` the same arithmetic from the same constants.
"""
from __future__ import annotations

import dataclasses
import math
import torch
from torch import nn

from yoloq.passes.integer_ops import INT32_LIMIT, M0_BITS, MIN_M0_BITS, Grid, LoweringError, clamp_codes, dyadic

MATMUL_MIN_INNER = 4096  # the accumulator and multiplier are sized for inner dimensions at least this long
EXP_BITS = 30  # softmax: e = round(2^30·exp(−d·s_in)) ∈ [0, 2^30] fits int32


@dataclasses.dataclass
class MatmulRequant:
    m0: int
    shift: int
    accumulator: torch.dtype  # int32, or int64 when K·A·B may pass 2^31
    bound: int  # K·A·B for the design K
    multiplier_bits: int
    max_inner: int  # the longest K for which the accumulator and acc·M0 cannot overflow


def matmul_requant(a: Grid, b: Grid, out: Grid, inner: int, where: str) -> MatmulRequant:
    """Integer matmul of two quantized tensors with ``inner`` = K in the example run."""
    per_term = a.max_centred * b.max_centred
    bound = max(inner, MATMUL_MIN_INNER) * per_term
    accumulator = torch.int32 if bound < INT32_LIMIT else torch.int64
    bits = min(M0_BITS, 62 - bound.bit_length())
    if bits < MIN_M0_BITS:
        raise LoweringError(f"{where}: accumulator bound {bound} (K={inner}) leaves {bits} bits for the "
                            "requantization multiplier in int64; quantize the operands to fewer bits")
    m0, n = dyadic(torch.tensor([a.scale * b.scale / out.scale]), where, bits)
    limit = INT32_LIMIT if accumulator == torch.int32 else 2 ** (62 - bits)  # |acc| and |acc·M0| < 2^62
    return MatmulRequant(int(m0), int(n), accumulator, bound, bits, (limit - 1) // max(per_term, 1))


def requantize(acc: torch.Tensor, m0: int, shift: int, out: Grid) -> torch.Tensor:
    """clamp(⌊acc·M0·2^−n + ½⌋ + z_out) of an exact int64 accumulator."""
    return clamp_codes((acc * m0 + (1 << (shift - 1))) >> shift, out)


class IntMatmul(nn.Module):
    """codes a @ codes b → codes: acc = (q_a − z_a) @ (q_b − z_b), then dyadic requantization, round half up.

    The accumulator is a true integer matmul: ``torch.matmul`` on int32 (int64 where K·A·B may pass
    2^31) CPU tensors, exact whatever the summation order while no partial sum overflows, which
    ``max_inner`` guarantees. A float64 matmul would also be exact (integers below 2^53), but it is a
    float op on activations in the integer graph; the evaluation form uses it instead
    (``EvalFormMatmul``), so the two graphs compute the accumulator independently. (Integer matmul,
    like the integer conv2d of ``IntConv2d``, is a CPU kernel: the integer graph runs on the CPU.)"""

    def __init__(self, p: MatmulRequant, a: Grid, b: Grid, out: Grid):
        super().__init__()
        self.m0, self.shift, self.accumulator, self.max_inner = p.m0, p.shift, p.accumulator, p.max_inner
        self.zeros, self.out = (a.zero_point, b.zero_point), out.numbers()

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if a.shape[-1] > self.max_inner:
            raise LoweringError(f"integer matmul over K={a.shape[-1]} > {self.max_inner} could overflow "
                                "its accumulator; quantize and lower the model at this input size")
        a, b = ((t - z).to(self.accumulator) for t, z in zip((a, b), self.zeros))
        return requantize(torch.matmul(a, b).to(torch.int64), self.m0, self.shift, self.out)

    def extra_repr(self) -> str:
        return f"accumulator={self.accumulator}, M0={self.m0}, n={self.shift}, max_inner={self.max_inner}"


@dataclasses.dataclass
class SoftmaxRequant:
    exp_table: torch.Tensor  # int32 E[d] = round(2^EXP_BITS·exp(−d·s_in)), d = 0 .. qmax − qmin
    r0: int  # 1/s_out ≈ r0·2^−r_shift
    r_shift: int
    max_length: int  # the longest row whose int64 numerator and denominator cannot overflow


def softmax_requant(x: Grid, out: Grid, length: int, where: str) -> SoftmaxRequant:
    """Softmax over the last dim of a row of ``length`` codes on ``x`` to codes on ``out``."""
    d = torch.arange(x.qmax - x.qmin + 1, dtype=torch.float64)
    table = torch.round(torch.exp(-d * x.scale) * 2**EXP_BITS).to(torch.int32)
    bits = min(M0_BITS, int(math.log2(out.qmax - out.qmin + 1)) + 16)  # R0's error stays < 2^−16 steps
    r0, r = (int(t) for t in dyadic(torch.tensor([1.0 / out.scale]), where, bits))
    # numerator 2·e·R0 + S·2^r ≤ 2^(k+1)·R0 + L·2^(k+r), denominator 2·S·2^r ≤ L·2^(k+r+1), S ≤ L·2^k
    max_length = (2**63 - 1 - 2 ** (EXP_BITS + 1) * r0) // 2 ** (EXP_BITS + r + 1)
    if max_length < length:
        raise LoweringError(f"{where}: softmax rows of {length} on an output step of {out.scale:.3g} overflow "
                            "the int64 division; quantize the softmax output to a finer grid")
    return SoftmaxRequant(table, r0, r, max_length)


class IntSoftmax(nn.Module):
    """Softmax over the last dim on codes: exponentials from a table over code differences, an
    int64 row sum, and one integer division that rounds half up (module docstring's formula)."""

    def __init__(self, p: SoftmaxRequant, out: Grid):
        super().__init__()
        self.register_buffer("exp_table", p.exp_table)
        self.r0, self.r_shift, self.max_length, self.out = p.r0, p.r_shift, p.max_length, out.numbers()

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        if codes.shape[-1] > self.max_length:
            raise LoweringError(f"integer softmax over {codes.shape[-1]} > {self.max_length} elements could "
                                "overflow int64; quantize and lower the model at this input size")
        codes = codes.to(torch.int64)
        e = torch.take(self.exp_table, codes.amax(dim=-1, keepdim=True) - codes).to(torch.int64)
        total = e.sum(dim=-1, keepdim=True) << self.r_shift  # S·2^r; S ≥ 2^k: the row's max has d = 0
        quotient = torch.div(2 * e * self.r0 + total, 2 * total, rounding_mode="floor")
        return clamp_codes(quotient, self.out)

    def extra_repr(self) -> str:
        return f"table={self.exp_table.numel()}, R0={self.r0}, r={self.r_shift}, max_length={self.max_length}"
