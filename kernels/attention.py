"""Causal grouped-query attention over a key/value history.

`attention` is the fast path (torch SDPA, which picks a fused kernel per device) over head-major
history [KV, S, D]; for a few query rows after a history it gives each row exactly the result decoding it
alone would (speculative decoding's greedy output must match plain decoding token for token).
`attention_reference` is the plain softmax(QK^T / sqrt(d)) V that tests compare to.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

ROWWISE_MAX_ROWS = 16  # up to this many query rows after a history, attend row by row (batch-invariant)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_start: int) -> torch.Tensor:
    """q [T, H, D] holds positions q_start..q_start+T-1; k, v [KV, S, D] hold positions 0..S-1.

    Query i attends to keys 0..q_start+i. Returns [T, H, D] in q's dtype.
    """
    t, s = q.shape[0], k.shape[1]
    qh = q.transpose(0, 1)[None]
    gqa = q.shape[1] != k.shape[0]
    if t == 1:
        out = F.scaled_dot_product_attention(qh, k[None], v[None], enable_gqa=gqa)
    elif q_start > 0 and t <= ROWWISE_MAX_ROWS:
        # A few rows after a history (a speculative verify pass): one single-query call per row, the very call
        # decoding that row alone makes, so each row's result is bit-identical to it. A masked call rounds
        # differently depending on how many rows share it, which can flip a greedy argmax.
        out = torch.cat(
            [
                F.scaled_dot_product_attention(
                    qh[:, :, i : i + 1],
                    k[None, :, : q_start + i + 1],
                    v[None, :, : q_start + i + 1],
                    enable_gqa=gqa,
                )
                for i in range(t)
            ],
            dim=2,
        )
    elif q_start == 0 and s == t:
        out = F.scaled_dot_product_attention(qh, k[None], v[None], is_causal=True, enable_gqa=gqa)
    else:
        mask = causal_mask(t, s, q_start, q.device)
        out = F.scaled_dot_product_attention(qh, k[None], v[None], attn_mask=mask, enable_gqa=gqa)
    return out[0].transpose(0, 1)


def causal_mask(t: int, s: int, q_start: int, device: torch.device) -> torch.Tensor:
    """Boolean [T, S] mask, True where query i (at position q_start + i) may see key j."""
    qpos = torch.arange(q_start, q_start + t, device=device)[:, None]
    return torch.arange(s, device=device)[None, :] <= qpos


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_start: int) -> torch.Tensor:
    """Same contract as `attention`, in float32 with an explicit softmax."""
    h, kv = q.shape[1], k.shape[0]
    rep = h // kv
    kf = k.float().repeat_interleave(rep, dim=0)  # [H, S, D]
    vf = v.float().repeat_interleave(rep, dim=0)
    scores = torch.einsum("thd,hsd->hts", q.float(), kf) / math.sqrt(q.shape[-1])
    mask = causal_mask(q.shape[0], k.shape[1], q_start, q.device)
    scores = scores.masked_fill(~mask[None], float("-inf"))
    return torch.einsum("hts,hsd->thd", scores.softmax(-1), vf).to(q.dtype)
