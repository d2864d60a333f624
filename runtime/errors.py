"""Errors a user can cause at generation time (bad prompt, too long, bad settings)."""

from __future__ import annotations

from ripelm.models.errors import RipelmError


class ContextOverflowError(RipelmError):
    """The prompt (plus what must be generated) does not fit the model's context window.

    `prompt_tokens` and `context_length` carry the numbers where they are known (a server engine's error
    may give them), so a caller can work out how much of a conversation to leave out."""

    def __init__(self, message: str, *, prompt_tokens: int | None = None, context_length: int | None = None):
        super().__init__(message)
        self.prompt_tokens = prompt_tokens
        self.context_length = context_length


class EmptyPromptError(RipelmError):
    """Nothing to generate from."""


class BackendError(RipelmError):
    """An engine could not be used (missing dependency, unsupported device...)."""


class BadSamplingError(RipelmError):
    """A sampling setting out of its range (negative temperature, top-p above 1...)."""


class BadSettingError(RipelmError):
    """A runtime setting that cannot work (a KV memory budget too small for one block...)."""


class DraftModelError(RipelmError):
    """A draft model that cannot pair with the target (different vocabulary, unusable file or settings)."""


class KVPoolError(ContextOverflowError):
    """A sequence cannot fit the KV pool even on its own (the pool, smaller than the window, is the limit)."""

    @classmethod
    def for_tokens(cls, n_tokens: int, pool_tokens: int) -> KVPoolError:
        return cls(
            f"the sequence is {n_tokens} tokens but the KV pool holds {pool_tokens}; raise --kv-memory"
        )


def check_context(n_prompt: int, context_length: int) -> None:
    """The one check that a prompt leaves room for a token in the context window.

    Its message is the format `ripe serve` answers with and `openai_backend` reads back the numbers from."""
    if n_prompt >= context_length:
        raise ContextOverflowError(
            f"the prompt is {n_prompt} tokens but the context window is {context_length}",
            prompt_tokens=n_prompt,
            context_length=context_length,
        )
