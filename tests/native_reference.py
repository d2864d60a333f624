"""The single-sequence native backend with a contiguous KV cache: the plain path the paged engine
(`runtime.engine.Engine`) is checked against, and the model holder many tests use (`forward`, `prefill`,
`generate_ids`, `teacher_forced_logits`). Not part of the product: the product has one forward path and one
KV cache, the engine's.

The cache survives between generations and is rewound to the longest common prefix of the new prompt. On the
native step it is a paged pool of its own (`SequencePool`: that step reads paged pools through block tables);
otherwise one head-major [kv_heads, max_len, head_dim] buffer per layer (`ContiguousKVCache`).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from ripelm.kernels.attention import attention, decode_bucket, window_attention
from ripelm.kernels.paged_attention import PagedBatch
from ripelm.models.gguf_file import GGUFFile
from ripelm.runtime.backend import Capabilities, GenerationStats, common_prefix
from ripelm.runtime.errors import ContextOverflowError
from ripelm.runtime.kv_cache import DEFAULT_BLOCK_SIZE, PagedKVCache, PagedStep
from ripelm.runtime.native import LoadedModel
from ripelm.runtime.native_decode import NATIVE_KV_DTYPE, NativeRunner
from ripelm.runtime.sampling import Sampler, SamplingParams
from ripelm.runtime.tokenizer import Tokenizer

PREFILL_CHUNK = 512


def check_span(length: int, max_len: int, start: int, count: int) -> None:
    """A single-sequence cache holding `length` tokens can take positions start..start+count-1."""
    if start > length:
        raise ValueError(f"cache holds {length} tokens, cannot write at {start}")
    if start + count > max_len:
        raise ContextOverflowError(f"{start + count} tokens do not fit the context window of {max_len}")


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
        check_span(self.length, self.max_len, start, count)
        self._start, self._end = start, start + count

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        s, e = self._start, self._end
        self.k[layer, :, s:e] = k.transpose(0, 1)
        self.v[layer, :, s:e] = v.transpose(0, 1)
        if layer == self.k.shape[0] - 1:
            self.length = e
        # A decode step reads its whole padded bucket straight from the buffer (masked past e).
        end = min(self.max_len, decode_bucket(e)) if e - s == 1 else e
        return attention(q, self.k[layer, :, :end], self.v[layer, :, :end], s, length=e)

    def attend_window(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int
    ) -> torch.Tensor:
        """`attend` for a sliding-window layer: each query sees only the last `window` positions."""
        s, e = self._start, self._end
        self.k[layer, :, s:e] = k.transpose(0, 1)
        self.v[layer, :, s:e] = v.transpose(0, 1)
        if layer == self.k.shape[0] - 1:
            self.length = e
        return window_attention(q, self.k[layer, :, :e], self.v[layer, :, :e], s, window)

    def truncate(self, length: int) -> None:
        """Forget positions >= length (rewind for a new prompt sharing a prefix, or rejected drafts)."""
        self.length = min(self.length, max(0, length))


class SequencePool:
    """One sequence's K/V in a paged pool of its own, in blocks 0, 1, 2, ... (the single-sequence backend's
    cache when the native step runs it: that step reads paged pools through block tables)."""

    def __init__(
        self,
        n_layers: int,
        max_len: int,
        n_kv_heads: int,
        head_dim: int,
        *,
        dtype: torch.dtype = torch.bfloat16,
        block_size: int = DEFAULT_BLOCK_SIZE,
    ):
        self.max_len = max_len
        self.paged = PagedKVCache(
            n_layers, -(-max_len // block_size), n_kv_heads, head_dim, block_size=block_size, dtype=dtype
        )
        self.length = 0

    def table(self, n: int) -> list[int]:
        """The block table of the first n positions."""
        return list(range(-(-n // self.paged.block_size)))

    def begin(self, start: int, count: int) -> None:
        check_span(self.length, self.max_len, start, count)

    def step(self, start: int, count: int) -> PagedStep:
        """What the torch forward attends through for positions start..start+count-1."""
        n = start + count
        bs = self.paged.block_size
        return PagedStep(
            self.paged, PagedBatch(bs, [self.table(n)], [count], [n], num_blocks=-(-self.max_len // bs))
        )

    def truncate(self, length: int) -> None:
        self.length = min(self.length, max(0, length))


class NativeBackend(LoadedModel):
    name = "native"
    caps = Capabilities()

    def __init__(
        self,
        model_path: str | Path,
        *,
        device: str | None = None,
        n_ctx: int | None = None,
        tokenizer: Tokenizer | None = None,
        reference: bool = False,
        gguf: GGUFFile | None = None,
    ):
        """`reference=True` loads the exact float32 model (dequantized weights) that tests compare to."""
        super().__init__(
            model_path, device=device, n_ctx=n_ctx, tokenizer=tokenizer, reference=reference, gguf=gguf
        )
        cfg = self.cfg
        self.runner: NativeRunner | None = None
        if self.model.native is not None:
            # The native step reads a paged pool: this one sequence owns blocks 0, 1, 2, ... of its own.
            self.cache: ContiguousKVCache | SequencePool = SequencePool(
                cfg.n_layers, self.context_length, cfg.n_kv_heads, cfg.head_dim, dtype=NATIVE_KV_DTYPE
            )
            self.runner = self.model.native.runner(self.cache.paged)
        else:
            self.cache = ContiguousKVCache(
                cfg.n_layers,
                self.context_length,
                cfg.n_kv_heads,
                cfg.head_dim,
                dtype=self.dtype,
                device=self.torch_device,
            )
        self.cached_tokens: list[int] = []  # the tokens whose K/V sit in self.cache, in order

    def forward(
        self, tokens: list[int], start: int, logits_rows: str | torch.Tensor = "last"
    ) -> torch.Tensor:
        """Run `tokens` at positions start.. through the model, extending the cache; returns logits."""
        n = len(tokens)
        self.cache.begin(start, n)
        t = torch.tensor(tokens, dtype=torch.long, device=self.torch_device)
        if self.runner is None:
            out = self.model(t, start, self.cache, logits_rows=logits_rows)
        elif self.runner.takes(n):
            if isinstance(logits_rows, str):
                rows = list(range(n)) if logits_rows == "all" else [n - 1]
            else:
                rows = [int(r) for r in logits_rows]
            table = self.cache.table(start + n)
            out, _ = self.runner.forward(
                self.model.embed(t), list(range(start, start + n)), [table] * n, rows
            )
        else:
            out = self.model(t, start, self.cache.step(start, n), logits_rows=logits_rows)
        self.cache.length = start + n
        self.cached_tokens[start:] = tokens
        return out

    def prefill(self, prompt: list[int]) -> tuple[torch.Tensor, int]:
        """Make the cache hold `prompt`; returns the last logits and how many prompt tokens were reused."""
        if len(prompt) > self.context_length:
            raise ContextOverflowError(
                f"the prompt is {len(prompt)} tokens but the context window is {self.context_length}"
            )
        reuse = common_prefix(self.cached_tokens, prompt)
        reuse = min(reuse, len(prompt) - 1)  # always recompute at least one token to get logits
        self.cache.truncate(reuse)
        del self.cached_tokens[reuse:]
        logits = None
        for s in range(reuse, len(prompt), PREFILL_CHUNK):
            logits = self.forward(prompt[s : s + PREFILL_CHUNK], s)
        assert logits is not None
        return logits[-1], reuse

    def generate_ids(
        self, prompt: list[int], params: SamplingParams, stats: GenerationStats
    ) -> Iterator[int]:
        self.file_guard.check()
        sampler = Sampler(params)
        logits, reused = self.prefill(prompt)
        stats.cached_tokens = reused
        history = list(prompt)
        while True:
            tok = sampler(logits, history)
            yield tok
            history.append(tok)
            if len(history) >= self.context_length:
                return
            logits = self.forward([tok], len(history) - 1)[-1]

    def teacher_forced_logits(self, tokens: list[int], chunk: int = PREFILL_CHUNK) -> torch.Tensor:
        """Logits [len(tokens), vocab] for every position, `chunk` tokens per forward from an empty cache.

        chunk=1 runs the decode path (packed int4 matmuls); larger chunks the prefill path.
        """
        self.cache.truncate(0)
        self.cached_tokens.clear()
        outs = [
            self.forward(tokens[s : s + chunk], s, logits_rows="all") for s in range(0, len(tokens), chunk)
        ]
        return torch.cat(outs)

