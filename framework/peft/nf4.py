"""4-bit NormalFloat (NF4) weight storage with double-quantised block constants (QLoRA, Dettmers et al. 2023),
stored bit for bit as bitsandbytes stores it (``quantize_4bit(quant_type="nf4", compress_statistics=True)``).

Code. NF4 has 16 values in [-1, 1]: 0, 8 positive and 7 negative quantiles of N(0, 1), each side normalised
to end at 1 (bitsandbytes' ``create_normal_map(offset=0.9677083)``)::

    positive = Phi^-1(linspace(offset, 0.5, 9)[:-1]),   negative = -Phi^-1(linspace(offset, 0.5, 8)[:-1])
    code     = sort(positive, 0, negative) / max

so that each code value is (about) equally likely for normally distributed weights, and 0 is exact.

Quantisation of a tensor W (flattened row-major; the last block may be partial):

    first level   blocks of ``block_size`` (64) elements: absmax_b = max |W_b|,
                  q_i = the code value nearest to W_i * (1 / absmax_b)    (4 bits, two per byte, first high)
    second level  the absmax values, their mean m subtracted, in blocks of ``scaler_block_size`` (256):
                  s_k = max |absmax - m| over block k,  qa_b = an index into bitsandbytes' signed 8-bit
                  *dynamic* code (``create_dynamic_map()``: 7 decades of linear fractions, 0 and 1)
    dequantise    W_i = code[q_i] * (dynamic[qa_b] * s_k + m)      (float32, then the weight's dtype)

Each step is the arithmetic of bitsandbytes 0.50 on the CPU, in float32 and in its order, so the stored bytes
are the same: the first level is its reference kernel (multiplication by the reciprocal, ``bucketize`` on
the midpoints of the code); the second is its C kernel, which does not search the dynamic code but looks
the scaled value up in a table of 65,536 evenly spaced points of [-1, 1], each holding the code index whose
midpoint interval contains it -- so a value within 1/65535 of a midpoint may take the farther neighbour,
and so do we (tests/peft/test_qlora_bnb.py compares every byte).

Stored bytes for n elements (B blocks = ceil(n / 64), K = ceil(B / 256)): ``ceil(n / 2) + B + 4 K + 4`` --
about 4.127 bits per element instead of 16 (bf16) or 32 (fp32).

Error. Per element, |W_i - deq_i| <= absmax_b * g / 2 + |absmax_b - absmax'_b|, with g the largest gap
between neighbouring code values (0.2773, between 0.7230 and 1) and absmax'_b the double-quantised
constant; the dynamic code's relative step is at most 1/9 of a decade, so |absmax_b - absmax'_b| is a few
percent of s_k at worst and far less for constants near the mean.

Why our own module: bitsandbytes stays an optional (test) dependency, and torchao's NF4Tensor (0.18)
requires the number of 64-blocks of a tensor to be a multiple of 256 (16384 elements), which neither
SmolLM2's projections (e.g. 960 x 576) nor the tiny test models meet. Here any shape quantises, and every
TP rank quantises its own shard.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn

#: the paper's offset: the quantile that maps to +-1 (chosen so the code is symmetric in probability mass)
NF4_OFFSET = 0.9677083

#: the dynamic code's table: this many evenly spaced points of [-1, 1] (bitsandbytes' CPU kernel)
_LUT_SIZE = 65536


@functools.lru_cache(maxsize=None)
def _nf4_code_cpu() -> torch.Tensor:
    p = torch.linspace(NF4_OFFSET, 0.5, 9)[:-1]  # float32, as the reference construction
    n = torch.linspace(NF4_OFFSET, 0.5, 8)[:-1]
    values = torch.cat([torch.special.ndtri(p.double()), -torch.special.ndtri(n.double()),
                        torch.zeros(1, dtype=torch.float64)])
    values = values.float().sort().values  # quantiles in float64, normalised in float32 (bitsandbytes' order)
    return values / values.max()


def nf4_code(device=None) -> torch.Tensor:
    """The 16 NF4 values, ascending, float32."""
    code = _nf4_code_cpu()
    return code if device is None else code.to(device)


@functools.lru_cache(maxsize=None)
def _dynamic_code_cpu() -> torch.Tensor:
    """bitsandbytes' ``create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8)``: 256 values."""
    data = []
    for i in range(7):  # decade 10^(i-6): 2^i evenly spaced fractions of (0.1, 1], both signs
        bounds = torch.linspace(0.1, 1, 2 ** i + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += ((10 ** (i - 6)) * means).tolist()
        data += (-(10 ** (i - 6)) * means).tolist()
    data += [0.0, 1.0]
    return torch.tensor(sorted(data), dtype=torch.float32)


@functools.lru_cache(maxsize=None)
def _dynamic_lut_cpu() -> torch.Tensor:
    """For each of 65,536 evenly spaced points of [-1, 1], the number of dynamic-code midpoints below it."""
    code = _dynamic_code_cpu()
    midpoints = 0.5 * (code[:-1] + code[1:])
    points = -1.0 + (2.0 * torch.arange(_LUT_SIZE, dtype=torch.float32)) / float(_LUT_SIZE - 1)
    return torch.searchsorted(midpoints, points).to(torch.uint8)


def dynamic_code(device=None) -> torch.Tensor:
    """The 256 values of the 8-bit dynamic code the block constants are stored in, ascending, float32."""
    code = _dynamic_code_cpu()
    return code if device is None else code.to(device)


def nf4_bytes(numel: int, block_size: int = 64, scaler_block_size: int = 256) -> int:
    """Bytes the quantised form of ``numel`` elements occupies (codes + 8-bit constants + fp32 scales + mean)."""
    blocks = math.ceil(numel / block_size)
    return math.ceil(numel / 2) + blocks + 4 * math.ceil(blocks / scaler_block_size) + 4


def _blocks(flat: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(flat zero-padded to whole blocks as rows, each row's max |x|): padding never changes a maximum."""
    rows = math.ceil(flat.numel() / size)
    padded = torch.cat([flat, flat.new_zeros(rows * size - flat.numel())]).view(rows, size)
    return padded, padded.abs().amax(dim=1)


def quantize_nf4_blocks(flat: torch.Tensor, block_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 values -> (packed 4-bit indices, ceil(n / 2) bytes; per-block absmax, float32)."""
    n = flat.numel()
    blocks, absmax = _blocks(flat, block_size)
    if n % block_size:  # bitsandbytes keeps the partial block's constant away from 0
        absmax[-1] = absmax[-1].clamp(min=1e-38)
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38))[:, None], -1, 1).reshape(-1)[:n + n % 2]
    code = nf4_code(flat.device)
    # an odd count ends with one pad value 0 (code index 7), as bitsandbytes pads the scaled values
    q = torch.bucketize(scaled, (code[:-1] + code[1:]) / 2, out_int32=True).to(torch.uint8)
    return (q[0::2] << 4) | q[1::2], absmax


def quantize_dynamic_blocks(flat: torch.Tensor, block_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 values -> (uint8 indices into :func:`dynamic_code`; per-block absmax, float32)."""
    n = flat.numel()
    blocks, absmax = _blocks(flat, block_size)
    scaled = (blocks * (1.0 / absmax)[:, None]).clamp(-1, 1)
    point = (((scaled + 1.0) * 0.5) * float(_LUT_SIZE - 1) + 0.5).to(torch.int64)  # truncation, as C's cast
    q = _dynamic_lut_cpu().to(flat.device)[point.clamp(0, _LUT_SIZE - 1)]
    q = torch.where((absmax == 0)[:, None], torch.zeros_like(q), q)  # an all-zero block: index 0, scale 0
    return q.reshape(-1)[:n], absmax


def _unpack(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack([packed >> 4, packed & 0xF], dim=1).view(-1)


def _runs(row_start: torch.Tensor) -> tuple[tuple[int, int, int], ...]:
    """Row starts -> maximal affine runs ``(rows, first start, stride)`` (a handful per weight)."""
    runs, starts, i = [], row_start.tolist(), 0
    while i < len(starts):
        stride = starts[i + 1] - starts[i] if i + 1 < len(starts) else 0
        j = i + 1
        while j < len(starts) and starts[j] - starts[j - 1] == stride:
            j += 1
        runs.append((j - i, starts[i], stride))
        i = j
    return tuple(runs)


class NF4Weight(nn.Module):
    """A frozen weight matrix stored as NF4; ``dequantize()`` gives it back in its original dtype.

    The blocks belong to *source* tensors quantised whole, exactly as bitsandbytes quantises each of them:
    ``NF4Weight(w)`` has one source, ``w`` itself; :meth:`from_sources` takes several full tensors (a
    checkpoint's q, k and v projections, say) and a function that lays them out as this weight (megatron's
    fused, TP-sharded matrix), so every TP layout holds the same quantised model. Buffers, each the
    bitsandbytes tensor of the same role, concatenated over the sources: ``codes`` (the packed 4-bit data
    of this weight's elements in its own row-major order, ``ceil(n / 2)`` bytes), ``qabsmax``
    (``quant_state.absmax``, uint8; of each source only the range of blocks this weight touches),
    ``absmax_scale`` (``quant_state.state2.absmax``) and ``absmax_mean`` (``quant_state.offset``, one per
    source). Where each row's elements sit in their source is kept as a few affine runs of row starts.

    It stands in for a layer's ``weight`` parameter: ``shape``/``dtype``/``device`` describe the dequantised
    matrix and ``requires_grad`` is False.
    """

    requires_grad = False

    def __init__(self, weight: torch.Tensor, block_size: int = 64, scaler_block_size: int = 256):
        super().__init__()
        self._setup([weight], lambda ts: ts[0], tuple(weight.shape), weight.dtype, weight.device, block_size,
                    scaler_block_size)

    @classmethod
    def from_sources(cls, sources, to_local, local_shape, dtype: torch.dtype, block_size: int = 64,
                     scaler_block_size: int = 256) -> "NF4Weight":
        """Quantise each full tensor of ``sources``; keep the elements ``to_local`` (a function of one tensor per
        source, shaped like it, to this weight; it may only select, reorder and concatenate) puts here."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._setup(list(sources), to_local, tuple(local_shape), dtype, sources[0].device, block_size,
                    scaler_block_size)
        return self

    def _setup(self, sources, to_local, shape, dtype, dev, block_size, scaler_block_size):
        if block_size < 2 or block_size % 2 or scaler_block_size < 1:
            raise ValueError(f"NF4: block_size must be an even number >= 2 and scaler_block_size >= 1, got "
                             f"{block_size} and {scaler_block_size}")
        self.block_size, self.scaler_block_size = bs, sbs = int(block_size), int(scaler_block_size)
        self._shape, self._dtype = shape, dtype
        n = math.prod(shape)
        if any(s.is_meta for s in sources):  # shapes only (parameter counting): one source, the weight itself
            blocks = math.ceil(n / bs)
            self._sources = ((0, blocks - 1, 0, 0),)
            self._runs = ((shape[0] if shape else 1, 0, (n // shape[0]) if shape else 0),)
            self.register_buffer("codes", torch.empty(math.ceil(n / 2), dtype=torch.uint8, device=dev))
            self.register_buffer("qabsmax", torch.empty(blocks, dtype=torch.uint8, device=dev))
            self.register_buffer("absmax_scale", torch.empty(math.ceil(blocks / sbs), dtype=torch.float32,
                                                             device=dev))
            self.register_buffer("absmax_mean", torch.empty(1, dtype=torch.float32, device=dev))
            return
        with torch.no_grad():
            codes, index, qabs, scales, means, offsets = [], [], [], [], [], []
            offset = 0
            for src in sources:
                c, absmax = quantize_nf4_blocks(src.detach().reshape(-1).float(), bs)
                mean = absmax.mean()
                q, scale = quantize_dynamic_blocks(absmax - mean, sbs)
                codes.append(_unpack(c)[:src.numel()].view(src.shape))
                index.append(torch.arange(offset, offset + src.numel(), device=dev).view(src.shape))
                qabs.append(q), scales.append(scale), means.append(mean), offsets.append(offset)
                offset += absmax.numel() * bs  # each source starts on a block boundary
            local_codes, local_index = to_local(codes), to_local(index)
            if tuple(local_codes.shape) != shape or tuple(local_index.shape) != shape:
                raise ValueError(f"NF4: the sources laid out as this weight have shape "
                                 f"{tuple(local_codes.shape)}, expected {shape}")
            rows = local_index.reshape(shape[0] if shape else 1, -1)
            width = rows.shape[1]
            row_start = rows[:, 0]
            if not torch.equal(rows, row_start[:, None] + torch.arange(width, device=dev)):
                raise ValueError("NF4: each row of the weight must be a contiguous run of one source's elements")
            # per source, the range of its blocks that this weight's rows touch (stored; the rest is not)
            src_of_row = torch.searchsorted(torch.tensor(offsets, device=dev), row_start.contiguous(), right=True) - 1
            first_block = row_start // bs
            last_block = (row_start + width - 1) // bs
            kept, kept_means, stored_qabs, stored_scales, group_offset = [], [], [], [], 0
            for k, (off, q, scale) in enumerate(zip(offsets, qabs, scales)):
                mine = src_of_row == k
                if not mine.any():
                    continue
                lo = int(first_block[mine].min()) - off // bs
                hi = int(last_block[mine].max()) - off // bs
                # (global numbers of its first and last kept block, the first's number in the source, where
                # its first kept scale sits among the stored ones minus the source's groups before it)
                kept.append((off // bs + lo, off // bs + hi, lo, group_offset - lo // sbs))
                kept_means.append(means[k])
                stored_qabs.append(q[lo:hi + 1])
                stored_scales.append(scale[lo // sbs:hi // sbs + 1])
                group_offset += hi // sbs - lo // sbs + 1
            self._sources = tuple(kept)
            self._runs = _runs(row_start)
            packed = local_codes.reshape(-1)
            if packed.numel() % 2:
                packed = torch.cat([packed, packed.new_full((1,), 7)])  # the pad value 0 is code index 7
            self.register_buffer("codes", (packed[0::2] << 4) | packed[1::2])
            self.register_buffer("qabsmax", torch.cat(stored_qabs))
            self.register_buffer("absmax_scale", torch.cat(stored_scales))
            self.register_buffer("absmax_mean", torch.stack(kept_means))

    # -- the dequantised matrix ------------------------------------------------------------------------
    @property
    def shape(self) -> torch.Size:
        return torch.Size(self._shape)

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self.codes.device

    def numel(self) -> int:
        return math.prod(self._shape)

    def absmax(self) -> torch.Tensor:
        """The (double-quantised) constants of the stored blocks, float32: ``dynamic[qa] * scale + mean``."""
        dev, sbs = self.codes.device, self.scaler_block_size
        groups, sources = [], []
        for i, (first, last, lo, group_offset) in enumerate(self._sources):
            blocks = torch.arange(lo, lo + last - first + 1, device=dev)
            groups.append(blocks // sbs + group_offset)
            sources.append(torch.full_like(blocks, i))
        groups, sources = torch.cat(groups), torch.cat(sources)
        return (dynamic_code(dev)[self.qabsmax.long()] * self.absmax_scale[groups]) + self.absmax_mean[sources]

    def code_indices(self) -> torch.Tensor:
        """The 4-bit indices into :func:`nf4_code`, one per element, int64."""
        return _unpack(self.codes)[:self.numel()].long()

    def _stored_block_of(self) -> torch.Tensor:
        """For each element (rows x width), the index of its block among the stored ones, int64."""
        dev, bs = self.codes.device, self.block_size
        starts = torch.cat([start + stride * torch.arange(rows, device=dev) for rows, start, stride in self._runs])
        width = self.numel() // starts.numel()
        block = (starts[:, None] + torch.arange(width, device=dev)) // bs  # global block numbers
        first = torch.tensor([f for f, _, _, _ in self._sources], device=dev)
        counts = torch.tensor([last - f + 1 for f, last, _, _ in self._sources], device=dev)
        base = torch.cumsum(counts, 0) - counts  # where each source's kept blocks begin among the stored
        k = torch.searchsorted(first, block, right=True) - 1
        return base[k] + block - first[k]

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        values = nf4_code(self.codes.device)[_unpack(self.codes)[:self.numel()].long()]
        block = self._stored_block_of()
        w = values.view(block.shape) * self.absmax()[block]
        return w.view(self._shape).to(dtype or self._dtype)

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def extra_repr(self) -> str:
        return (f"shape={self._shape}, dtype={self._dtype}, block_size={self.block_size}, "
                f"scaler_block_size={self.scaler_block_size}, sources={len(self._sources)}, bytes={self.nbytes()}")
