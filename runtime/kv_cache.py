"""Key/value memory for the transformer forward.

`ContiguousKVCache` reserves one head-major [kv_heads, max_len, head_dim] buffer per layer for a single
sequence (the layout attention reads without a transpose).
The forward only talks to a cache through `attend(layer, q, k, v)` after `begin(positions)`, so the
paged cache (block pool + block tables) plugs into the same forward.
"""

from __future__ import annotations

import torch

from ripelm.kernels.attention import attention
from ripelm.runtime.errors import ContextOverflowError


class ContiguousKVCache:
    def __init__(
        self,
        n_layers: int,
        max_len: int,
        n_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str = "cpu",
    ):
        self.max_len = max_len
        self.k = torch.zeros(n_layers, n_kv_heads, max_len, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.length = 0  # tokens whose K/V are stored (positions 0..length-1)
        self._start = 0
        self._end = 0

    def begin(self, start: int, count: int) -> None:
        """Announce that the next forward writes positions start..start+count-1 (start <= length)."""
        if start > self.length:
            raise ValueError(f"cache holds {self.length} tokens, cannot write at {start}")
        if start + count > self.max_len:
            raise ContextOverflowError(
                f"{start + count} tokens do not fit the context window of {self.max_len}"
            )
        self._start, self._end = start, start + count

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        s, e = self._start, self._end
        self.k[layer, :, s:e] = k.transpose(0, 1)
        self.v[layer, :, s:e] = v.transpose(0, 1)
        if layer == self.k.shape[0] - 1:
            self.length = e
        return attention(q, self.k[layer, :, :e], self.v[layer, :, :e], s)

    def truncate(self, length: int) -> None:
        """Forget positions >= length (rewind for a new prompt sharing a prefix, or rejected drafts)."""
        self.length = min(self.length, max(0, length))
