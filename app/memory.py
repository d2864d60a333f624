"""Memory: facts and preferences the user states, saved with where they were said, for later chats.

Two ways in:

* ``/remember TEXT`` (and the memory panel) saves exactly what the user asks, always.
* The assistant saves what the user states about themselves. That is done by :func:`detect_memories`, a
  small rule-based detector of first-person statements ("I'm vegetarian", "call me Sam", "my project
  uses Postgres", "I prefer tabs"), run on each message the user sends in a chat with memory on; the
  memory saved is shown in the app (and in ``--plain``), where ``/forget`` drops it.

Why rules and not the model: the bundled model is SmolLM2-135M, too small to be relied on to decide by
itself when to call a ``remember`` tool (a grammar can force *a* call, but then every message is saved
and the decision is no longer the model's). The rules cost nothing, behave the same on every engine
(native, llama.cpp, ``--engine openai``), and only take what the user plainly said about themselves. A
model tool can be added on top with :func:`save_memory`.

A detected statement is stored in the third person ("The user's name is Sam."): recalled in front of a
later message, a first-person "My name is Sam" would read as if the user said it again there.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ripelm.chat_store import ChatStore
from ripelm.chat_store.records import Memory

MAX_STATEMENT_CHARS = 200  # a longer sentence is a story or a request, not a fact to keep

_LEAD = re.compile(
    r"^(?:(?:hi|hello|hey|ok|okay|so|also|and|btw|by the way|well|oh|fyi|just so you know)\b[,!.:]?\s*)+",
    re.I,
)
_NAME = re.compile(
    r"^(?:(?:please\s+)?call me|my name is|my name's|i go by|i'm called|i am called)\s+"
    r"([A-Za-z][\w'-]*(?:\s+[A-Z][\w'-]*)?)\s*$",
    re.I,
)
# "I <verb> ..." -> "The user <verb>s ...": the verbs that state a lasting fact or preference
_VERBS = {
    "prefer": "prefers", "like": "likes", "love": "loves", "hate": "hates", "dislike": "dislikes",
    "use": "uses", "work": "works", "live": "lives", "have": "has", "own": "owns", "speak": "speaks",
    "study": "studies", "teach": "teaches", "write": "writes", "drive": "drives", "eat": "eats",
    "don't like": "does not like", "do not like": "does not like", "don't eat": "does not eat",
    "do not eat": "does not eat", "always use": "always uses", "usually use": "usually uses",
    "mostly use": "mostly uses", "never use": "never uses",
}  # fmt: skip
_VERB_WORDS = "|".join(sorted(map(re.escape, _VERBS), key=len, reverse=True))
_VERB = re.compile(rf"^i\s+({_VERB_WORDS})\s+(.+)$", re.I)
_IAM = re.compile(r"^(?:i'm|i’m|i am)\s+(.+)$", re.I)
_MY = re.compile(r"^my\s+([\w' -]{1,40}?)\s+(is|are|was|uses|use|runs|has|have|lives|works)\s+(.+)$", re.I)
# "I'm tired / going / not sure ...": states of the moment, not facts about the user
_PASSING = {
    "tired", "hungry", "sorry", "sure", "not", "going", "trying", "looking", "wondering", "here", "back",
    "done", "fine", "ok", "okay", "good", "great", "confused", "curious", "happy", "sad", "bored", "glad",
    "afraid", "just", "still", "about", "asking", "thinking", "ready", "busy", "late", "stuck", "lost",
    "so", "very", "really", "also", "a", "an", "the", "in", "on", "at", "with", "getting", "having",
    "interested", "excited", "worried", "new", "kidding", "joking",
}  # fmt: skip
# "I have a question", "my code is broken", "I'm a bit lost": about the conversation, not the user
_NOT_FACTS = {
    "question", "questions", "problem", "problems", "issue", "issues", "error", "errors", "bug", "bugs",
    "request", "point", "answer", "guess", "bad", "doubt", "query", "idea", "task", "bit", "little", "lot",
    "broken", "failing", "crashing", "wrong", "down", "missing", "giving", "throwing", "returning", "too",
}  # fmt: skip
_IDENTITY = re.compile(r"^(?:a|an)\s+\w+", re.I)  # "I'm a teacher", "I am an engineer"
_PLACE = re.compile(r"^(?:from|based in|living in)\s+\w", re.I)


def _sentences(text: str) -> list[str]:
    parts = re.split(r"(?<=[.!?])\s+|\n+", text)
    return [p.strip() for p in parts if p.strip()]


def _third_person(rest: str) -> str:
    rest = re.sub(r"\bmy\b", "their", rest, flags=re.I)
    rest = re.sub(r"\bI'm\b|\bI am\b", "they are", rest)
    return re.sub(r"\bme\b", "them", re.sub(r"\bI\b", "they", rest))


def _fact(sentence: str) -> str | None:
    s = _LEAD.sub("", sentence).strip()
    if not s or s.endswith("?") or len(s) > MAX_STATEMENT_CHARS:
        return None
    s = s.rstrip(".!").strip()
    if m := _NAME.match(s):
        name = " ".join(w[:1].upper() + w[1:] for w in m.group(1).split())
        return f"The user's name is {name}."
    if m := _VERB.match(s):
        if _NOT_FACTS & set(m.group(2).lower().split()[:3]):
            return None
        return f"The user {_VERBS[m.group(1).lower()]} {_third_person(m.group(2))}."
    if m := _MY.match(s):
        words = {*m.group(1).lower().split(), m.group(3).split()[0].lower()}
        if m.group(1).lower() == "name" or _NOT_FACTS & words:
            return None  # "my name is ..." with more than a name after it; "my code is broken"
        return f"The user's {m.group(1)} {m.group(2)} {_third_person(m.group(3))}."
    if m := _IAM.match(s):
        rest = m.group(1)
        first = rest.split()[0].lower().strip(",")
        if re.fullmatch(r"[A-Z][\w'-]*(?:\s+[A-Z][\w'-]*)?", rest) and first not in _PASSING:
            return f"The user's name is {rest}."  # "I'm Sam"
        if _NOT_FACTS & set(rest.lower().split()[:2]):
            return None
        if _IDENTITY.match(rest) or _PLACE.match(rest):
            return f"The user is {_third_person(rest)}."
        if first in _PASSING or first.endswith("ing") or len(rest.split()) > 6:
            return None
        return f"The user is {_third_person(rest)}."
    return None


def detect_memories(text: str) -> list[str]:
    """The facts the user states about themselves in a message, in the third person (none for questions,
    requests, or passing states such as "I'm tired")."""
    out: list[str] = []
    for sentence in _sentences(text):
        fact = _fact(sentence)
        if fact and fact not in out:
            out.append(fact)
    return out


def save_memory(store: ChatStore, text: str, chat_id: int | None, message_id: int | None) -> Memory:
    """Save a memory with its provenance (the chat and the message it comes from). The plain entry point
    for `/remember`, the detector and a model tool; ChatStoreError for an empty or overlong text."""
    return store.add_memory(text, chat_id=chat_id, message_id=message_id)


@dataclass
class Saved:
    memory: Memory
    new: bool  # False: the same memory was already stored


def remember_statements(store: ChatStore, text: str, chat_id: int, message_id: int) -> list[Saved]:
    """The detector's path: save each fact stated in the user's message (stored as `message_id`)."""
    known = {m.content.lower() for m in store.memories()}
    out = []
    for fact in detect_memories(text):
        out.append(Saved(save_memory(store, fact, chat_id, message_id), fact.lower() not in known))
    return out
