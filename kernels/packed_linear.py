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

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ripelm.kernels.cpu_features import dense_matmul_dtype

INT4_GROUP_SIZES = (32, 64, 128, 256)
DENSE_MIN_ROWS = 32  # from this many input rows on, CPU layers with a `dense_weight` use it


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


class Int4Linear(nn.Module):
    """y = x @ W^T (+ b) with W held as packed int4 codes plus per-group scale and zero."""

    def __init__(
        self,
        q: Int4Codes | Iterable[Int4Codes],
        bias: torch.Tensor | None = None,
        *,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str = "cpu",
        keep_codes: bool = False,
        dense_weight: Callable[[], torch.Tensor] | None = None,
        triton_layout: bool | None = None,
    ):
        """`q` is the whole weight, or its consecutive row shards (packed one at a time to bound memory).
        `triton_layout`: hold the weight in kernels.triton_int4's layout too (default: on CUDA when Triton
        is installed; True elsewhere only for tests under Triton's interpreter)."""
        super().__init__()
        device = torch.device(device)
        packed, sz, kept, q4 = [], [], [], []
        shards = [q] if isinstance(q, Int4Codes) else q
        # On CUDA (with Triton) the weight is also held in kernels.triton_int4's layout: prefill (more
        # than 16 rows) dequantizes it for cuBLAS, and RIPELM_CUDA_INT4=triton decodes through it instead
        # of torch's int4 kernel (tinygemm), which then is not packed at all.
        t4 = None
        if device.type == "cuda" if triton_layout is None else triton_layout:  # imported here: Triton's
            # import costs CPU-only runs time for nothing
            from ripelm.kernels import triton_int4

            t4 = triton_int4 if triton_int4.available() else None
        self._triton = False
        for shard in shards:
            n, k = shard.shape
            if shard.group_size not in INT4_GROUP_SIZES or k % shard.group_size:
                raise ValueError(f"int4 group size {shard.group_size} does not fit a row of {k}")
            if (packed or q4) and (k, shard.group_size) != (self.in_features, self.group_size):
                raise ValueError("int4 row shards differ in row length or group size")
            self.in_features, self.group_size = k, shard.group_size
            if t4 is not None and t4.tile_for(k, shard.group_size) is None:
                t4 = None  # this row length does not fit the Triton layout (decided at the first shard:
                # every shard has the same row length and group)
            if keep_codes:
                kept.append(shard)
            if t4 is not None:
                w = t4.prepare(shard.codes.to(device), shard.scale, shard.offset, shard.group_size)
                q4.append((w.words, w.scale, w.offset, w.pk))
            if t4 is not None and t4.enabled():
                continue
            packed.append(_pack_int4(shard.codes, device))
            zero = shard.offset + 8.0 * shard.scale
            # tinygemm wants [K // group, N, 2] with scale first, zero second.
            sz.append(torch.stack([shard.scale, zero], dim=-1).transpose(0, 1).to(dtype=dtype, device=device))
        self._t4 = t4
        self._triton = t4 is not None and t4.enabled()
        self._pk = q4[0][3] if q4 else 0
        cat = (lambda ts: torch.cat(ts, dim=1).contiguous()) if len(q4) > 1 else (lambda ts: ts[0])
        for name, i in (("q4_words", 0), ("q4_scale", 1), ("q4_offset", 2)):
            self.register_buffer(name, cat([w[i] for w in q4]) if q4 else None, persistent=False)
        self.out_features = sum(w[0].shape[1] for w in q4) if q4 else sum(p.shape[0] for p in packed)
        self.dtype = dtype
        self.register_buffer(
            "scales_and_zeros", torch.cat(sz, dim=1).contiguous() if sz else None, persistent=False
        )
        packed_all = (torch.cat(packed) if len(packed) > 1 else packed[0]) if packed else None
        self.register_buffer("packed", packed_all, persistent=False)
        self.register_buffer(
            "bias", None if bias is None else bias.to(dtype=dtype, device=device), persistent=False
        )
        self._codes = (kept[0] if len(kept) == 1 else Int4Codes.cat(kept)) if keep_codes else None
        # For many rows at once (prefill) a dense bf16 matmul beats the int4 kernel by ~10x on CPU (AMX,
        # AVX512-BF16); `dense_weight` rebuilds the float weight on demand, so nothing extra stays resident.
        self.dense_weight = dense_weight if device.type == "cpu" and t4 is None else None
        self._dense_rows = DENSE_MIN_ROWS if self.dense_weight is not None else 1 << 62
        self._dense_dtype = dense_matmul_dtype(dtype)
        self._cache_args()
        self._mm = (
            torch.ops.aten._weight_int4pack_mm_for_cpu.default
            if device.type == "cpu"
            else torch.ops.aten._weight_int4pack_mm.default
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Decoding calls this ~120 times per token with one row: the common case stays a handful of
        # attribute reads and one kernel call (module and reshape overhead is a tenth of the matmul).
        if x.dim() != 2:
            return self.forward(x.reshape(-1, x.shape[-1])).view(*x.shape[:-1], self.out_features)
        q4 = self._q4
        if q4 is not None and x.shape[0] > self._t4.MAX_ROWS:  # prefill: the weight dequantized, cuBLAS
            y = x.to(self.dtype) @ self._t4.dequantize_t(q4, self.dtype)
        elif self._triton:  # float32 out: no rounding to bf16 on the way
            y = self._t4.matmul(x, q4)
        elif x.shape[0] >= self._dense_rows:
            dt = self._dense_dtype
            y = F.linear(x.to(dt), self.dense_weight().to(dt)).to(self.dtype)  # type: ignore[misc]
        else:
            if x.dtype != self.dtype:
                x = x.to(self.dtype)
            y = self._mm(x, *self._args)
        return y if self._bias is None else y + self._bias

    def _cache_args(self) -> None:
        """Plain attributes for the buffers forward reads (module buffer lookups cost ~0.6 us each)."""
        self._args = (self.packed, self.group_size, self.scales_and_zeros)
        self._bias = self.bias
        self._q4 = None
        if self.q4_words is not None:
            self._q4 = self._t4.Q4Weight(
                self.q4_words, self.q4_scale, self.q4_offset, self.group_size, self._pk
            )

    def _apply(self, fn, recurse=True):  # noqa: ANN001 - nn.Module's signature
        out = super()._apply(fn, recurse)
        self._cache_args()
        return out

    def reference_weight(self) -> torch.Tensor:
        """The float32 weight this layer multiplies by, after scale/zero rounding to the activation dtype."""
        if self._codes is None:
            raise RuntimeError("reference path needs keep_codes=True")
        q = self._codes
        n, k = q.shape
        g = self.group_size
        codes = q.codes.view(n, k // g, g).float()
        if self._triton:  # float16 scale and offset [K // g, N]
            scale, offset = self.q4_scale.float().t().cpu(), self.q4_offset.float().t().cpu()
            return (codes * scale[..., None] + offset[..., None]).view(n, k)
        sz = self.scales_and_zeros.float().cpu().transpose(0, 1)  # [N, K//g, 2]
        w = (codes - 8.0) * sz[..., 0:1] + sz[..., 1:2]
        return w.view(n, k)


def _pack_int4(codes: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cpu":
        # The CPU layout tiles rows by 64, so packing in row chunks gives the same bytes while the int32
        # copy the op needs stays small (a whole 49k-row output head would need 100+ MB at once).
        chunks = [
            torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes[i : i + 4096].to(torch.int32), 1)
            for i in range(0, codes.shape[0], 4096)
        ]
        return chunks[0] if len(chunks) == 1 else torch.cat(chunks)
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
        halves: Iterable[tuple[Int4Codes, Int4Codes]],
        bias: torch.Tensor | None = None,
        *,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str = "cpu",
        keep_codes: bool = False,
        dense_weight: Callable[[], torch.Tensor] | None = None,
    ):
        super().__init__()
        self.dense_weight = dense_weight if torch.device(device).type == "cpu" else None
        both = (
            Int4Codes(
                torch.cat([high.codes, low.codes], dim=1),
                torch.cat([high.scale, low.scale], dim=1),
                torch.cat([high.offset, low.offset], dim=1),
                high.group_size,
            )
            for high, low in halves
        )
        self.inner = Int4Linear(both, bias, dtype=dtype, device=device, keep_codes=keep_codes)
        self.in_features, self.out_features = self.inner.in_features // 2, self.inner.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dense_weight is not None and x.numel() >= DENSE_MIN_ROWS * self.in_features:
            dt = dense_matmul_dtype(self.inner.dtype)
            y = F.linear(x.to(dt), self.dense_weight().to(dt)).to(self.inner.dtype)
            return y if self.inner.bias is None else y + self.inner.bias
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
