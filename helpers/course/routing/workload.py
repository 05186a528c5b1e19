"""Chapter 9's workload: multi-turn chat for several tenants, each with its own long system prompt.

This is the traffic where placement matters. Every request of a tenant starts with the tenant's system prompt
(hundreds of tokens); every turn of a session starts with the whole conversation so far (system prompt, earlier
user messages AND the answers the engine generated). A replica that served the tenant, or the session's earlier
turn, holds those blocks in its prefix cache; any other replica computes them again. llm-d's and Dynamo's
benchmarks use the same shape (shared system prompts, multi-turn sessions: the "prefix-heavy patterns" of llm-d's
precise prefix-cache routing guide, llm-d/llm-d guides/precise-prefix-cache-aware/README.md).

    workload = chat_workload(seed=0)                        # the chapter's workload
    skewed = chat_workload(hot_tenant_share=0.5, seed=0)    # one tenant sends half the sessions

The chapter's workload (the defaults): 16 tenants with system prompts of 384-640 tokens, 48 sessions of 4-8 turns
(user messages of 32-96 tokens, answers of 32-64), ~280 requests whose prompts grow to ~1,500 tokens. Sized so the
working set (16 system prompts and the live conversations, ~600 blocks of 16 tokens) is far larger than one
replica's cache (replay.py: 160 blocks) but fits the 8 replicas' caches together: a router that sends each
tenant and session where its blocks are wins; one that scatters them evicts everything everywhere.

A workload is a plan, not requests: a turn's prompt contains the previous turn's answer, which exists only once
the engine generated it, so the replay (replay.py) builds each Request when its turn arrives — `first_turn`
and `next_turn` below. Sessions start as a Poisson process (seeded); a session's next turn arrives `think`
seconds after its previous answer finished. Token ids are drawn from the tiny Llama's byte vocabulary with the
seed, so two tenants' prompts differ from their first block on.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from helpers.course.engine.request import Request

__all__ = ["Session", "ChatWorkload", "chat_workload", "first_turn", "next_turn"]

VOCAB = 256          # the tiny Llama's byte-level vocabulary (helpers/course/tokenizer.py)


@dataclass(frozen=True)
class Session:
    """One conversation: its tenant, when its first turn arrives, each turn's new user message (token ids) and
    answer length, and the think time before each later turn (seconds, modelled)."""
    sid: int
    tenant: int
    start: float
    user_messages: tuple          # tuple of tuples of token ids, one per turn
    answer_tokens: tuple          # max_tokens of each turn
    think: tuple                  # seconds before turn i (think[0] is unused: the session's start)


@dataclass(frozen=True)
class ChatWorkload:
    """System prompts (one per tenant, token ids) and the sessions, in start order."""
    system_prompts: tuple
    sessions: tuple
    label: str = "chat"

    @property
    def num_requests(self) -> int:
        return sum(len(s.user_messages) for s in self.sessions)

    def describe(self) -> str:
        per_tenant = [sum(1 for s in self.sessions if s.tenant == t) for t in range(len(self.system_prompts))]
        return (f"{self.label}: {len(self.system_prompts)} tenants (system prompts of "
                f"{min(map(len, self.system_prompts))}-{max(map(len, self.system_prompts))} tokens), "
                f"{len(self.sessions)} sessions (per tenant {per_tenant}), {self.num_requests} requests")


def chat_workload(num_tenants: int = 16, sessions: int = 48, turns: tuple = (4, 8), system_tokens: tuple = (384, 640),
                  user_tokens: tuple = (32, 96), answer_tokens: tuple = (32, 64), session_rate: float = 6.0,
                  think: float = 0.5, hot_tenant_share: float | None = None, seed: int = 0) -> ChatWorkload:
    """A seeded multi-tenant chat workload. Ranges (lo, hi) are drawn uniformly (inclusive).

    num_tenants: tenants, each with a system prompt of system_tokens tokens. sessions: conversations in all, each
    of `turns` turns with user messages of user_tokens tokens and answers of answer_tokens tokens.
    session_rate: sessions starting per second (Poisson). think: mean seconds between an answer and the next turn
    (exponential). hot_tenant_share: None, every tenant equally likely; else tenant 0 gets this share of the
    sessions and the others share the rest (a skewed workload: one hot tenant)."""
    if num_tenants < 1 or sessions < 1:
        raise ValueError(f"num_tenants={num_tenants} and sessions={sessions} must be at least 1")
    if hot_tenant_share is not None and not 0 < hot_tenant_share < 1:
        raise ValueError(f"hot_tenant_share={hot_tenant_share} must be in (0, 1), or None")
    rng = random.Random(seed)
    prompts = tuple(tuple(rng.randrange(VOCAB) for _ in range(rng.randint(*system_tokens)))
                    for _ in range(num_tenants))
    if hot_tenant_share is None:
        weights = [1.0] * num_tenants
    else:
        weights = [hot_tenant_share] + [(1 - hot_tenant_share) / max(num_tenants - 1, 1)] * (num_tenants - 1)
    t, out = 0.0, []
    for sid in range(sessions):
        t += rng.expovariate(session_rate)
        tenant = rng.choices(range(num_tenants), weights)[0]
        n = rng.randint(*turns)
        users = tuple(tuple(rng.randrange(VOCAB) for _ in range(rng.randint(*user_tokens))) for _ in range(n))
        answers = tuple(rng.randint(*answer_tokens) for _ in range(n))
        thinks = (0.0,) + tuple(rng.expovariate(1 / think) for _ in range(n - 1))
        out.append(Session(sid, tenant, t, users, answers, thinks))
    label = "chat" if hot_tenant_share is None else f"chat, tenant 0 hot ({hot_tenant_share:.0%} of sessions)"
    return ChatWorkload(prompts, tuple(out), label)


def _rid(session: Session, turn: int) -> str:
    return f"tenant{session.tenant}-s{session.sid}-turn{turn}"


def first_turn(workload: ChatWorkload, session: Session) -> Request:
    """The session's first request: system prompt + first user message, arriving at the session's start."""
    prompt = list(workload.system_prompts[session.tenant]) + list(session.user_messages[0])
    return Request(_rid(session, 0), prompt, session.answer_tokens[0], arrival=session.start)


def next_turn(session: Session, previous: Request, now: float) -> Request | None:
    """The turn after `previous` (finished at `now`): the whole conversation so far (previous prompt + its
    generated answer) + the next user message, arriving `think` seconds later; None after the last turn."""
    turn = int(str(previous.rid).rsplit("turn", 1)[1].split("+")[0]) + 1
    if turn >= len(session.user_messages):
        return None
    prompt = list(previous.prompt) + list(previous.tokens) + list(session.user_messages[turn])
    return Request(_rid(session, turn), prompt, session.answer_tokens[turn], arrival=now + session.think[turn])
