"""Chapter 9: a KV offload tier behind the engine's connector — load a prefix the device evicted, don't recompute it.

Exercise 9.3  `OffloadingConnector`: the decisions of vLLM's offloading connector, by block hash —
              `get_num_new_matched_tokens`: how many tokens after a new request's local prefix-cache hits the host
              tier can supply (the longest run of its next block hashes the tier holds, whole blocks only, never
              the request's last token); `blocks_to_save`: which blocks to copy to the tier after a step (full
              blocks of the tokens computed so far, each hash once: never one the tier already holds).

The plumbing is given (helpers/course/kv_offload.py): `TierConnector` hashes each request's blocks (the prefix
cache's chain, exercise 7.3's `block_hashes`; `self.block_hashes(request)`: one hash per FULL block of
request.all_token_ids), moves the blocks (`load`, `save`) and holds `self.tier`, a HostTierClient whose
`lookup(block_hash) -> bool` says whether the tier holds a block (a local question: vLLM's OffloadingManager
runs in the scheduler's process, and so does the course's index). `self.block_size` is the engine's block size.

vLLM 0.32 does the same in `vllm/distributed/kv_transfer/kv_connector/v1/offloading/scheduler.py`:
`_maximal_prefix_lookup` counts consecutive hits from the first block after the local hits and stops at the
first miss; `_build_store_jobs` offers each step the full blocks computed so far that the request has not stored
(`next_stored_chunk_idx`), and the manager's `prepare_store` (`vllm/v1/kv_offload/cpu/manager.py`) keeps only
the keys the tier does not already hold. vLLM lets the lookup reach a request's last token and then recomputes
that token (`vllm/v1/core/sched/scheduler.py`: "a full prompt hit re-computes that token"); the course's
scheduler asks for it never to be offered (helpers/course/engine/kv_connector.py), as the prefix cache does.
"""
from __future__ import annotations

from helpers.course.kv_offload import TierConnector


class OffloadingConnector(TierConnector):
    """Exercise 9.3 — what the offloading connector loads and what it saves (the plumbing is TierConnector's).

    get_num_new_matched_tokens(request, num_computed_tokens) -> int
        num_computed_tokens: the request's local prefix-cache hits (a multiple of block_size). Returns the
        tokens AFTER them that the tier supplies: block_size × the number of consecutive blocks, starting at
        block num_computed_tokens // block_size, whose hashes (self.block_hashes(request)) the tier holds
        (self.tier.lookup), stopping at the first it does not; only blocks that end before the request's last
        token (that token must be computed: its logits give the next token), so a block holding position
        request.num_tokens - 1 is never counted. 0 when nothing matches. Moves no bytes.
    blocks_to_save(request, num_computed_tokens) -> list of block indices (ascending)
        After a step, the request's first num_computed_tokens tokens have keys and values. The indices i of its
        FULL blocks among them (i < num_computed_tokens // block_size) whose hash the tier does not hold yet —
        so a partial block is never saved, a block computed by another request with the same prefix is not
        saved again, and a block saved after an earlier step is not sent twice.
    """

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> int:
        raise NotImplementedError("Exercise 9.3: OffloadingConnector.get_num_new_matched_tokens is not written yet "
                                  "(labs/kv_offload.py)")

    def blocks_to_save(self, request, num_computed_tokens: int) -> list:
        raise NotImplementedError("Exercise 9.3: OffloadingConnector.blocks_to_save is not written yet "
                                  "(labs/kv_offload.py)")
