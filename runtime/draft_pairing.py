"""Open a target with a draft model for speculative decoding, or say clearly why that cannot be done.

Both models run on the native engine on the same device. A draft that does not open (missing, not a valid
GGUF, not runnable natively) or does not share the target's vocabulary is a `DraftModelError` naming the
draft; a draft length of 0 means plain decoding. `auto` never fails for want of a draft: with none to pair
or make, the target speculates with prompt lookup in the engine instead, and says so.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ripelm.models.errors import RipelmError
from ripelm.models.gguf_file import GGUFFile, open_gguf
from ripelm.runtime.backend import Backend
from ripelm.runtime.errors import DraftModelError
from ripelm.runtime.spec_control import DraftPolicy


def check_vocab(target: GGUFFile, draft: GGUFFile) -> None:
    """DraftModelError unless the draft's tokenizer vocabulary is the target's, token for token."""
    tt = target.get("tokenizer.ggml.tokens")
    dt = draft.get("tokenizer.ggml.tokens")
    if not isinstance(tt, list) or not isinstance(dt, list):
        raise DraftModelError("cannot pair a draft: the target or the draft has no tokenizer vocabulary")
    if len(tt) != len(dt):
        raise DraftModelError(
            f"the draft's vocabulary has {len(dt)} tokens but the target's has {len(tt)}: "
            "a draft must share the target's tokenizer"
        )
    if tt != dt:
        i = next(i for i, (a, b) in enumerate(zip(tt, dt, strict=True)) if a != b)
        raise DraftModelError(
            f"the draft's vocabulary differs from the target's (token {i}: {dt[i]!r} vs {tt[i]!r}): "
            "a draft must share the target's tokenizer"
        )


def open_speculative(
    target_path: Path,
    draft_path: Path,
    *,
    device: str | None = None,
    n_ctx: int | None = None,
    threads: int | None = None,
    kv_memory: int | None = None,
    policy: DraftPolicy | None = None,
    speculate: str = "auto",
) -> Backend:
    """The native engine over the target with the draft model inside it. `speculate="draft"`: every
    sequence drafts with it; "auto": per sequence and step, the draft model or prompt lookup."""
    from ripelm.runtime.device import set_threads
    from ripelm.runtime.engine_backend import EngineBackend
    from ripelm.runtime.engine_spec import DEFAULT_SPEC_K
    from ripelm.runtime.engines import native_support_problem

    policy = policy or DraftPolicy()
    policy.validate()
    try:
        dg = open_gguf(draft_path)
    except RipelmError as e:
        raise DraftModelError(f"cannot use draft model {draft_path.name}: {e}") from None
    problem = native_support_problem(dg)
    if problem is not None:
        dg.close()
        raise DraftModelError(f"cannot use draft model {draft_path.name}: {problem}")
    tg = open_gguf(target_path)
    problem = native_support_problem(tg)
    if problem is not None:
        tg.close()
        dg.close()
        raise DraftModelError(f"speculative decoding needs the native engine for the target: {problem}")
    try:
        check_vocab(tg, dg)
    except DraftModelError:
        tg.close()
        dg.close()
        raise
    set_threads(threads)
    return EngineBackend(
        target_path,
        device=device,
        n_ctx=n_ctx,
        kv_memory=kv_memory,
        gguf=tg,
        speculate=speculate,
        spec_k=policy.fixed_k if policy.fixed_k is not None else DEFAULT_SPEC_K,
        spec_adaptive=policy.fixed_k is None,
        draft_path=draft_path,
        draft_gguf=dg,
    )


def open_with_draft(
    target_path: Path,
    draft_spec: str,
    *,
    engine: str = "auto",
    device: str | None = None,
    n_ctx: int | None = None,
    threads: int | None = None,
    draft_k: int | None = None,
    kv_memory: int | None = None,
    notice: Callable[[str], None] | None = None,
    progress: Callable[[int, int, str], None] | None = None,
    speculate: str = "auto",
) -> Backend:
    """What `--draft` opens: the target with its draft, or the target alone where `auto` finds no draft."""
    from ripelm.models.drafts import resolve_draft
    from ripelm.runtime.engines import native_support_problem, open_backend

    say = notice or (lambda _msg: None)

    def plain(speculate: str = "off") -> Backend:
        return open_backend(
            target_path,
            engine=engine,
            device=device,
            n_ctx=n_ctx,
            threads=threads,
            kv_memory=kv_memory,
            notice=notice,
            speculate=speculate,
            spec_k=draft_k,
        )

    if engine == "llama.cpp":
        raise DraftModelError("--draft needs the native engine (drop --engine llama.cpp)")
    policy = DraftPolicy(fixed_k=draft_k)
    policy.validate()
    if draft_k == 0:
        say("draft length 0: decoding without speculation")
        return plain()
    if draft_spec == "auto":
        tg = open_gguf(target_path)
        problem = native_support_problem(tg)
        tg.close()
        if problem is not None:
            say(f"no speculative decoding: {problem}")
            return plain()
    try:
        choice = resolve_draft(draft_spec, target_path, progress)
    except DraftModelError:
        raise
    except RipelmError as e:
        raise DraftModelError(f"draft model: {e}") from None
    if choice.path is None:
        say(f"{choice.reason}; speculating with prompt lookup instead")
        return plain("ngram")
    if draft_spec == "auto":
        say(choice.reason)
    return open_speculative(
        target_path,
        choice.path,
        device=device,
        n_ctx=n_ctx,
        threads=threads,
        kv_memory=kv_memory,
        policy=policy,
        speculate=speculate,
    )
