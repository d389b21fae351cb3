"""Integer arithmetic shared by ``lower_to_integer`` (integer codes) and ``eval_form`` (float values).

Both graphs take every constant from the functions here, so they requantize with the same numbers:

    grid            a uniform per-tensor activation grid: x̂ = (q − z)·s, q ∈ [qmin, qmax]
    dyadic(M)       M ≈ M0 · 2^−n with M0 ∈ [2^(b−1), 2^b), b = 31 significant bits, n ≥ 1
    rounding        round half up: ⌊p · 2^−n + ½⌋ = (p + 2^(n−1)) >> n (arithmetic shift), on int64
    conv            acc = Σ (q_x − z_x)(q_w − z_w) + b_int,  b_int = round(H / (G·s_x·s_w)) (a constant)
                    q_out = clamp(⌊acc·M0·2^−n + ½⌋ + z_out),  M = G·s_x·s_w / s_out
                    where the layer's float output is G ⊙ conv(x̂, Ŵ) + H per channel (bias, kept
                    BN, QC and the bias-correction buffer all land in G and H)
    add / concat    q_out = clamp((Σ_i (q_i − z_i)·M0_i + 2^(n−1)) >> n + z_out), one n for all inputs
    lookup table    table[q − qmin] = Q_out(act(x̂(q))) for every code q of the input grid
    matmul, softmax for attention: ``integer_attention`` (same rules)

Overflow: with X = max|q_x − z_x| and per channel c, |acc_c| ≤ X·Σ_k|w_ck| + |b_c|
(≤ K·X·max|w| + |b|), and every partial sum obeys the same bound; int32 accumulation is used when
it is below 2^31, int64 otherwise (``ConvRequant.accumulator``). The requantization product
|acc|·M0 + 2^(n−1) must fit int64 too: a layer whose bound B passes 2^31 gets a multiplier of
b = 62 − bitlength(B) bits instead of 31 (``ConvRequant.multiplier_bits``; fewer than 16 is refused).
A matmul's bound is K·A·B (K the inner size, A, B the operands' largest |q − z|); K grows with the
image (attention over H·W tokens), so it is taken as max(K of the example, 4096) and the integer
module refuses a longer K at run time (``MatmulRequant.max_inner``). Softmax sums stay in int64 for
rows up to ``SoftmaxRequant.max_length`` (about 2^15 at any output width; refused beyond).
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from yoloq.quantizers.fake_quantize import FakeQuantize
from yoloq.quantizers.packing import pack_codes, unpack_codes

INT32_LIMIT = 2**31
M0_BITS = 31
MIN_M0_BITS = 16


class LoweringError(ValueError):
    """The quantized model holds something the integer graph cannot compute; names the node."""


@dataclasses.dataclass(frozen=True)
class Grid:
    scale: float
    zero_point: int
    qmin: int
    qmax: int
    quantizer: FakeQuantize | None  # the module whose grid this is (None in a stored integer module)

    def numbers(self) -> Grid:
        """The grid without its quantizer, for integer modules to keep (no tie to the float model)."""
        return dataclasses.replace(self, quantizer=None)

    @property
    def max_centred(self) -> int:
        return max(abs(self.qmin - self.zero_point), abs(self.qmax - self.zero_point))


def check_uniform(fq: FakeQuantize | None, where: str) -> FakeQuantize:
    if fq is None:
        raise LoweringError(f"{where}: not quantized (kept in float by the recipe?); the integer graph "
                            "needs a quantizer here")
    if not fq.is_calibrated:
        raise LoweringError(f"{where}: quantizer is not calibrated; calibrate (yoloq.quantize) before lowering")
    if fq.spec.scheme != "uniform":
        raise LoweringError(f"{where}: {fq.spec.scheme} grid is not supported by the integer lowering "
                            "(uniform grids only); quantize this layer with scheme: uniform")
    if fq.spec.learned == "lsq+":
        raise LoweringError(f"{where}: LSQ+ float offsets are not supported by the integer lowering; "
                            "use learned: lsq or none")
    return fq


def grid_of(fq: FakeQuantize | None, where: str) -> Grid:
    """The per-tensor grid of an activation quantizer."""
    fq = check_uniform(fq, where)
    scale = fq._scale().detach()
    if scale.numel() != 1:
        raise LoweringError(f"{where}: per-channel activation grids are not supported (one scale per tensor)")
    zero_point = 0 if fq.zero_point is None else int(fq.zero_point.detach().reshape(-1)[0])
    return Grid(float(scale), zero_point, fq.spec.qmin, fq.spec.qmax, fq)


def dyadic(multiplier: torch.Tensor, where: str, bits: int = M0_BITS) -> tuple[torch.Tensor, torch.Tensor]:
    """(M0, n) as int64 tensors with M ≈ M0·2^−n, |M0| ∈ [2^(bits−1), 2^bits), n ≥ 1 (M0 = 0 for M = 0)."""
    m0, n = [], []
    for m in multiplier.double().flatten().tolist():
        if m == 0.0:
            m0.append(0), n.append(1)
            continue
        fraction, exponent = math.frexp(abs(m))  # |m| = f·2^e, f ∈ [0.5, 1)
        mantissa, shift = round(fraction * 2**bits), bits - exponent
        if mantissa == 2**bits:
            mantissa, shift = mantissa // 2, shift - 1
        if shift < 1:
            raise LoweringError(f"{where}: requantization multiplier {m:.3g} is too large (≥ 2^30)")
        if shift > 62:  # |acc·M0| < 2^62 (see conv_requant), so the result rounds to 0
            mantissa, shift = 0, 1
        m0.append(int(math.copysign(mantissa, m))), n.append(shift)
    return torch.tensor(m0, dtype=torch.int64), torch.tensor(n, dtype=torch.int64)


def round_shift(product: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """⌊product · 2^−shift + ½⌋ on int64 (round half up)."""
    return (product + torch.bitwise_left_shift(torch.ones_like(shift), shift - 1)) >> shift


def clamp_codes(values: torch.Tensor, grid: Grid) -> torch.Tensor:
    return torch.clamp(values + grid.zero_point, grid.qmin, grid.qmax).to(torch.int32)


# ----------------------------------------------------------------------------- conv
@dataclasses.dataclass
class ConvRequant:
    """Everything an integer conv needs; built once, used by both graphs."""

    codes: torch.Tensor  # int32 weight codes q_w
    weight_zero: torch.Tensor  # int32 z_w, broadcast against the codes (0 on a symmetric grid)
    bits: int
    signed: bool
    bias: torch.Tensor  # int64 per output channel, in the accumulator domain
    m0: torch.Tensor
    shift: torch.Tensor
    accumulator: torch.dtype  # int32, or int64 when the bound says int32 may overflow
    bound: int  # max over channels of X·Σ|w| + |b|
    multiplier_bits: int  # of M0: 31, fewer when |acc|·M0 would not fit int64
    stride: tuple
    padding: tuple
    dilation: tuple
    groups: int

    @property
    def weight(self) -> torch.Tensor:
        """q_w − z_w as int32."""
        return (self.codes - self.weight_zero).to(torch.int32)


def layer_affine(qlayer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(G, H) per output channel with the layer's pre-activation = G ⊙ conv(x̂, Ŵ) + H (no bias in conv)."""
    layer = qlayer.layer
    channels = layer.out_channels
    zero = torch.zeros(channels, dtype=torch.float64)
    bias = zero if layer.bias is None else layer.bias.detach().double()
    gain = torch.ones(channels, dtype=torch.float64)
    if qlayer.fold_bn:
        gain = 1.0 / qlayer.bn_factor().detach().double()
    else:
        correction = qlayer._buffers.get("bias_correction")
        if correction is not None and qlayer.weight_quant is not None and qlayer.weight_quant.quantizing:
            bias = bias - correction.detach().double()
    if qlayer.has_qc:
        gamma, beta = qlayer.qc_scale.detach().double(), qlayer.qc_shift.detach().double()
        gain, bias = gain * gamma, bias * gamma + beta
    bn = qlayer.bn
    if bn is not None:
        k = torch.rsqrt(bn.running_var.double() + bn.eps)
        k = k * bn.weight.detach().double() if bn.affine else k
        shift = bn.bias.detach().double() if bn.affine else zero
        gain, bias = gain * k, k * (bias - bn.running_mean.double()) + shift
    return gain, bias


def conv_requant(qlayer: nn.Module, x: Grid, out: Grid, where: str) -> ConvRequant:
    layer = qlayer.layer
    if not isinstance(layer, nn.Conv2d) or isinstance(layer, nn.ConvTranspose2d):
        raise LoweringError(f"{where}: {type(layer).__name__} is not supported (Conv2d only); keep it float "
                            "through the recipe")
    if layer.padding_mode != "zeros" or isinstance(layer.padding, str):
        raise LoweringError(f"{where}: padding {layer.padding!r} / mode {layer.padding_mode!r} is not supported")
    wq = check_uniform(qlayer.weight_quant, f"{where} weight")
    with torch.no_grad():
        weight = qlayer.effective_weight().detach()
        codes = wq.codes(weight)
        w_zero = torch.zeros((), dtype=torch.int32) if wq.spec.symmetric else \
            wq._expand(wq.zero_point).detach().round().to(torch.int32)
        w_scale = wq._scale().detach().double().expand(weight.shape).flatten(1)[:, 0]
    centred = (codes - w_zero).to(torch.int32)
    gain, shift = layer_affine(qlayer)
    if bool((gain == 0).any()):
        raise LoweringError(f"{where}: a channel's gain (BN or QC scale) is 0; its bias cannot enter the accumulator")
    step = gain * x.scale * w_scale  # accumulator step in float units, per channel
    bias = torch.round(shift / step).to(torch.int64)
    bound = int((x.max_centred * centred.abs().to(torch.int64).flatten(1).sum(1) + bias.abs()).max())
    accumulator = torch.int32 if bound < INT32_LIMIT else torch.int64
    bits = min(M0_BITS, 62 - bound.bit_length())  # |acc|·|M0| < 2^bitlength(B) · 2^bits ≤ 2^62
    if bits < MIN_M0_BITS:
        raise LoweringError(f"{where}: accumulator bound {bound} leaves {bits} bits for the requantization "
                            "multiplier in int64; the bias is too large for its accumulator step s_x·s_w")
    m0, n = dyadic(step / out.scale, where, bits)
    return ConvRequant(codes, w_zero, wq.spec.bits, wq.spec.signed, bias, m0, n, accumulator, bound, bits,
                       layer.stride, layer.padding, layer.dilation, layer.groups)


class IntConv2d(nn.Module):
    """codes on grid x → codes on grid out: integer conv, bias, dyadic requantization.

    The weight codes are stored packed (``packed_weight``, ``bits`` per code, quantizers/packing.py);
    ``weight`` is their unpacked working copy q_w − z_w, rebuilt on load and never saved."""

    def __init__(self, p: ConvRequant, x: Grid, out: Grid):
        super().__init__()
        self.bits, self.signed, self.shape = p.bits, p.signed, tuple(p.codes.shape)
        self.register_buffer("packed_weight", pack_codes(p.codes, p.bits, p.signed))
        self.register_buffer("weight_zero", p.weight_zero)
        self.register_buffer("bias", p.bias.to(p.accumulator))
        self.register_buffer("m0", p.m0.view(1, -1, 1, 1))
        self.register_buffer("shift", p.shift.view(1, -1, 1, 1))
        self.register_buffer("weight", self._unpacked(), persistent=False)
        self.x_zero, self.out = x.zero_point, out.numbers()
        self.conv = dict(stride=p.stride, padding=p.padding, dilation=p.dilation, groups=p.groups)

    def _unpacked(self) -> torch.Tensor:
        codes = unpack_codes(self.packed_weight, self.bits, self.signed, math.prod(self.shape)).view(self.shape)
        return (codes - self.weight_zero).to(self.bias.dtype)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self.weight = self._unpacked()

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        acc = F.conv2d((codes - self.x_zero).to(self.weight.dtype), self.weight, self.bias, **self.conv)
        return clamp_codes(round_shift(acc.to(torch.int64) * self.m0, self.shift), self.out)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, accumulator={self.weight.dtype}, out=[{self.out.qmin}, {self.out.qmax}]"


# ----------------------------------------------------------------------------- tables
@torch.no_grad()
def lookup_table(fn, x: Grid, out: Grid) -> torch.Tensor:
    """table[q − qmin] = codes of ``out`` for fn(x̂(q)), over every code of ``x`` (as int32)."""
    codes = torch.arange(x.qmin, x.qmax + 1, dtype=torch.int32)
    return out.quantizer.codes(fn(x.quantizer.dequantize(codes)))


class Lut(nn.Module):
    def __init__(self, table: torch.Tensor, x: Grid):
        super().__init__()
        fits = [t for t in (torch.uint8, torch.int8, torch.int16) if
                torch.iinfo(t).min <= int(table.min()) and int(table.max()) <= torch.iinfo(t).max]
        self.register_buffer("table", table.to(fits[0] if fits else torch.int32))
        self.x_min = x.qmin

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        return torch.take(self.table, (codes - self.x_min).to(torch.int64)).to(torch.int32)


# ----------------------------------------------------------------------------- add, concat, resize
@dataclasses.dataclass
class SumRequant:
    m0: list[int]  # one per input (signed: −M0 for a subtracted input)
    shift: int


def sum_requant(inputs: list[Grid], signs: list[int], out: Grid, where: str) -> SumRequant:
    """One shift for all inputs, chosen from the largest multiplier: Σ_i (q_i − z_i)·M0_i."""
    ratios = torch.tensor([g.scale / out.scale for g in inputs], dtype=torch.float64)
    _, shift = dyadic(ratios.max().reshape(1), where)
    n = int(shift)
    return SumRequant([s * int(round(float(r) * 2**n)) for s, r in zip(signs, ratios)], n)


class IntSum(nn.Module):
    """Integer Add / Sub: every input requantized to the output grid in one rounding."""

    def __init__(self, p: SumRequant, inputs: list[Grid], out: Grid):
        super().__init__()
        self.m0, self.shift, self.zeros, self.out = p.m0, p.shift, [g.zero_point for g in inputs], out.numbers()

    def forward(self, *codes: torch.Tensor) -> torch.Tensor:
        total = sum((c.to(torch.int64) - z) * m for c, z, m in zip(codes, self.zeros, self.m0))
        return clamp_codes((total + (1 << (self.shift - 1))) >> self.shift, self.out)


class IntRequantize(nn.Module):
    """Codes on one grid to codes on another (a Concat input under the ``requantize`` policy)."""

    def __init__(self, x: Grid, out: Grid, where: str):
        super().__init__()
        self.inner = IntSum(sum_requant([x], [1], out, where), [x], out)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        return self.inner(codes)


class UpsampleNearestCodes(nn.Module):
    """Nearest upsampling by integer factors, as index repetition (exactly F.interpolate 'nearest')."""

    def __init__(self, factors: tuple[int, ...]):
        super().__init__()
        self.factors = factors

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        for dim, factor in enumerate(self.factors, start=2):
            codes = codes.repeat_interleave(factor, dim=dim)
        return codes


def upsample_factors(module: nn.Upsample, where: str) -> tuple[int, int]:
    factor = module.scale_factor
    factors = tuple(factor) if isinstance(factor, (tuple, list)) else (factor, factor)
    if module.size is not None or factor is None or any(float(f) != int(f) for f in factors):
        raise LoweringError(f"{where}: nearest upsampling needs integer scale factors, got "
                            f"size={module.size}, scale_factor={factor}")
    return tuple(int(f) for f in factors)


# ----------------------------------------------------------------------------- boundary
class QuantizeInput(nn.Module):
    """Float input → integer codes (the one float op before the integer graph)."""

    def __init__(self, quantizer: FakeQuantize):
        super().__init__()
        self.quantizer = quantizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quantizer.codes(x)


class DequantizeOutput(nn.Module):
    """Head codes → float values, (q − z)·s, exactly what the fake quantizer returns for those codes."""

    def __init__(self, quantizer: FakeQuantize):
        super().__init__()
        self.quantizer = quantizer

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        return self.quantizer.dequantize(codes)
