"""What the engine tracks per generation: requests, their sequences, and the events streamed back.

A `Request` is one prompt with n parallel samples; each sample is a `Sequence` with its own token list,
block table, sampler and event queue. The engine thread is the only writer of a sequence's state;
other threads read events from its queue through `SequenceStream`.
"""

from __future__ import annotations

import enum
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import torch

from ripelm.runtime.block_allocator import BlockTable
from ripelm.runtime.grammar import Constraint
from ripelm.runtime.proposer import Proposer
from ripelm.runtime.sampling import Sampler, SamplingParams
from ripelm.runtime.spec_control import SpecController
from ripelm.runtime.token_logprobs import TokenLogprob


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class SpecTally:
    """A speculating sequence's figures. The engine streams a copy with the first token of each decode step
    (`SpecToken`) and hands the last one back in `Finish.spec`."""

    proposer: str = ""  # "ngram"
    proposed: int = 0  # proposed tokens the target checked
    accepted: int = 0  # ... and accepted
    rounds: int = 0  # decode steps that checked at least one proposed token
    forwards: int = 0  # target forwards that produced its tokens: the prompt's last, then each decode step
    state: str = ""  # the controller's current choice, e.g. "k=4, predicted 1.9x" or "off"

    @property
    def acceptance(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    def copy(self) -> SpecTally:
        return replace(self)


class SpecToken:
    """A speculating sequence's token with its figures as of the step that produced it: one queue item, so
    the reader wakes once per token as for a plain sequence (a separate item for the figures, every step,
    cost 3-4% of decode speed on a 2-core machine, the reader's extra wake-ups taking the GIL from the
    engine thread)."""

    __slots__ = ("token", "spec")

    def __init__(self, token: int, spec: SpecTally):
        self.token, self.spec = token, spec


@dataclass
class Finish:
    """The last event of a sequence's stream."""

    reason: str  # "stop" (end-of-generation token), "length", "cancelled", "error"
    cached_tokens: int = 0  # prompt tokens served from the prefix cache at first admission
    computed_tokens: int = 0  # tokens the model ran for this sequence (prefill + decode + recompute)
    preemptions: int = 0
    error: Exception | None = None
    spec: SpecTally | None = None  # a speculating sequence's final figures


@dataclass(eq=False)
class Sequence:
    id: int
    tokens: list[int]  # prompt + generated; K/V exist for tokens[:table.num_tokens]
    prompt_len: int
    params: SamplingParams
    sampler: Sampler
    max_new: int  # most tokens this sequence may generate
    stop_ids: frozenset[int]
    out: queue.Queue
    request: Request
    table: BlockTable = field(default_factory=BlockTable)
    status: SeqStatus = SeqStatus.WAITING
    order: int = 0  # admission order; preemption takes the newest
    cached_tokens: int = -1  # set at first admission
    computed_tokens: int = 0
    preemptions: int = 0
    forks: int = 0  # parallel samples still to fork off once the prompt's logits exist
    proposer: Proposer | None = None  # speculation: proposes tokens at decode steps (None: plain decoding)
    spec_k: int = 0  # most tokens proposed per decode step
    controller: SpecController | None = None  # how many to propose this step, from measured costs
    spec: SpecTally | None = None  # set for a speculating sequence
    # with a draft model (`runtime.draft_runner`): the draft's block table, the tokens its K/V hold, how many
    # of those are known to equal `tokens`, and the distributions of the latest proposals (None: greedy)
    constraint: Constraint | None = None  # structured output: the grammar's token mask (runtime.grammar)
    alternatives: list | None = None  # speculate="auto": [(proposer, controller)] of each kind, see choose
    draft_table: BlockTable = field(default_factory=BlockTable)
    draft_ids: list[int] = field(default_factory=list)
    draft_synced: int = 0
    draft_q: torch.Tensor | None = None

    @property
    def remaining(self) -> int:
        """Tokens whose K/V must be computed before the next token can be sampled."""
        return len(self.tokens) - self.table.num_tokens

    @property
    def generated(self) -> int:
        return len(self.tokens) - self.prompt_len


class Request:
    """A prompt submitted to the engine; `streams[i]` yields the token ids of sample i."""

    def __init__(self, request_id: int, n: int):
        self.id = request_id
        self.n = n
        self.queues: list[queue.Queue] = [queue.Queue() for _ in range(n)]
        self.streams = [SequenceStream(q, self) for q in self.queues]
        self.sequences: list[Sequence] = []
        self.cancel_requested = threading.Event()
        self.cancelled = threading.Event()  # set by the engine once the request's blocks are freed
        self.dropped: set[int] = set()  # samples cancelled on their own (their readers left)
        self._cancel_fn = None

    def cancel(self, index: int | None = None) -> threading.Event:
        """Stop all samples now; the returned event is set when the engine has freed their blocks. With an
        index: stop that sample only (the others go on; the event is not set for it)."""
        if index is not None and self.n > 1:
            if self._cancel_fn is not None and index not in self.dropped:
                self.dropped.add(index)
                self._cancel_fn(self)
            return self.cancelled
        if self._cancel_fn is not None and not self.cancel_requested.is_set():
            self.cancel_requested.set()
            self._cancel_fn(self)
        return self.cancelled


class SequenceStream:
    """Iterates one sample's token ids; `finish` holds the final event once the iteration ends."""

    def __init__(self, q: queue.Queue, request: Request):
        self._q = q
        self.request = request
        self.finish: Finish | None = None
        self.cached_tokens: int | None = None
        self.spec: SpecTally | None = None  # a speculating sequence's figures as of its latest tokens
        self.logprobs: list[TokenLogprob] = []  # with `SamplingParams.logprobs`: one per token yielded

    def __iter__(self) -> Iterator[int]:
        while self.finish is None:
            item = self._q.get()
            if isinstance(item, Finish):
                self.finish = item
                if item.spec is not None:
                    self.spec = item.spec
                if item.error is not None:
                    raise item.error
                return
            if type(item) is SpecToken:
                self.spec = item.spec
                yield item.token
                continue
            if isinstance(item, tuple):  # ("cached", n): sent once, before the first token
                self.cached_tokens = item[1]
                continue
            if isinstance(item, TokenLogprob):
                self.logprobs.append(item)
                continue
            yield item
