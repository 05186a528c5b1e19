"""The KV connector: how KV computed elsewhere enters a request's blocks, and how finished blocks leave.

vLLM V1's `KVConnectorBase_V1` (`vllm/distributed/kv_transfer/kv_connector/v1/base.py`) has two halves: on the
scheduler side, `get_num_new_matched_tokens(request, num_computed_tokens)` says how many tokens after the local
prefix-cache hits an external store can supply, and `update_state_after_alloc` learns the blocks they go to; on
the worker side, `start_load_kv` fills those blocks before the forward and `save_kv_layer`/`wait_for_save` send
computed blocks out. Disaggregated prefill (a prefill instance hands its KV to a decode instance), CPU offload and
LMCache are all connectors. The course's interface is the same shape, one call per step:

    class MyConnector(KVConnector):
        def get_num_new_matched_tokens(self, request, num_computed_tokens): ...   # -> tokens it can supply
        def load(self, request, start, count, write): ...      # write(layer, k, v) positions start..start+count-1
        def save(self, request, num_computed_tokens, read): ... # after a step: read(layer, start, count) -> k, v

No connector is plugged in by default (`LLMEngine(..., connector=None)`).
"""
from __future__ import annotations

__all__ = ["KVConnector"]


class KVConnector:
    """The do-nothing connector: supplies no tokens, saves nothing. Subclass it."""

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> int:
        """Tokens of request.all_token_ids after its first num_computed_tokens (local prefix-cache hits) that
        this connector can load; 0 for none. Only asked when a request is admitted (num_computed_tokens is its
        local hits). The scheduler never asks for the request's last token: it must be computed."""
        return 0

    def load(self, request, start: int, count: int, write) -> None:
        """Fill positions start .. start+count-1 of the request (its blocks are allocated): call
        write(layer, k, v) for every layer, k and v [count, kv_heads, head_dim]."""

    def save(self, request, num_computed_tokens: int, read) -> None:
        """After a step: the request's first num_computed_tokens tokens have keys and values;
        read(layer, start, count) -> (k, v) fetches them."""
