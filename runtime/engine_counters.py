"""The engine's counters: what it computed, what it holds, what speculation achieved (`Engine.snapshot`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EngineCounters:
    steps: int = 0
    prefill_tokens: int = 0  # prompt tokens computed (cache hits excluded)
    decode_tokens: int = 0  # tokens emitted by decode steps (accepted proposals included)
    preemptions: int = 0
    evictions: int = 0
    free_blocks: int = 0
    used_blocks: int = 0
    total_blocks: int = 0
    block_size: int = 0
    running: int = 0
    waiting: int = 0
    spec_rounds: int = 0  # (sequence, decode step) pairs that verified at least one proposed token
    spec_proposed: int = 0  # proposed tokens verified
    spec_accepted: int = 0  # ... and accepted
    draft_free_blocks: int = 0  # the draft model's own pool (all 0 without a draft model)
    draft_used_blocks: int = 0
    draft_total_blocks: int = 0
