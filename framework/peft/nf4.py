"""4-bit NormalFloat (NF4) weight storage with double-quantised block constants (QLoRA, Dettmers et al. 2023).

Code. NF4 has 16 values in [-1, 1]: 0, 8 positive and 7 negative quantiles of N(0, 1), each side normalised
to end at 1 (the paper's ``create_normal_map(offset=0.9677083)``)::

    positive = Phi^-1(linspace(offset, 0.5, 9)[:-1]),   negative = -Phi^-1(linspace(offset, 0.5, 8)[:-1])
    code     = sort(positive, 0, negative) / max

so that each code value is (about) equally likely for normally distributed weights, and 0 is exact.

Quantisation of a tensor W (flattened, zero-padded to whole blocks):

    first level   blocks of ``block_size`` (64) elements: absmax_b = max |W_b|,
                  q_i = index of the code value nearest to W_i / absmax_b         (4 bits, two per byte)
    second level  the absmax values, mean m subtracted, in blocks of ``scaler_block_size`` (256):
                  s_k = max |absmax - m| over block k,  qa_b = round(127 (absmax_b - m) / s_k)   (int8)
    dequantise    W_i = code[q_i] * (qa_b s_k / 127 + m)

Stored bytes for n elements (B blocks = ceil(n / 64), K = ceil(B / 256)):
``ceil(n_padded / 2) + B + 4 K + 4`` -- about 4.127 bits per element instead of 16 (bf16) or 32 (fp32).
The paper stores the second level as 8-bit floats; we use symmetric int8 after subtracting the mean
(as torchao does), which keeps the same 8 bits per block constant.

Error. Per element, |W_i - deq_i| <= absmax_b * g / 2 + |absmax_b - absmax'_b|, with g the largest gap
between neighbouring code values (0.2773, between 0.7230 and 1) and absmax'_b the double-quantised
constant, itself within s_k / 254 of absmax_b.

Why our own module: torchao's NF4Tensor (0.18) runs on CPU, but requires the number of 64-blocks of a
tensor to be a multiple of 256 (16384 elements), which neither SmolLM2's projections (e.g. 960 x 576) nor
the tiny test models meet, and its import path moved between releases. Partial last blocks are padded
here instead. bitsandbytes' CPU support depends on the build.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn

#: the paper's offset: the quantile that maps to +-1 (chosen so the code is symmetric in probability mass)
NF4_OFFSET = 0.9677083


@functools.lru_cache(maxsize=None)
def _nf4_code_cpu() -> torch.Tensor:
    p = torch.linspace(NF4_OFFSET, 0.5, 9)[:-1]  # float32, as the reference construction
    n = torch.linspace(NF4_OFFSET, 0.5, 8)[:-1]
    values = torch.cat([torch.special.ndtri(p.double()), -torch.special.ndtri(n.double()),
                        torch.zeros(1, dtype=torch.float64)])
    values = values.sort().values
    return (values / values.max()).float()


def nf4_code(device=None) -> torch.Tensor:
    """The 16 NF4 values, ascending, float32."""
    code = _nf4_code_cpu()
    return code if device is None else code.to(device)


def nf4_bytes(numel: int, block_size: int = 64, scaler_block_size: int = 256) -> int:
    """Bytes the quantised form of ``numel`` elements occupies (codes + int8 constants + fp32 scales + mean)."""
    blocks = math.ceil(numel / block_size)
    padded = blocks * block_size
    return math.ceil(padded / 2) + blocks + 4 * math.ceil(blocks / scaler_block_size) + 4


def _pack(q: torch.Tensor) -> torch.Tensor:
    """uint8 codes 0..15 (even length) -> bytes, first element in the high nibble."""
    q = q.view(-1, 2)
    return (q[:, 0] << 4) | q[:, 1]


def _unpack(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack([packed >> 4, packed & 0xF], dim=1).view(-1)


class NF4Weight(nn.Module):
    """A frozen weight matrix stored as NF4; ``dequantize()`` gives it back in its original dtype.

    Registered as buffers (``codes``, ``qabsmax``, ``absmax_scale``, ``absmax_mean``), so ``.to(device)``
    and state dicts carry the quantised form. It stands in for a layer's ``weight`` parameter:
    ``shape``/``dtype``/``device`` describe the dequantised matrix and ``requires_grad`` is False.
    """

    requires_grad = False

    def __init__(self, weight: torch.Tensor, block_size: int = 64, scaler_block_size: int = 256):
        super().__init__()
        if block_size < 2 or block_size % 2 or scaler_block_size < 1:
            raise ValueError(f"NF4: block_size must be an even number >= 2 and scaler_block_size >= 1, got "
                             f"{block_size} and {scaler_block_size}")
        self.block_size, self.scaler_block_size = int(block_size), int(scaler_block_size)
        self._shape = tuple(weight.shape)
        self._dtype = weight.dtype
        n = weight.numel()
        blocks = math.ceil(n / block_size)
        groups = math.ceil(blocks / scaler_block_size)
        dev = weight.device
        if weight.is_meta:  # shapes only (parameter counting on the meta device): nothing to compute
            self.register_buffer("codes", torch.empty(blocks * block_size // 2, dtype=torch.uint8, device=dev))
            self.register_buffer("qabsmax", torch.empty(blocks, dtype=torch.int8, device=dev))
            self.register_buffer("absmax_scale", torch.empty(groups, dtype=torch.float32, device=dev))
            self.register_buffer("absmax_mean", torch.empty((), dtype=torch.float32, device=dev))
            return
        with torch.no_grad():
            flat = weight.detach().reshape(-1).float()
            flat = torch.cat([flat, flat.new_zeros(blocks * block_size - n)]).view(blocks, block_size)
            absmax = flat.abs().amax(dim=1)
            scaled = flat / absmax.clamp_min(torch.finfo(torch.float32).tiny)[:, None]
            code = nf4_code(dev)
            q = torch.bucketize(scaled, (code[1:] + code[:-1]) / 2).to(torch.uint8)  # nearest code value
            mean = absmax.mean()
            centred = torch.cat([absmax - mean, absmax.new_zeros(groups * scaler_block_size - blocks)])
            scale = centred.view(groups, scaler_block_size).abs().amax(dim=1)
            per_block = scale.clamp_min(torch.finfo(torch.float32).tiny).repeat_interleave(scaler_block_size)[:blocks]
            qabs = torch.round(127 * (absmax - mean) / per_block).clamp(-127, 127).to(torch.int8)
        self.register_buffer("codes", _pack(q.reshape(-1)))
        self.register_buffer("qabsmax", qabs)
        self.register_buffer("absmax_scale", scale)
        self.register_buffer("absmax_mean", mean)

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
        """The (double-quantised) per-block constants, float32."""
        scale = self.absmax_scale.repeat_interleave(self.scaler_block_size)[:self.qabsmax.numel()]
        return self.qabsmax.float() * scale / 127 + self.absmax_mean

    def code_indices(self) -> torch.Tensor:
        """The 4-bit indices into :func:`nf4_code`, one per element (padding removed), int64."""
        return _unpack(self.codes)[:self.numel()].long()

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        values = nf4_code(self.codes.device)[_unpack(self.codes).long()].view(-1, self.block_size)
        w = (values * self.absmax()[:, None]).reshape(-1)[:self.numel()].view(self._shape)
        return w.to(dtype or self._dtype)

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def extra_repr(self) -> str:
        return (f"shape={self._shape}, dtype={self._dtype}, block_size={self.block_size}, "
                f"scaler_block_size={self.scaler_block_size}, bytes={self.nbytes()}")
