"""Prefill/decode disaggregation: a prefill worker and decode workers on real ranks, and when it pays (chapter 7).

    from helpers.course.disaggregated import run_disaggregated, compare_disaggregation, Link

    run = run_disaggregated([encode(PROMPT), encode("We hold these truths")], max_new_tokens=20, decode_ranks=2)
    run.tokens          # new ids of each prompt: the same as helpers.course.tiny_llama.generate gives
    run.transfers       # per prompt: its prefill and decode rank, its tokens, blocks and the bytes sent
    results = compare_disaggregation()      # modelled device time: {"colocated": EngineResult, ...}

Every worker, real or modelled, is the course's engine (helpers/course/engine: LLMEngine) on its own KV pool;
what joins a prefill engine to a decode engine is a KV connector (helpers/course/engine/kv_connector.py), the
shape vLLM's prefill/decode disaggregation has (`vllm/distributed/kv_transfer/kv_connector/v1/`, e.g.
NixlConnector: the prefill instance saves a finished prompt's blocks, the decode instance's scheduler asks
`get_num_new_matched_tokens` and loads them into the blocks it allocated when it admitted the request).

1. On real ranks (`disaggregated_worker`, run by `run_disaggregated` through helpers.launch). Ranks
   0 .. prefill_ranks-1 are prefill workers: each is LLMEngine.paged (the tiny Llama on a paged KV cache, its
   own pool and block manager) serving each of its prompts as a request with max_tokens=1. When a prompt's
   step has run — its KV in the pool, its first token sampled — the prefill engine's connector (`SendKV`) hands
   the sequence's blocks and that token to its decode rank with `send_kv` (exercise 7.5, labs/disaggregation.py)
   before the engine frees them: a prefill worker keeps no KV once it has handed a sequence on. The other ranks
   are decode workers, each LLMEngine.paged on its own pool: a handed-over prompt enters it as a request whose
   first token is already generated (`handed_over`), and its connector (`ReceiveKV`) says that the prompt's
   tokens come from outside. The scheduler admits the request only when its blocks fit (vLLM V1's admission:
   the whole current sequence, prompt + first token; otherwise it waits, first in line, while the running
   requests decode and free blocks — or, once running, it may be preempted like any request); in the step
   that admits it, the connector's load calls `recv_kv` into exactly the blocks the scheduler allocated
   (recv_kv's `allocate` finds them: `AdmittedBlocks`), fills in the first token, and the same step decodes it
   with the others: continuous batching fed by another process. A preempted handed-over request is recomputed
   here (its KV was sent once). Prompt i goes to decode rank 1 + i mod n (`route`; with prefill_ranks > 1
   several prefill workers feed the decode workers: "xPyD"). Each prefill rank counts what it sends with
   CommTracer; the bytes per prompt equal the formula of the protocol: 16 B of header + whole blocks ×
   block_size × the KV bytes per token (helpers/course/memory.py's kv_bytes_per_token: layers × 2 × kv_heads ×
   head_dim × 4 B) (`transfer_bytes`), 4,096 B per token for the tiny Llama, rounded up to whole blocks.

2. On modelled device time (`run_disaggregated_model`), with the engines of chapter 7's figures
   (helpers/course/engine_loop.py: the same `Workload`, LLMEngine.modelled priced by the same `step_seconds`,
   the same `EngineResult`), so colocated, chunked and disaggregated serving are priced alike. Two devices: the
   prefill device is an engine without chunked prefill serving every prompt as a max_tokens=1 request (its
   first token comes out of the prefill); the KV then crosses a `Link` (latency + bytes / bandwidth, one
   transfer at a time); the decode device is an engine whose requests arrive handed over (the same connector
   shape as on the real ranks): it runs decode-only steps and admits a sequence at the first step boundary
   after its KV has arrived. Decodes never wait for a prompt: that is the point. With `overlap=False` the
   decode device itself waits while a transfer arrives (its connector's load holds the clock, as our blocking
   recv_kv does): a slow link then stalls the running decodes as a prefill did in the colocated engine. With
   `overlap=True` (engines do this: the NIC writes the blocks while the GPU decodes) the transfer only delays
   the new request's second token.

   When it pays: the colocated engine stalls every running decode for a prompt's whole prefill
   (prefill_ms + prefill_per_token_ms per token); disaggregation replaces that stall with nothing (overlapped)
   or with the transfer (blocking: latency + bytes_per_token / bandwidth per token). So it pays for long
   prompts on a fast link; it does not for a link slower than bytes_per_token / prefill_per_token_ms
   (`break_even_bandwidth`), and short prompts gain little (their stall was short) while the prefill device
   sits mostly idle (the result's `busy` fractions): a second device bought for little. `tradeoff` runs the
   grid (prompt length × link) with the blocking transfer of the real ranks above.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from helpers.course.engine import EngineResult, KVConnector, LLMEngine, Request, SchedulerConfig, percentile, \
    run_requests
from helpers.course.engine_loop import UNCHUNKED, Workload, _fresh, chunked_config, run_workload
from helpers.course.memory import kv_bytes_per_token
from helpers.course.serving.device_time import DeviceCost

__all__ = ["DisaggregatedRun", "route", "handed_over", "SendKV", "ReceiveKV", "AdmittedBlocks",
           "disaggregated_worker", "run_disaggregated", "transfer_bytes", "tiny_llama_kv_bytes_per_token", "Link",
           "run_disaggregated_model", "run_colocated_replicas", "compare_disaggregation", "tradeoff",
           "break_even_bandwidth", "plot_tradeoff", "plot_handover", "explore"]

HEADER_BYTES = 16                    # the protocol's int64 header [num_tokens, first_token]
FIRST_TOKEN_PENDING = -1             # a handed-over request's first token until its KV (and the token) arrive


def blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


def transfer_bytes(num_tokens: int, num_layers: int, kv_heads: int, head_dim: int, block_size: int = 16,
                   element_size: int = 4) -> int:
    """Bytes send_kv puts on the wire for one prompt: the header + whole blocks of K and V of every layer
    (kv_bytes_per_token of helpers/course/memory.py per slot of those blocks)."""
    per_token = int(kv_bytes_per_token(num_layers, kv_heads, head_dim, element_size))
    return HEADER_BYTES + blocks_for(num_tokens, block_size) * block_size * per_token


def tiny_llama_kv_bytes_per_token(element_size: int = 4) -> int:
    """K and V of one token in every layer of the tiny Llama (4,096 B in float32)."""
    from helpers.course.tiny_llama import CONFIG
    return int(kv_bytes_per_token(CONFIG.num_hidden_layers, CONFIG.num_key_value_heads, CONFIG.head_dim,
                                  element_size))


def handed_over(rid, prompt, max_tokens: int, first_token: int = FIRST_TOKEN_PENDING, first_time: float | None = None,
                arrival: float | None = None) -> Request:
    """A request as it enters a decode engine: its prompt was computed elsewhere and its first token generated
    there (`first_token`, or FIRST_TOKEN_PENDING until the transfer brings it; `first_time`: when it came out).
    Its num_tokens is prompt + 1: the scheduler admits it for the one token it computes next (the first token's
    position), once its connector has said the prompt's tokens come from outside."""
    request = Request(rid, prompt, max_tokens, arrival=arrival)
    request.tokens.append(int(first_token))
    if first_time is not None:
        request.token_times.append(first_time)
    return request


# ------------------------------------------------------------------------------------------ real ranks

@dataclass
class DisaggregatedRun:
    """tokens[i]: the new ids of prompt i (max_new_tokens of them, the first from its prefill worker);
    transfers[i]: {"prompt", "prefill_rank", "decode_rank", "tokens", "blocks", "table", "bytes", "peers", "ops",
    "seconds"} as its prefill rank saw them (table: its block ids; seconds: wall time of its sends);
    decode_tables[i]: the block ids prompt i's KV went to in its decode rank's own pool;
    outputs: every rank's printed text."""
    tokens: list
    transfers: list
    decode_tables: list
    outputs: list


def route(prompt_index: int, prefill_ranks: int, world_size: int) -> tuple[int, int]:
    """(prefill rank, decode rank) of a prompt: ranks 0 .. prefill_ranks-1 prefill, the others decode. Prompts
    are dealt round-robin to the prefill ranks and, shifted by one each round, to the decode ranks, so every
    prefill rank feeds every decode rank (with one prefill rank: prompt i goes to decode rank 1 + i mod n)."""
    decode_ranks = world_size - prefill_ranks
    turn, prefill = divmod(prompt_index, prefill_ranks)
    return prefill, prefill_ranks + (turn + prefill) % decode_ranks


class SendKV(KVConnector):
    """The prefill worker's connector (vLLM's producer side): once a request's prompt is computed and its first
    token sampled, `send_kv` (exercise 7.5) hands its blocks and that token to `destination[rid]` — from `save`,
    which the engine calls after the step and before it frees a finished request's blocks."""

    def __init__(self, send_kv, destination: dict, rank: int):
        self.send_kv, self.destination, self.rank, self.engine = send_kv, destination, rank, None
        self.transfers: dict = {}

    def save(self, request, num_computed_tokens: int, read) -> None:
        from helpers.comm_trace import CommTracer
        if not request.tokens or num_computed_tokens < request.num_prompt_tokens or request.rid in self.transfers:
            return
        rid, n, dst = request.rid, request.num_prompt_tokens, self.destination[request.rid]
        pool, table = self.engine.paged_model.pool, self.engine.kv.block_table(rid)
        with CommTracer() as trace:
            self.send_kv(pool, table, n, request.tokens[0], dst)
        self.transfers[rid] = {"prompt": rid, "prefill_rank": self.rank, "decode_rank": dst, "tokens": n,
                               "blocks": len(table), "table": list(table), "bytes": trace.total_bytes(),
                               "peers": sorted({r.peer for r in trace.records}), "ops": len(trace.records),
                               "seconds": sum(r.seconds for r in trace.records)}
        print(f"prompt {rid}: {n} tokens, blocks {table} -> rank {dst}: {trace.total_bytes():,d} B")


class AdmittedBlocks:
    """What recv_kv sees as its block manager on a decode worker: the scheduler already allocated the request's
    blocks when it admitted it (so they fit: no transfer is accepted that the pool cannot hold), and
    `allocate(seq_id, num_tokens)` answers with them — the first ceil(num_tokens / block_size), as exercise 7.1's
    allocate would have given."""

    def __init__(self, kv, seq_id, num_tokens: int):
        self.kv, self.seq_id, self.num_tokens = kv, seq_id, num_tokens
        self.block_size = kv.block_size

    def allocate(self, seq_id, num_tokens: int) -> list[int]:
        if seq_id != self.seq_id or num_tokens != self.num_tokens:
            raise ValueError(f"the transfer is for sequence {seq_id!r} of {num_tokens} tokens; this decode worker "
                             f"admitted {self.seq_id!r} of {self.num_tokens} (labs/disaggregation.py: recv_kv)")
        return self.block_table(seq_id)

    def block_table(self, seq_id) -> list[int]:
        return self.kv.block_table(seq_id)[:blocks_for(self.num_tokens, self.block_size)]


class ReceiveKV(KVConnector):
    """The decode worker's connector (vLLM's consumer side): a handed-over request's prompt tokens are supplied
    from outside; in the step that admits it, `load` receives them with `recv_kv` (exercise 7.5) from
    `source[rid]` into the blocks the scheduler allocated, and fills in the first token. Each prompt is sent
    once: after a preemption the request is recomputed here (get_num_new_matched_tokens answers 0)."""

    def __init__(self, recv_kv, source: dict):
        self.recv_kv, self.source, self.engine = recv_kv, source, None
        self.received: dict = {}

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> int:
        if request.rid in self.received or request.rid not in self.source:
            return 0
        return request.num_prompt_tokens - num_computed_tokens

    def load(self, request, start: int, count: int, write) -> None:
        rid, src = request.rid, self.source[request.rid]
        blocks = AdmittedBlocks(self.engine.kv, rid, count)
        got = self.recv_kv(self.engine.paged_model.pool, blocks, rid, src)
        if got.num_tokens != count or start != 0:
            raise ValueError(f"prompt {rid!r}: rank {src} sent {got.num_tokens} tokens, {count} were admitted")
        request.tokens[0] = int(got.first_token)
        self.received[rid] = got
        print(f"prompt {rid}: {got.num_tokens} tokens from rank {src} into my blocks {list(got.block_table)}, "
              f"first token {got.first_token}")


def _check_fits(prompts, max_new_tokens: int, num_blocks: int, block_size: int) -> None:
    """Every rank checks the same thing before any message, so a prompt that can never fit fails the whole job
    at once rather than leaving its prefill rank waiting on a decode rank that cannot take it."""
    for i, prompt in enumerate(prompts):
        need = blocks_for(len(prompt) + max_new_tokens - 1, block_size)
        if need > num_blocks:
            raise ValueError(f"prompt {i}: {len(prompt)} tokens + {max_new_tokens} new need {need} blocks of "
                             f"{block_size} on its decode rank; a pool holds {num_blocks}")


def disaggregated_worker(rank, world_size, prompts, max_new_tokens: int, num_blocks: int = 64,
                         block_size: int = 16, prefill_ranks: int = 1):
    """Ranks < prefill_ranks: prefill their prompts (LLMEngine.paged, max_tokens=1) and send each one's KV
    (SendKV: send_kv); the others: serve theirs as handed-over requests on LLMEngine.paged (ReceiveKV: recv_kv
    when the scheduler admits one). Returns, on a prefill rank, {prompt index: transfer}; on a decode rank,
    {prompt index: (new ids, its block table)}.

    Every rank handles its prompts in prompt order (both engines admit first come first served and send or
    receive in the order they schedule), so no two ranks wait on each other: the lowest prompt not yet handed
    over has its prefill rank sending it and its decode rank receiving it, or about to once its running
    requests have freed the blocks it needs."""
    from helpers import load_impl
    if not 1 <= prefill_ranks < world_size:
        raise ValueError(f"prefill_ranks={prefill_ranks} with world_size={world_size}: disaggregation needs at least "
                         f"one prefill rank and one decode rank")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    _check_fits(prompts, max_new_tokens, num_blocks, block_size)
    disaggregation = load_impl("disaggregation")
    routes = [route(i, prefill_ranks, world_size) for i in range(len(prompts))]
    if rank < prefill_ranks:
        mine = [i for i, (src, _) in enumerate(routes) if src == rank]
        connector = SendKV(disaggregation.send_kv, {i: routes[i][1] for i in mine}, rank)
        engine = LLMEngine.paged(num_blocks=num_blocks, block_size=block_size, connector=connector)
        connector.engine = engine
        run_requests(engine, [Request(i, prompts[i], 1) for i in mine], f"prefill rank {rank}")
        return {i: connector.transfers[i] for i in mine}
    mine = [i for i, (_, dst) in enumerate(routes) if dst == rank]
    connector = ReceiveKV(disaggregation.recv_kv, {i: routes[i][0] for i in mine})
    engine = LLMEngine.paged(num_blocks=num_blocks, block_size=block_size, connector=connector)
    connector.engine = engine
    if max_new_tokens == 1:          # nothing to decode: take the KV in and give it back
        for i in mine:
            got = disaggregation.recv_kv(engine.paged_model.pool, engine.paged_model.manager, i, src=routes[i][0])
            engine.paged_model.manager.free(i)
            connector.received[i] = got
        return {i: ([connector.received[i].first_token], list(connector.received[i].block_table)) for i in mine}
    requests = [handed_over(i, prompts[i], max_new_tokens) for i in mine]
    run_requests(engine, requests, f"decode rank {rank}")
    print(f"decode rank {rank}: {len(requests)} prompts decoded in {engine.num_steps} steps, "
          f"{engine.scheduler.num_preemptions} preemptions")
    return {r.rid: (list(r.tokens), list(connector.received[r.rid].block_table)) for r in requests}


def run_disaggregated(prompts, max_new_tokens: int, decode_ranks: int = 1, prefill_ranks: int = 1,
                      num_blocks: int = 64, block_size: int = 16, show_output: bool = True,
                      timeout: float | None = None) -> DisaggregatedRun:
    """Launch `prefill_ranks` prefill ranks + `decode_ranks` decode ranks on `prompts` (lists of ids); see the
    module doc."""
    from helpers import launch
    prompts = [[int(t) for t in p] for p in prompts]
    results = launch(disaggregated_worker, prefill_ranks + decode_ranks, prompts, max_new_tokens, num_blocks,
                     block_size, prefill_ranks, show_output=show_output, timeout=timeout)
    transfers = [None] * len(prompts)
    for per_rank in results[:prefill_ranks]:
        for i, transfer in per_rank.items():
            transfers[i] = transfer
    tokens, tables = [None] * len(prompts), [None] * len(prompts)
    for per_rank in results[prefill_ranks:]:
        for i, (ids, table) in per_rank.items():
            tokens[i], tables[i] = ids, table
    return DisaggregatedRun(tokens, transfers, tables, results.outputs)


def plot_handover(run: DisaggregatedRun):
    """Who holds which blocks: the prefill ranks' pools on top, the decode ranks' own pools below (side by side),
    one box per block id, coloured and labelled by the prompt whose K/V it holds (a prefill rank's boxes as they
    were when the prompt was sent: it frees them after). An arrow per prompt, with the bytes that were sent."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    def layout(key, tables):
        ranks = sorted({t[key] for t in run.transfers})
        widths = {r: 1 + max(max(table) for t, table in zip(run.transfers, tables) if t[key] == r) for r in ranks}
        offsets, x = {}, 0.0
        for r in ranks:
            offsets[r], x = x, x + widths[r] + 1.5
        return ranks, widths, offsets, x - 1.5

    prefill = layout("prefill_rank", [t["table"] for t in run.transfers])
    decode = layout("decode_rank", run.decode_tables)
    fig, ax = plt.subplots(figsize=(9, 3.2), constrained_layout=True)
    colours = plt.get_cmap("tab10")

    def box(x0, y, i):
        ax.add_patch(Rectangle((x0, y), 0.9, 0.5, color=colours(i % 10), alpha=0.85))
        ax.text(x0 + 0.45, y + 0.25, str(i), ha="center", va="center", fontsize=7, color="white")

    for i, (transfer, table) in enumerate(zip(run.transfers, run.decode_tables)):
        top, bottom = prefill[2][transfer["prefill_rank"]], decode[2][transfer["decode_rank"]]
        for block in transfer["table"]:
            box(top + block, 2.0, i)
        for block in table:
            box(bottom + block, 0.0, i)
        start = top + sum(transfer["table"]) / len(transfer["table"]) + 0.45
        end = bottom + sum(table) / len(table) + 0.45
        ax.annotate("", xy=(end, 0.55), xytext=(start, 1.95),
                    arrowprops={"arrowstyle": "->", "color": colours(i % 10), "linewidth": 1})
        along = 0.2 + 0.2 * (i % 3)                       # labels of neighbouring arrows at different heights
        ax.text(start + along * (end - start), 1.95 - along * 1.4, f"{transfer['bytes'] / 1024:.0f} KiB", fontsize=7,
                color=colours(i % 10), ha="center", va="center", backgroundcolor="white", zorder=4)
    for (ranks, widths, offsets, _), y, kind in ((prefill, 2.6, "prefill"), (decode, -0.25, "decode")):
        for r in ranks:
            ax.text(offsets[r], y, f"rank {r} ({kind}): block ids 0..{widths[r] - 1}", fontsize=8,
                    va="bottom" if kind == "prefill" else "top")
    ax.set_xlim(-0.3, max(prefill[3], decode[3]) + 0.3)
    ax.set_ylim(-0.8, 3.0)
    ax.axis("off")
    return fig



# ------------------------------------------------------------------------------------ modelled time

@dataclass(frozen=True)
class Link:
    """The prefill → decode link: a transfer of n bytes takes latency_ms + n / bandwidth."""
    gbytes_per_s: float = 25.0       # an RDMA / NVLink-class link between the prefill and the decode device
    latency_ms: float = 0.05

    def seconds(self, nbytes: int) -> float:
        return self.latency_ms / 1e3 + nbytes / (self.gbytes_per_s * 1e9)


def break_even_bandwidth(bytes_per_token: int | None = None, cost: DeviceCost | None = None) -> float:
    """Bytes/s at which moving a prompt's KV costs what computing it costs (per prompt token): below it, a
    blocking transfer stalls the decodes longer than the colocated prefill did. bytes_per_token: default the
    tiny Llama's (4,096 B)."""
    cost = cost or DeviceCost()
    bytes_per_token = bytes_per_token or tiny_llama_kv_bytes_per_token()
    return bytes_per_token / (cost.prefill_per_token_ms / 1e3)


class ModelledTransfer(KVConnector):
    """The modelled decode device's connector: a handed-over request's prompt tokens come from the prefill device.
    blocking (overlap=False): `load` holds the decode device's clock for the transfer (latency + bytes /
    bandwidth), as a blocking recv_kv holds the real decode worker; overlapped, the KV is already there when the
    request arrives (it arrives when the link has delivered it). transfers: (start, seconds) of each."""

    def __init__(self, clock, link: Link, nbytes: dict, blocking: bool):
        self.clock, self.link, self.nbytes, self.blocking = clock, link, nbytes, blocking
        self.loaded, self.transfers = set(), []

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> int:
        if request.rid in self.loaded:
            return 0                                  # preempted after its transfer: recomputed here
        return request.num_prompt_tokens - num_computed_tokens

    def load(self, request, start: int, count: int, write) -> None:
        self.loaded.add(request.rid)
        if self.blocking:
            seconds = self.link.seconds(self.nbytes[request.rid])
            self.transfers.append((self.clock.now(), seconds))
            self.clock.wait_until(self.clock.now() + seconds)


def run_disaggregated_model(workload: Workload | list | None = None, link: Link | None = None,
                            cost: DeviceCost | None = None, overlap: bool = True, bytes_per_token: int | None = None,
                            block_size: int = 16, label: str = "disaggregated", schedule_step=None,
                            prefill_config: SchedulerConfig | None = None,
                            decode_config: SchedulerConfig | None = None) -> EngineResult:
    """Serve `workload` with one prefill device and one decode device on modelled time (module doc, part 2):
    two LLMEngine.modelled, the prefill one without chunked prefill (prefill_config, default a budget of 8,192
    tokens or the longest prompt), the decode one fed handed-over requests through a ModelledTransfer connector.
    bytes_per_token: KV bytes per token on the link (default the tiny Llama's, 4,096 B), whole blocks of
    block_size plus the 16 B header per prompt, as send_kv sends them.

    Returns an EngineResult over every request (arrival, the first token from the prefill device, the others from
    the decode device) whose `steps` are the decode device's; `prefill_steps` those of the prefill device,
    `transfers` the (start, seconds) of every KV transfer, and `busy` each device's busy fraction."""
    link, cost = link or Link(), cost or DeviceCost()
    bytes_per_token = bytes_per_token or tiny_llama_kv_bytes_per_token()
    requests = sorted(_fresh(workload or Workload()), key=lambda r: (r.arrival, r.rid))
    longest = max(r.num_prompt_tokens for r in requests)
    prefill_config = prefill_config or SchedulerConfig(max_num_batched_tokens=max(8192, longest),
                                                       enable_chunked_prefill=False)
    # prefill device: every prompt whole, first come first served; its one token is the request's first
    prefill = LLMEngine.modelled(None, cost, config=prefill_config, schedule_step=schedule_step)
    prompts = [Request(r.rid, r.prompt, 1, arrival=r.arrival) for r in requests]
    run_requests(prefill, prompts, "prefill device")
    by_rid = {r.rid: r for r in requests}
    for done in prompts:
        request = by_rid[done.rid]
        request.tokens, request.token_times, request.started = list(done.tokens), list(done.token_times), done.started
        request.finished = done.finished
    nbytes = {r.rid: HEADER_BYTES + blocks_for(r.num_prompt_tokens, block_size) * block_size * bytes_per_token
              for r in requests}
    # the link (overlapped: one transfer at a time, beside the decode device) and the decode device
    ready, transfers, link_free = [], [], 0.0
    for r in sorted((r for r in requests if not r.done), key=lambda r: (r.token_times[0], r.rid)):
        at = r.token_times[0]
        if overlap:
            start = max(at, link_free)
            link_free = start + link.seconds(nbytes[r.rid])
            transfers.append((start, link_free - start))
            at = link_free
        ready.append(handed_over(r.rid, r.prompt, r.max_tokens, r.tokens[0], r.token_times[0], arrival=at))
    decode = LLMEngine.modelled(None, cost, config=decode_config or SchedulerConfig(), schedule_step=schedule_step)
    connector = ModelledTransfer(decode.clock, link, nbytes, blocking=not overlap)
    decode.connector = decode.scheduler.connector = connector
    run_requests(decode, ready, "decode device")
    for handed in ready:
        request = by_rid[handed.rid]
        request.tokens, request.token_times, request.finished = handed.tokens, handed.token_times, handed.finished
    result = EngineResult(requests, decode.steps, label)
    result.prefill_steps, result.transfers = prefill.steps, sorted(transfers + connector.transfers)
    end = max(r.token_times[-1] for r in requests)
    result.busy = {"prefill": prefill.busy_seconds / end, "decode": decode.busy_seconds / end}
    return result


def run_colocated_replicas(workload: Workload | list | None = None, replicas: int = 2,
                           config: SchedulerConfig = UNCHUNKED, cost: DeviceCost | None = None, schedule_step=None,
                           label: str | None = None) -> EngineResult:
    """The same devices spent on colocated replicas: request i (in arrival order) is served by replica
    i mod `replicas`, each LLMEngine.modelled with `config`. One EngineResult over all requests (steps of every
    replica, by start time); `busy` each replica's busy fraction."""
    requests = sorted(_fresh(workload or Workload()), key=lambda r: (r.arrival, r.rid))
    engines = []
    for k in range(replicas):
        engines.append(LLMEngine.modelled(None, cost, config=config, schedule_step=schedule_step))
        run_requests(engines[-1], requests[k::replicas], f"replica {k}")
    steps = sorted((s for e in engines for s in e.steps), key=lambda s: s.start)
    result = EngineResult(requests, steps, label or f"colocated ×{replicas}")
    end = max(r.token_times[-1] for r in requests)
    result.busy = {f"replica {k}": e.busy_seconds / end for k, e in enumerate(engines)}
    return result


def compare_disaggregation(workload: Workload | None = None, link: Link | None = None, cost: DeviceCost | None = None,
                           chunk_budget: int = 256, unchunked_budget: int = 8192, schedule_step=None) -> dict:
    """One workload served four ways (modelled device time), every device an LLMEngine: colocated unchunked on
    one device, chunked on one device (engine_loop), colocated unchunked on two replicas, and disaggregated
    1 prefill + 1 decode device. Returns {label: EngineResult}."""
    workload = workload or Workload()
    unchunked = SchedulerConfig(max_num_batched_tokens=unchunked_budget, enable_chunked_prefill=False)
    return {
        "colocated": run_workload(workload, unchunked, cost, schedule_step, "colocated"),
        "chunked": run_workload(workload, chunked_config(chunk_budget), cost, schedule_step,
                                f"chunked ({chunk_budget})"),
        "colocated ×2": run_colocated_replicas(workload, 2, unchunked, cost, schedule_step),
        "disaggregated": run_disaggregated_model(workload, link, cost, schedule_step=schedule_step),
    }


def tradeoff(prompt_lens=(64, 2048), links: dict | None = None, workload: Workload | None = None,
             cost: DeviceCost | None = None, overlap: bool = False, schedule_step=None) -> list[dict]:
    """ITL p99 of the running decodes and TTFT p50, colocated (one device, unchunked) vs disaggregated, for each
    prompt length × link. overlap=False: the decode device waits for each transfer (our recv_kv)."""
    from helpers.course.tiny_llama import CONFIG
    links = links or {"fast link": Link(), "slow link": Link(gbytes_per_s=0.01, latency_ms=1.0)}
    base = workload or Workload()
    rows = []
    for n in prompt_lens:
        w = Workload(**{**vars(base), "long_prompt": n})
        colocated = run_workload(w, SchedulerConfig(max_num_batched_tokens=max(8192, n), enable_chunked_prefill=False),
                                 cost, schedule_step, "colocated")
        for name, link in links.items():
            disagg = run_disaggregated_model(w, link, cost, overlap=overlap, schedule_step=schedule_step)
            nbytes = transfer_bytes(n, CONFIG.num_hidden_layers, CONFIG.num_key_value_heads, CONFIG.head_dim)
            transfer_ms = link.seconds(nbytes) * 1e3
            rows.append({"prompt_len": n, "link": name, "transfer_ms": transfer_ms,
                         "transfer_ms_per_token": transfer_ms / n,
                         "colocated_itl_p99": percentile(colocated.itls(w.decoder_ids), 99),
                         "disaggregated_itl_p99": percentile(disagg.itls(w.decoder_ids), 99),
                         "colocated_ttft_p50": percentile(colocated.ttfts(), 50),
                         "disaggregated_ttft_p50": percentile(disagg.ttfts(), 50),
                         "prefill_busy": disagg.busy["prefill"]})
    return rows


def plot_tradeoff(rows: list[dict]):
    """Bars: ITL p99 of the running decodes, colocated vs disaggregated, for each (prompt length, link)."""
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8.5, 3.8), constrained_layout=True)
    labels = [f"{r['prompt_len']} tok\n{r['link']}" for r in rows]
    x = torch.arange(len(rows)).float()
    for offset, key, label, colour in ((-0.2, "colocated_itl_p99", "colocated (1 device)", "tab:red"),
                                       (0.2, "disaggregated_itl_p99", "disaggregated\n(prefill + decode device)",
                                        "tab:green")):
        values = [r[key] * 1e3 for r in rows]
        bars = ax.bar(x + offset, values, 0.4, label=label, color=colour)
        ax.bar_label(bars, [f"{v:.0f}" for v in values], fontsize=7, padding=1)
    ax.set_yscale("log")
    ax.set_ylim(top=max(max(r["colocated_itl_p99"], r["disaggregated_itl_p99"]) for r in rows) * 1e3 * 3)
    ax.set_xticks(x.tolist(), labels, fontsize=8)
    ax.set_ylabel("ITL p99, running decodes (ms)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    return fig


def explore(schedule_step=None):
    """Sliders: prompt length, link bandwidth, overlapped or blocking transfer. Prints ITL p99 of the running
    decodes colocated (one device, unchunked) vs disaggregated and draws the two bars."""
    import ipywidgets as W
    import matplotlib.pyplot as plt

    def view(prompt_len, link_mb_per_s, overlap):
        link = Link(gbytes_per_s=link_mb_per_s / 1e3)
        rows = tradeoff((prompt_len,), {f"{link_mb_per_s:,.0f} MB/s": link}, overlap=overlap,
                        schedule_step=schedule_step)
        r = rows[0]
        pays = r["disaggregated_itl_p99"] < r["colocated_itl_p99"]
        print(f"{prompt_len} prompt tokens over {link_mb_per_s:,.0f} MB/s: transfer {r['transfer_ms']:.2f} ms "
              f"({r['transfer_ms_per_token'] * 1e3:.2f} µs per token; computing one costs "
              f"{DeviceCost().prefill_per_token_ms * 1e3:.0f} µs)")
        print(f"ITL p99 colocated {r['colocated_itl_p99'] * 1e3:.1f} ms, disaggregated "
              f"{r['disaggregated_itl_p99'] * 1e3:.1f} ms: disaggregation {'pays' if pays else 'does not pay'}; "
              f"the prefill device is busy {r['prefill_busy']:.0%} of the time")
        plot_tradeoff(rows)
        plt.show()

    wide = {"description_width": "initial"}
    return W.interact(view,
                      prompt_len=W.IntSlider(2048, 16, 4096, step=16, description="prompt tokens", style=wide),
                      link_mb_per_s=W.FloatLogSlider(25_000, base=10, min=0, max=5, description="link MB/s",
                                                     readout_format=",.0f", style=wide),
                      overlap=W.Checkbox(False, description="transfer overlaps decoding", style=wide))
