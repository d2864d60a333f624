"""Linear layers whose weights stay quantized in memory.

`Int4Linear` keeps 4-bit codes packed for torch's int4 matmul (tinygemm layout): every weight is
``(code - 8) * scale + zero`` per group of `group_size` input columns. GGUF Q4_0/Q4_1/Q4_K blocks and the
ternary TQ1_0/TQ2_0 blocks all have the form ``scale * code + offset``, so their codes carry over
unchanged and only scale and ``zero = offset + 8 * scale`` are rounded to the activation dtype.
`SplitInt8Linear` runs Q8_0 exactly on the same kernel as two 4-bit halves, `DenseLinear` holds plain
bf16/fp16/fp32 weights. Every layer keeps
a reference path (`reference_weight`) that tests compare against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

INT4_GROUP_SIZES = (32, 64, 128, 256)


@dataclass
class Int4Codes:
    """An unpacked 4-bit weight: w[n, k] = scale[n, k // group] * codes[n, k] + offset[n, k // group]."""

    codes: torch.Tensor  # uint8 [N, K], values 0..15
    scale: torch.Tensor  # float32 [N, K // group]
    offset: torch.Tensor  # float32 [N, K // group]
    group_size: int

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    def dequantize(self) -> torch.Tensor:
        n, k = self.codes.shape
        g = self.group_size
        w = self.codes.view(n, k // g, g).float() * self.scale.unsqueeze(-1) + self.offset.unsqueeze(-1)
        return w.view(n, k)

    @staticmethod
    def cat(parts: list[Int4Codes]) -> Int4Codes:
        """Stack along output rows (fusing Q/K/V or gate/up into one matmul)."""
        group = parts[0].group_size
        if any(p.group_size != group for p in parts):
            raise ValueError("cannot fuse int4 weights with different group sizes")
        return Int4Codes(
            codes=torch.cat([p.codes for p in parts]),
            scale=torch.cat([p.scale for p in parts]),
            offset=torch.cat([p.offset for p in parts]),
            group_size=group,
        )


def int4_shape_ok(n: int, k: int, group: int) -> bool:
    """Whether an [n, k] weight fits the int4 kernels: rows in tiles of 16, whole groups."""
    return group in INT4_GROUP_SIZES and n % 16 == 0 and k % group == 0


def _flatten(x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    return x.reshape(-1, x.shape[-1]), tuple(x.shape[:-1])


class Int4Linear(nn.Module):
    """y = x @ W^T (+ b) with W held as packed int4 codes plus per-group scale and zero."""

    def __init__(
        self,
        q: Int4Codes,
        bias: torch.Tensor | None = None,
        *,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str = "cpu",
        keep_codes: bool = False,
    ):
        super().__init__()
        n, k = q.shape
        if q.group_size not in INT4_GROUP_SIZES or k % q.group_size:
            raise ValueError(f"int4 group size {q.group_size} does not fit a row of {k}")
        device = torch.device(device)
        self.in_features, self.out_features, self.group_size = k, n, q.group_size
        self.dtype = dtype
        self.device_type = device.type
        zero = q.offset + 8.0 * q.scale
        # tinygemm wants [K // group, N, 2] with scale first, zero second.
        sz = torch.stack([q.scale, zero], dim=-1).transpose(0, 1).contiguous()
        self.register_buffer("scales_and_zeros", sz.to(dtype=dtype, device=device), persistent=False)
        self.register_buffer("packed", _pack_int4(q.codes, device), persistent=False)
        self.register_buffer(
            "bias", None if bias is None else bias.to(dtype=dtype, device=device), persistent=False
        )
        # Codes are only kept when a caller wants the exact reference path (tests, re-quantization).
        self._codes = q if keep_codes else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2, lead = _flatten(x.to(self.dtype))
        if self.device_type == "cpu":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                x2, self.packed, self.group_size, self.scales_and_zeros
            )
        else:
            y = torch.ops.aten._weight_int4pack_mm(x2, self.packed, self.group_size, self.scales_and_zeros)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*lead, self.out_features)

    def reference_weight(self) -> torch.Tensor:
        """The float32 weight this layer multiplies by, after scale/zero rounding to the activation dtype."""
        if self._codes is None:
            raise RuntimeError("reference path needs keep_codes=True")
        q = self._codes
        sz = self.scales_and_zeros.float().transpose(0, 1)  # [N, K//g, 2]
        n, k = q.shape
        g = self.group_size
        w = (q.codes.view(n, k // g, g).float() - 8.0) * sz[..., 0:1] + sz[..., 1:2]
        return w.view(n, k)


def _pack_int4(codes: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cpu":
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)
    # CUDA and MPS take two codes per byte, high nibble first, and a tile count for the layout.
    packed = (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8).contiguous().to(device)
    k = codes.shape[1]
    tiles = next(t for t in (8, 4, 2) if k % (16 * t) == 0) if device.type == "cuda" else 2
    return torch.ops.aten._convert_weight_to_int4pack(packed, tiles)


class SplitInt8Linear(nn.Module):
    """An 8-bit weight held exactly as two 4-bit halves (w = high + low) in one int4 matmul over [x, x].

    Q8_0 codes split into high and low nibbles (see `ripelm.kernels.dequant.q8_0_as_two_q4`); putting the
    halves side by side along the input dimension turns x @ (high + low)^T into one int4 matmul of [x, x].
    """

    def __init__(
        self,
        high: Int4Codes,
        low: Int4Codes,
        bias: torch.Tensor | None = None,
        *,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str = "cpu",
        keep_codes: bool = False,
    ):
        super().__init__()
        both = Int4Codes(
            torch.cat([high.codes, low.codes], dim=1),
            torch.cat([high.scale, low.scale], dim=1),
            torch.cat([high.offset, low.offset], dim=1),
            high.group_size,
        )
        self.inner = Int4Linear(both, bias, dtype=dtype, device=device, keep_codes=keep_codes)
        self.in_features, self.out_features = high.shape[1], high.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(torch.cat([x, x], dim=-1))

    def reference_weight(self) -> torch.Tensor:
        w = self.inner.reference_weight()
        return w[:, : self.in_features] + w[:, self.in_features :]


class DenseLinear(nn.Module):
    """A plain linear layer in the activation dtype (for F16/BF16/F32 and the K-quants we do not pack)."""

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        *,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str = "cpu",
    ):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.dtype = dtype
        self.register_buffer("weight", weight.to(dtype=dtype, device=device).contiguous(), persistent=False)
        self.register_buffer(
            "bias", None if bias is None else bias.to(dtype=dtype, device=device), persistent=False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.dtype), self.weight, self.bias)

    def reference_weight(self) -> torch.Tensor:
        return self.weight.float()


class ConcatLinear(nn.Module):
    """Several linears over the same input whose outputs are concatenated (when they cannot be fused)."""

    def __init__(self, parts: list[nn.Module]):
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.out_features = sum(p.out_features for p in parts)  # type: ignore[misc]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([p(x) for p in self.parts], dim=-1)

    def reference_weight(self) -> torch.Tensor:
        return torch.cat([p.reference_weight() for p in self.parts])  # type: ignore[operator]
