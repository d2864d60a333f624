"""Causal grouped-query attention over a key/value history.

`attention` is the fast path (torch SDPA, which picks a fused kernel per device) over head-major
history [KV, S, D]; `attention_reference` is the plain softmax(QK^T / sqrt(d)) V that tests compare to.

Single-query rows (decoding) go through `decode_attention`: keys padded to a multiple of DECODE_PAD and
masked. SDPA's CPU kernel (torch 2.13) rounds a masked row the same whatever the batch size, whatever
the masked padding holds, and whatever the padded length, as long as that length is a multiple of 16
(an unpadded length that is not a multiple of 16 takes a differently rounded tail; checked in
tests/test_kernels.py). So a row gets bit-identical results decoded alone or batched with longer
sequences, which keeps batched greedy output token-for-token equal to the single-sequence output, and
a batch pads its rows only to its longest history, not to a coarse bucket.
A few query rows after a history (a speculative verify pass) are computed row by row as decode rows,
so each gets exactly the result decoding it alone would.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

DECODE_PAD = 16
ROWWISE_MAX_ROWS = 16  # up to this many query rows after a history, attend row by row as decode rows


def decode_bucket(n: int) -> int:
    """Padded key length for a single query over n keys: n rounded up to a multiple of DECODE_PAD."""
    return -(-max(n, 1) // DECODE_PAD) * DECODE_PAD


def pad_keys(k: torch.Tensor, size: int) -> torch.Tensor:
    """k [..., S, D] cut or zero-padded to [..., size, D] along the key axis (a view when S >= size)."""
    s = k.shape[-2]
    if s >= size:
        return k[..., :size, :]
    pad = k.new_zeros(*k.shape[:-2], size - s, k.shape[-1])
    return torch.cat([k, pad], dim=-2)


def decode_mask(lengths: torch.Tensor, p: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, 1, 1, P] additive mask (0 for the first lengths[b] keys of a row, -inf after) in the query
    dtype: SDPA would otherwise turn a boolean mask into this on every call."""
    keep = torch.arange(p, device=lengths.device)[None, :] < lengths[:, None]
    mask = torch.zeros(keep.shape, dtype=dtype, device=lengths.device).masked_fill_(~keep, float("-inf"))
    return mask[:, None, None, :]


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lengths: torch.Tensor,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """One query per sequence: q [B, H, D]; k, v [B, KV, P, D] with P >= decode_bucket of every row's
    length (a multiple of DECODE_PAD); lengths [B] valid keys per row (the rest is masked, whatever it
    holds, but must be finite); `mask` is `decode_mask(lengths, P, q.dtype)` when the caller has it
    already (a decode step reuses one mask in every layer). Returns [B, H, D]."""
    if mask is None:
        mask = decode_mask(lengths, k.shape[-2], q.dtype)
    gqa = q.shape[1] != k.shape[1]
    return F.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=mask, enable_gqa=gqa)[:, :, 0]


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_start: int, length: int | None = None
) -> torch.Tensor:
    """q [T, H, D] holds positions q_start..q_start+T-1; k, v [KV, S, D] hold positions 0..S-1.

    Query i attends to keys 0..q_start+i. `length` (default S) is how many keys are history; k and v may
    run past it (a cache buffer), which lets a decode step read its padded bucket without a copy.
    Returns [T, H, D] in q's dtype.
    """
    t = q.shape[0]
    s = k.shape[1] if length is None else length
    if t == 1:
        p = decode_bucket(s)
        lengths = torch.tensor([s], device=q.device)
        return decode_attention(q, pad_keys(k, p)[None], pad_keys(v, p)[None], lengths)
    k, v = k[:, :s], v[:, :s]
    qh = q.transpose(0, 1)[None]
    gqa = q.shape[1] != k.shape[0]
    if q_start > 0 and t <= ROWWISE_MAX_ROWS:
        # A speculative verify pass: a masked multi-row call rounds differently from decoding each row
        # alone, which can flip a greedy argmax; so each row goes through the decode path.
        return torch.cat(
            [attention(q[i : i + 1], k, v, q_start + i, length=q_start + i + 1) for i in range(t)]
        )
    if q_start == 0 and s == t:
        out = F.scaled_dot_product_attention(qh, k[None], v[None], is_causal=True, enable_gqa=gqa)
    else:
        mask = causal_mask(t, s, q_start, q.device)
        out = F.scaled_dot_product_attention(qh, k[None], v[None], attn_mask=mask, enable_gqa=gqa)
    return out[0].transpose(0, 1)


def window_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_start: int, window: int, length: int | None = None
) -> torch.Tensor:
    """`attention` for a sliding-window layer: the query at position p sees keys p - window + 1 .. p (as
    llama.cpp masks them: key p0 is hidden from query p1 when p1 - p0 >= window). k, v [KV, S, D] hold
    positions 0..S-1 as in `attention`; keys before the first window are never read."""
    t = q.shape[0]
    s = k.shape[1] if length is None else length
    if q_start + t <= window:  # no query is far enough along for the window to hide anything
        return attention(q, k, v, q_start, length=s)
    lo = max(0, q_start - window + 1)  # the first key any of these queries sees
    k, v = k[:, lo:s], v[:, lo:s]
    if t == 1:
        return attention(q, k, v, q_start - lo, length=s - lo)
    qpos = torch.arange(q_start, q_start + t, device=q.device)[:, None]
    kpos = torch.arange(lo, s, device=q.device)[None, :]
    mask = (kpos <= qpos) & (qpos - kpos < window)
    gqa = q.shape[1] != k.shape[0]
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k[None], v[None], attn_mask=mask, enable_gqa=gqa
    )
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
