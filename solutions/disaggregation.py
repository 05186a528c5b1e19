"""Chapter 7: prefill/decode disaggregation — handing a finished prefill's KV blocks to a decode rank.

Exercise 7.5  A prefill worker (one rank) runs the prompt, keeps its K/V in its own paged pool and produces the
              first new token; a decode worker (another rank) generates the rest. Between them, over
              torch.distributed point-to-point messages, travel exactly that sequence's KV blocks (all layers,
              K and V) and the first token. The decode rank puts the blocks in blocks of ITS OWN pool, which
              its own block manager hands out (their ids need not be the prefill rank's), and continues
              decoding with the same tokens as a single colocated engine (DistServe, Mooncake, vLLM's and
              SGLang's prefill/decode disaggregation).

The wire protocol (fixed, so that any send_kv works with any recv_kv; the graders check it):

    message 0      header: torch.int64 tensor [2] = [num_tokens, first_token]               16 B
    message 1 + l  layer l's blocks: one tensor [2, num_blocks, block_size, kv_heads, head_dim] in the pool's
                   dtype: K of the sequence's blocks in block-table order, stacked on V of the same blocks
                   (torch.stack([pool.k[l][table], pool.v[l][table]]))                      l = 0 .. layers-1

    num_blocks = ceil(num_tokens / block_size): whole blocks, as they sit in the pool, the last one partly
    filled (its tail is padding the decode rank ignores and later overwrites). Sending whole blocks lets
    the receiver place each with one copy and is what paged engines move (vLLM's KV connectors move blocks);
    it costs at most block_size - 1 tokens of padding per prompt. One message per layer (K and V packed):
    few messages (each pays the link's latency once), and a prefill worker could send layer l while it
    computes layer l + 1, as layer-wise KV transfer does.

Bytes per prompt of n tokens: 16 + layers × 2 × ceil(n / block_size) × block_size × kv_heads × head_dim × 4 B
in float32; for the tiny Llama 4,096 B per token, rounded up to whole blocks of 16 tokens.

Pools are helpers/course/kv_cache.py's KVPool (`pool.k[layer]`, `pool.v[layer]`: [num_blocks, block_size,
kv_heads, head_dim]); a block manager is anything with `allocate(seq_id, num_tokens)` and
`block_table(seq_id) -> list[int]` (exercise 7.1's BlockManager).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist

HEADER_DTYPE = torch.int64
HEADER_FIELDS = ("num_tokens", "first_token")


class ReceivedPrefill(NamedTuple):
    """What a decode rank holds after recv_kv: enough to continue decoding the sequence."""
    seq_id: object
    num_tokens: int             # prompt tokens whose K/V are now in this rank's pool
    first_token: int            # the token the prefill produced: the decode rank's first input
    block_table: list           # this rank's block ids holding positions 0 .. num_tokens-1


def blocks_for(num_tokens: int, block_size: int) -> int:
    """Blocks that hold num_tokens tokens: ceil(num_tokens / block_size)."""
    return -(-num_tokens // block_size)


def send_kv(pool, block_table: list, num_tokens: int, first_token: int, dst: int, group=None) -> None:
    """Send one finished prefill to rank `dst`: the header, then its blocks layer by layer (protocol above).

    pool: this rank's KVPool; block_table: the sequence's block ids in this pool, in position order (at least
    ceil(num_tokens / block_size) of them; only those are sent); num_tokens: prompt tokens whose K/V are in
    the pool; first_token: the token id the prefill produced; dst: the decode rank (global rank); group: the
    process group (None: the default one). Blocking: returns once every message has been handed over.
    Raises ValueError when the table holds fewer blocks than num_tokens needs.
    """
    needed = blocks_for(num_tokens, pool.block_size)
    if num_tokens < 1 or len(block_table) < needed:
        raise ValueError(f"num_tokens={num_tokens} needs {needed} blocks of {pool.block_size} tokens, but the "
                         f"block table holds {len(block_table)}: pass the sequence's whole block table")
    dist.send(torch.tensor([num_tokens, first_token], dtype=HEADER_DTYPE), dst=dst, group=group)
    blocks = torch.as_tensor(list(block_table[:needed]), dtype=torch.long)
    for layer in range(pool.num_layers):
        # index_select copies exactly these blocks, in table order: never the rest of the pool
        payload = torch.stack([pool.k[layer].index_select(0, blocks), pool.v[layer].index_select(0, blocks)])
        dist.send(payload, dst=dst, group=group)


def recv_kv(pool, block_manager, seq_id, src: int, group=None) -> ReceivedPrefill:
    """Receive one finished prefill from rank `src` (protocol above) into this rank's own blocks.

    pool: this rank's KVPool (same layers, block_size, kv_heads, head_dim and dtype as the sender's);
    block_manager: this rank's block manager; the sequence gets `block_manager.allocate(seq_id, num_tokens)`
    and its K/V go into `block_manager.block_table(seq_id)`, whatever ids those are; no other block of the
    pool changes. Returns ReceivedPrefill(seq_id, num_tokens, first_token, block_table). An OutOfBlocks from
    the block manager propagates (the messages are then still on the wire: a real engine checks capacity
    before it accepts a transfer).
    """
    header = torch.empty(len(HEADER_FIELDS), dtype=HEADER_DTYPE)
    dist.recv(header, src=src, group=group)
    num_tokens, first_token = (int(x) for x in header.tolist())
    block_manager.allocate(seq_id, num_tokens)
    table = list(block_manager.block_table(seq_id))
    blocks = torch.as_tensor(table[:blocks_for(num_tokens, pool.block_size)], dtype=torch.long)
    shape = (2, len(blocks), pool.block_size, pool.kv_heads, pool.head_dim)
    for layer in range(pool.num_layers):
        payload = torch.empty(shape, dtype=pool.dtype)
        dist.recv(payload, src=src, group=group)
        pool.k[layer].index_copy_(0, blocks, payload[0])
        pool.v[layer].index_copy_(0, blocks, payload[1])
    return ReceivedPrefill(seq_id, num_tokens, first_token, table)
