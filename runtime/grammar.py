"""Structured output: grammar-constrained sampling, a token mask per sequence from llguidance.

A request's grammar (`SamplingParams.grammar`: a JSON schema, "any JSON object", a regular expression or a
Lark grammar) becomes a `Constraint` per sequence: before each token is sampled the logits of the tokens the
grammar does not allow at that point are set to -inf; the sampled token is then fed to the matcher. Once the
grammar is complete only end-of-generation tokens remain allowed, so the sequence ends there.

Why llguidance (and not xgrammar): one abi3 wheel with no dependencies (xgrammar's wheels pull in
transformers and are built per Python and torch version), a tokenizer made straight from llama.cpp's
vocabulary (which is our tokenizer, `runtime.tokenizer`), JSON schema, regex and Lark (with GBNF
conversion, as llama.cpp's server offers) in one matcher, about 40 us per mask for a 49k vocabulary on one
core, and rollback, which verifying speculative proposals under the mask needs.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import numpy as np

from ripelm.runtime.errors import BadSamplingError

if TYPE_CHECKING:
    import torch

    from ripelm.runtime.tokenizer import Tokenizer

GRAMMAR_KINDS = ("json_object", "json_schema", "regex", "lark", "gbnf")


def validate_grammar(grammar: tuple[str, str]) -> None:
    """BadSamplingError naming what is wrong with a (kind, text) grammar, without a tokenizer."""
    from llguidance import LLMatcher

    kind, text = grammar
    if kind not in GRAMMAR_KINDS:
        raise BadSamplingError(f"unknown grammar kind '{kind}' (choose from {', '.join(GRAMMAR_KINDS)})")
    problem = LLMatcher.validate_grammar(_grammar_text(kind, text))
    if problem:
        first = problem.strip().splitlines()[0]
        raise BadSamplingError(f"invalid {kind.replace('_', ' ')} grammar: {first}")


def _grammar_text(kind: str, text: str) -> str:
    """llguidance's grammar for a (kind, text) pair; BadSamplingError if the text does not parse."""
    from llguidance import LLMatcher
    from llguidance.gbnf_to_lark import gbnf_to_lark

    try:
        if kind == "json_object":
            return LLMatcher.grammar_from_json_schema({"type": "object"})
        if kind == "json_schema":
            schema = json.loads(text)
            if not isinstance(schema, dict):
                raise BadSamplingError("a JSON schema must be a JSON object")
            return LLMatcher.grammar_from_json_schema(schema)
        if kind == "regex":
            return LLMatcher.grammar_from_regex(text)
        if kind == "gbnf":
            return LLMatcher.grammar_from_lark(gbnf_to_lark(text))
        return LLMatcher.grammar_from_lark(text)
    except BadSamplingError:
        raise
    except (ValueError, TypeError) as e:  # json.JSONDecodeError is a ValueError
        raise BadSamplingError(f"invalid {kind.replace('_', ' ')} grammar: {e}") from None


def _lltokenizer(tokenizer: Tokenizer):  # noqa: ANN202 - an llguidance.LLTokenizer
    llt = getattr(tokenizer, "_llguidance", None)
    if llt is None:
        import warnings

        from llguidance.llamacpp import lltokenizer_from_vocab

        with warnings.catch_warnings():  # llama-cpp-python deprecates the per-token call llguidance makes
            warnings.simplefilter("ignore", DeprecationWarning)
            llt = lltokenizer_from_vocab(
                tokenizer._require_open(), n_vocab=tokenizer.vocab_size, eos_token=sorted(tokenizer.eog_ids)
            )
        tokenizer._llguidance = llt
    return llt


class Constraint:
    """One sequence's position in a grammar."""

    def __init__(self, tokenizer: Tokenizer, grammar: tuple[str, str], *, _matcher=None):  # noqa: ANN001
        from llguidance import LLMatcher

        self.tokenizer, self.grammar = tokenizer, grammar
        self.vocab = tokenizer.vocab_size
        if _matcher is not None:
            self.matcher = _matcher
            return
        kind, text = grammar
        validate_grammar(grammar)
        self.matcher = LLMatcher(_lltokenizer(tokenizer), _grammar_text(kind, text))
        if self.matcher.is_error():
            raise BadSamplingError(f"invalid {kind.replace('_', ' ')} grammar: {self.matcher.get_error()}")

    def copy(self) -> Constraint:
        """An independent matcher in the same state (a parallel sample forks here)."""
        return Constraint(self.tokenizer, self.grammar, _matcher=self.matcher.deep_copy())

    def allowed(self) -> np.ndarray:
        """bool [vocab]: the tokens the grammar allows next."""
        words = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
        return np.unpackbits(words, bitorder="little")[: self.vocab].astype(bool)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """The logits with every token the grammar forbids next at -inf."""
        import torch

        allowed = torch.from_numpy(self.allowed())
        out = torch.full_like(logits, float("-inf"))
        n = min(out.shape[-1], allowed.shape[0])
        keep = allowed[:n].to(logits.device)
        out[..., :n] = torch.where(keep, logits[..., :n], out[..., :n])
        return out

    def sample(self, sampler, logits: torch.Tensor, history: list[int]) -> int:  # noqa: ANN001 - a Sampler
        """The sampler's token among those the grammar allows, fed to the matcher."""
        tok = sampler(self.apply(logits), history)
        self.consume(tok)
        return tok

    def look_ahead(self, token: int) -> bool:
        """Consume a proposed token to see the masks after it (undo with `rollback`); False for an
        end-of-generation token, which is not consumed (a stopped matcher cannot be rolled back, and nothing
        follows it anyway)."""
        if token in self.tokenizer.eog_ids:
            return False
        self.consume(token)
        return True

    def rollback(self, n: int) -> None:
        if n and not self.matcher.rollback(n):
            raise RuntimeError(f"the grammar could not roll back {n} tokens: {self.matcher.get_error()}")

    def consume(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise RuntimeError(f"token {token} was sampled against the grammar: {self.matcher.get_error()}")
