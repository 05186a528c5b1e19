"""Wrong answers to exercise 9.3 (labs/kv_offload.py: OffloadingConnector), planted in the reference solution, for
tests/graders/test_ch09_offload.py::test_planted_mistakes_are_caught; and valid answers written differently, for
test_valid_alternatives_pass. Records are tests/graders/planted.py's `Mistake`: `check` names the grader's check
(test_ch09_offload.CHECKS, or "engine" for the two-rank engine run) that must catch it (or pass it); `points_at`
the regexes one of which the line the learner reads must match.

Several mistakes cost nothing visible on an easy run: a connector that saves every block after every step gives
the same tokens (it only moves more bytes), one that counts every held block after the local hits gives the same
tokens whenever the tier holds whole prefixes; only a grader that checks which blocks cross, and a prefix that
breaks midway, catches them. `build(name)` returns an object with `.OffloadingConnector` and `.TierConnector`
that the graders' check functions accept in place of load_impl("kv_offload").
"""
from __future__ import annotations

import itertools
import types

from tests.graders.planted import Mistake

M, S, E = "match", "save", "engine"

MISTAKES = [
    Mistake("9.3", "count_anywhere", "every block the tier holds after the local hits counts, not the leading run",
            (r"breaks midway",), check=M),
    Mistake("9.3", "loads_last_token", "a request of whole blocks loads its last block", (r"never the request's last",),
            check=M),
    Mistake("9.3", "from_block_zero", "the run counted from block 0, local hits included",
            (r"AFTER the local hits",), check=M),
    Mistake("9.3", "returns_blocks", "the number of blocks returned, not tokens", (r"TOKENS",), check=M),
    Mistake("9.3", "prompt_only", "the prompt's blocks only: a re-admitted request's generated tokens never load",
            (r"ALL its tokens",), check=M),
    Mistake("9.3", "saves_partial", "the partial block of the computed tokens saved too (ceil, not floor)",
            (r"partial, never saved",), check=S),
    Mistake("9.3", "saves_twice", "every full block sent after every step, whatever the tier holds",
            (r"each hash once",), check=S),
    Mistake("9.3", "saves_uncomputed", "full blocks of all the request's tokens, computed or not",
            (r"no keys and values yet",), check=S),
]

ALTERNATIVES = [
    Mistake("9.3", "cursor_and_takewhile", "vLLM's per-request cursor of stored blocks (next_stored_chunk_idx) "
            "plus the tier filter; itertools.takewhile for the run", (), check=M),
    Mistake("9.3", "cursor_and_takewhile_save", "the same, on the save checks", (), check=S),
    Mistake("9.3", "cursor_and_takewhile_engine", "the same, in the engine with the tier in another process", (),
            check=E),
]


def build(name: str | None):
    """The reference implementation with `name` planted (None: unmodified)."""
    import solutions.kv_offload as sol
    from helpers.course.kv_offload import TierConnector
    impl = types.SimpleNamespace(OffloadingConnector=sol.OffloadingConnector, TierConnector=TierConnector)
    if name is not None:
        impl.OffloadingConnector = type(f"OffloadingConnector_{name}", (sol.OffloadingConnector,), _PLANT[name])
    return impl


def _run(connector, request, first, last):
    hashes = connector.block_hashes(request)
    hits = 0
    for h in hashes[first:last]:
        if not connector.tier.lookup(h):
            break
        hits += 1
    return hits


def _count_anywhere(self, request, num_computed_tokens):
    hashes, size = self.block_hashes(request), self.block_size
    last = (request.num_tokens - 1) // size
    return size * sum(1 for h in hashes[num_computed_tokens // size:last] if self.tier.lookup(h))


def _loads_last_token(self, request, num_computed_tokens):
    size = self.block_size
    return size * _run(self, request, num_computed_tokens // size, request.num_tokens // size)


def _from_block_zero(self, request, num_computed_tokens):
    size = self.block_size
    return size * _run(self, request, 0, (request.num_tokens - 1) // size)


def _returns_blocks(self, request, num_computed_tokens):
    size = self.block_size
    return _run(self, request, num_computed_tokens // size, (request.num_tokens - 1) // size)


def _prompt_only(self, request, num_computed_tokens):
    size = self.block_size
    return size * _run(self, request, num_computed_tokens // size, (request.num_prompt_tokens - 1) // size)


def _saves_partial(self, request, num_computed_tokens):
    hashes = self.block_hashes(request)
    end = min(-(-num_computed_tokens // self.block_size), len(hashes))
    return [i for i in range(end) if not self.tier.lookup(hashes[i])]


def _saves_twice(self, request, num_computed_tokens):
    return list(range(num_computed_tokens // self.block_size))


def _saves_uncomputed(self, request, num_computed_tokens):
    hashes = self.block_hashes(request)
    return [i for i in range(len(hashes)) if not self.tier.lookup(hashes[i])]


def _takewhile_match(self, request, num_computed_tokens):
    size, hashes = self.block_size, self.block_hashes(request)
    candidates = hashes[num_computed_tokens // size:(request.num_tokens - 1) // size]
    return size * len(list(itertools.takewhile(self.tier.lookup, candidates)))


def _cursor_save(self, request, num_computed_tokens):
    cursors = self.__dict__.setdefault("stored_upto", {})
    hashes = self.block_hashes(request)
    start, end = cursors.get(request.rid, 0), num_computed_tokens // self.block_size
    cursors[request.rid] = max(start, end)
    return [i for i in range(start, end) if not self.tier.lookup(hashes[i])]


_ALT = {"get_num_new_matched_tokens": _takewhile_match, "blocks_to_save": _cursor_save}

_PLANT = {
    "count_anywhere": {"get_num_new_matched_tokens": _count_anywhere},
    "loads_last_token": {"get_num_new_matched_tokens": _loads_last_token},
    "from_block_zero": {"get_num_new_matched_tokens": _from_block_zero},
    "returns_blocks": {"get_num_new_matched_tokens": _returns_blocks},
    "prompt_only": {"get_num_new_matched_tokens": _prompt_only},
    "saves_partial": {"blocks_to_save": _saves_partial},
    "saves_twice": {"blocks_to_save": _saves_twice},
    "saves_uncomputed": {"blocks_to_save": _saves_uncomputed},
    "cursor_and_takewhile": _ALT,
    "cursor_and_takewhile_save": _ALT,
    "cursor_and_takewhile_engine": _ALT,
}
