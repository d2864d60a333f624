"""The native engine: our torch transformer over a GGUF file, one sequence at a time.

The KV cache survives between generations and is rewound to the longest common prefix of the new
prompt, so a chat turn that extends the previous one only prefills its new tokens.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from ripelm.models.file_guard import COPY_AT_LOAD_MAX_BYTES, FileState, ModelFileGuard
from ripelm.models.gguf_file import GGUFFile, open_gguf
from ripelm.runtime.backend import Capabilities, GenerationStats, common_prefix
from ripelm.runtime.chat_template import ChatTemplate
from ripelm.runtime.device import bound_heap_growth, compute_dtype, pick_device, release_free_memory
from ripelm.runtime.errors import ContextOverflowError
from ripelm.runtime.kv_cache import ContiguousKVCache, SequencePool
from ripelm.runtime.loader import check_supported, load_native_transformer, load_transformer
from ripelm.runtime.native_decode import NATIVE_KV_DTYPE, NativeRunner, NativeWeights, notice_once
from ripelm.runtime.sampling import Sampler, SamplingParams
from ripelm.runtime.tokenizer import Tokenizer

PREFILL_CHUNK = 512


def load_native(
    backend,
    model_path: str | Path,
    *,
    device: str | None,
    n_ctx: int | None,
    tokenizer: Tokenizer | None,
    reference: bool,
    gguf: GGUFFile | None,
) -> None:
    """Load a GGUF model onto `backend`: its path, gguf, file_guard, model, cfg, device, context, tokenizer,
    template. On the native step nothing of the file is kept (its weights are repacked, the file closed);
    otherwise a file up to COPY_AT_LOAD_MAX_BYTES is copied into memory first. Either way truncating the
    file later cannot fault, and `file_guard.check()` before each request reports any change."""
    bound_heap_growth()
    backend.path = Path(model_path)
    backend.gguf = gguf or open_gguf(backend.path)
    backend.file_guard = ModelFileGuard(backend.path, backend.gguf.state or _state_now(backend.path))
    backend.torch_device = pick_device(device)
    backend.device = str(backend.torch_device)
    dtype = compute_dtype(backend.torch_device)
    native = None
    if not reference:
        # The native step's repacked weights become the model's only copy; nothing reads the file after.
        native = NativeWeights.pack(backend.gguf, check_supported(backend.gguf), backend.torch_device)
        if native is None and backend.torch_device.type == "cpu":
            notice_once()
    if native is not None:
        backend.model = load_native_transformer(backend.gguf, native, dtype=dtype)
        backend.gguf.close()  # unmapped: nothing reads the file again, so no page of it stays resident
    else:
        if backend.gguf.file_size <= COPY_AT_LOAD_MAX_BYTES:
            backend.gguf.load_into_memory()
        backend.model = load_transformer(
            backend.gguf, device=backend.torch_device, dtype=dtype, reference=reference
        )
    backend.dtype = backend.model.dtype
    release_free_memory()
    cfg = backend.model.cfg
    backend.cfg = cfg
    backend.context_length = min(n_ctx or 4096, cfg.context_length)
    backend.tokenizer = tokenizer or Tokenizer(backend.path)
    backend.template = ChatTemplate(
        cfg.chat_template, bos_token=backend.tokenizer.bos_text, eos_token=backend.tokenizer.eos_text
    )


def _state_now(path: Path) -> FileState:
    return FileState.of(path.stat())


class NativeBackend:
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
        load_native(
            self, model_path, device=device, n_ctx=n_ctx, tokenizer=tokenizer, reference=reference, gguf=gguf
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

    def close(self) -> None:
        self.gguf.close()
        self.file_guard.close()
