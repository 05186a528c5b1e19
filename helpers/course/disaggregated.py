"""Prefill/decode disaggregation: a prefill worker and decode workers on real ranks, and when it pays (chapter 7).

    from helpers.course.disaggregated import run_disaggregated, compare_disaggregation, Link

    run = run_disaggregated([encode(PROMPT), encode("We hold these truths")], max_new_tokens=20, decode_ranks=2)
    run.tokens          # new ids of each prompt: the same as helpers.course.tiny_llama.generate gives
    run.transfers       # per prompt: its prefill and decode rank, its tokens, blocks and the bytes sent
    results = compare_disaggregation()      # modelled device time: {"colocated": LoopResult, ..., "disaggregated": ...}

1. On real ranks (`disaggregated_worker`, run by `run_disaggregated` through helpers.launch). Rank 0 is the
   prefill worker: for each prompt it runs the tiny Llama's prefill on a paged KV cache
   (helpers/course/paged_llama.py's PagedLlama: its own pool, its own block manager), takes the first token
   from the last position's logits, hands the sequence's KV blocks and that token to a decode rank with
   `send_kv` (exercise 7.5, labs/disaggregation.py) and frees its blocks: a prefill worker keeps no KV once
   it has handed a sequence on. Ranks 1 .. n are decode workers: between two decode steps each takes in one
   finished prefill with `recv_kv`, into blocks of its own pool (whatever ids its own block manager hands
   out), and every step decodes one token for each running sequence (PagedLlama.decode: paged attention,
   exercise 7.2), until each has max_new_tokens: continuous batching fed by another process. Prompt i goes
   to decode rank 1 + i mod n (`route`; with prefill_ranks > 1 several prefill workers feed the decode
   workers: "xPyD"). Each prefill rank counts what it sends with CommTracer;
   the bytes per prompt equal the formula of the protocol: 16 B of header + layers × 2 × whole blocks ×
   block_size × kv_heads × head_dim × 4 B (`transfer_bytes`), 4,096 B per token for the tiny Llama,
   rounded up to whole blocks.

2. On modelled device time (`run_disaggregated_model`), with chapter 7's engine loop
   (helpers/course/engine_loop.py: the same `Workload`, the same step prices `step_seconds`, the same
   `LoopResult`), so colocated, chunked and disaggregated serving are priced alike. Two devices: the prefill
   device runs each arriving prompt whole (FIFO) and emits its first token; the KV then crosses a `Link`
   (latency + bytes / bandwidth, one transfer at a time); the decode device runs decode-only steps and
   admits a sequence at the first step boundary after its KV has arrived. Decodes never wait for a prompt:
   that is the point. With `overlap=False` the decode device itself waits while a transfer arrives (as our
   blocking recv_kv does): a slow link then stalls the running decodes as a prefill did in the colocated
   engine. With `overlap=True` (engines do this: the NIC writes the blocks while the GPU decodes) the
   transfer only delays the new request's second token.

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

from helpers.course.engine_loop import LoopResult, Request, StepRecord, Workload, percentile, run_workload, \
    step_seconds
from helpers.course.serving.device_time import DeviceCost

__all__ = ["DisaggregatedRun", "route", "disaggregated_worker", "run_disaggregated", "transfer_bytes", "Link",
           "run_disaggregated_model", "run_colocated_replicas", "compare_disaggregation", "tradeoff",
           "break_even_bandwidth", "plot_tradeoff", "plot_handover", "explore"]

HEADER_BYTES = 16                    # the protocol's int64 header [num_tokens, first_token]


def transfer_bytes(num_tokens: int, num_layers: int, kv_heads: int, head_dim: int, block_size: int = 16,
                   element_size: int = 4) -> int:
    """Bytes send_kv puts on the wire for one prompt: the header + whole blocks of K and V of every layer."""
    blocks = -(-num_tokens // block_size)
    return HEADER_BYTES + num_layers * 2 * blocks * block_size * kv_heads * head_dim * element_size


# ------------------------------------------------------------------------------------------ real ranks

@dataclass
class DisaggregatedRun:
    """tokens[i]: the new ids of prompt i (max_new_tokens of them, the first from its prefill worker);
    transfers[i]: {"prompt", "prefill_rank", "decode_rank", "tokens", "blocks", "table", "bytes", "peers", "ops",
    "seconds"} as its prefill rank saw them (table: its block ids; seconds: wall time of its sends);
    decode_tables[i]: the block ids prompt i got in its decode rank's own pool;
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


def disaggregated_worker(rank, world_size, prompts, max_new_tokens: int, num_blocks: int = 64,
                         block_size: int = 16, prefill_ranks: int = 1):
    """Ranks < prefill_ranks: prefill their prompts and send each one's KV (send_kv); the others: receive theirs
    (recv_kv), in prompt order, one between two decode steps, and decode them all. Returns, on a prefill rank,
    {prompt index: transfer}; on a decode rank, {prompt index: (new ids, its block table)}.

    Every rank handles its prompts in prompt order, so no two ranks wait on each other: the lowest prompt not
    yet handed over has its prefill rank sending it and its decode rank receiving it."""
    from helpers import load_impl
    from helpers.comm_trace import CommTracer
    from helpers.course.paged_llama import PagedLlama
    if not 1 <= prefill_ranks < world_size:
        raise ValueError(f"prefill_ranks={prefill_ranks} with world_size={world_size}: disaggregation needs at least "
                         f"one prefill rank and one decode rank")
    disaggregation = load_impl("disaggregation")
    engine = PagedLlama(num_blocks=num_blocks, block_size=block_size)
    routes = [route(i, prefill_ranks, world_size) for i in range(len(prompts))]
    if rank < prefill_ranks:
        transfers = {}
        for i in (i for i, (src, _) in enumerate(routes) if src == rank):
            prompt, dst = prompts[i], routes[i][1]
            logits = engine.start(i, prompt)               # allocate this rank's blocks, prefill the prompt
            first = int(logits.argmax())
            table = engine.manager.block_table(i)
            with CommTracer() as trace:
                disaggregation.send_kv(engine.pool, table, len(prompt), first, dst)
            transfers[i] = {"prompt": i, "prefill_rank": rank, "decode_rank": dst, "tokens": len(prompt),
                            "blocks": len(table), "table": list(table), "bytes": trace.total_bytes(),
                            "peers": sorted({r.peer for r in trace.records}), "ops": len(trace.records),
                            "seconds": sum(r.seconds for r in trace.records)}
            engine.free(i)                                 # the KV now lives on the decode rank
            print(f"prompt {i}: {len(prompt)} tokens, blocks {table} -> rank {dst}: {trace.total_bytes():,d} B")
        return transfers
    mine = [i for i, (_, dst) in enumerate(routes) if dst == rank]
    new, tables, running, waiting = {}, {}, [], list(mine)
    while waiting or running:
        if waiting:            # between two decode steps, take in one finished prefill (recv_kv blocks meanwhile)
            i = waiting.pop(0)
            got = disaggregation.recv_kv(engine.pool, engine.manager, i, src=routes[i][0])
            new[i], tables[i] = [got.first_token], list(got.block_table)
            print(f"prompt {i}: {got.num_tokens} tokens from rank {routes[i][0]} into my blocks {got.block_table}, "
                  f"first token {got.first_token}")
            running.append(i)
        for i in [i for i in running if len(new[i]) == max_new_tokens]:
            running.remove(i)
            engine.free(i)
        if running:            # one token for every running sequence
            logits = engine.decode(running, [new[i][-1] for i in running])
            for i, row in zip(running, logits):
                new[i].append(int(row.argmax()))
    return {i: (new[i], tables[i]) for i in mine}


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
                color=colours(i % 10), ha="center", va="center", backgroundcolor="white")
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


def break_even_bandwidth(bytes_per_token: int = 4096, cost: DeviceCost | None = None) -> float:
    """Bytes/s at which moving a prompt's KV costs what computing it costs (per prompt token): below it, a
    blocking transfer stalls the decodes longer than the colocated prefill did."""
    cost = cost or DeviceCost()
    return bytes_per_token / (cost.prefill_per_token_ms / 1e3)


def _fresh(workload):
    return workload.requests() if isinstance(workload, Workload) else [
        Request(r.rid, r.prompt_len, r.max_tokens, r.arrival) for r in workload]


def run_disaggregated_model(workload: Workload | list | None = None, link: Link | None = None,
                            cost: DeviceCost | None = None, overlap: bool = True, bytes_per_token: int = 4096,
                            block_size: int = 16, label: str = "disaggregated") -> LoopResult:
    """Serve `workload` with one prefill device and one decode device on modelled time (module doc, part 2).

    Returns a LoopResult whose `steps` are the decode device's; `prefill_steps` those of the prefill device,
    `transfers` the (start, seconds) of every KV transfer, and `busy` each device's busy fraction."""
    workload = workload or Workload()
    link, cost = link or Link(), cost or DeviceCost()
    requests = sorted(_fresh(workload), key=lambda r: (r.arrival, r.rid))
    # prefill device: whole prompts, first come first served
    prefill_steps, ready, free_at = [], [], 0.0
    for req in requests:
        start = max(free_at, req.arrival)
        seconds = step_seconds(0, req.prompt_len, cost)
        free_at = start + seconds
        req.computed = req.prompt_len
        req.token_times.append(free_at)                 # the first token comes out of the prefill
        prefill_steps.append(StepRecord(start, seconds, (), ((req.rid, req.prompt_len),)))
        if not req.done:
            ready.append((free_at, req))
    nbytes = {req.rid: HEADER_BYTES + -(-req.prompt_len // block_size) * block_size * bytes_per_token
              for _, req in ready}
    # link + decode device
    transfers, steps, running, now, link_free = [], [], [], 0.0, 0.0
    if overlap:                                          # transfers run on the link alone, one at a time
        arrived = []
        for done_at, req in ready:
            start = max(done_at, link_free)
            link_free = start + link.seconds(nbytes[req.rid])
            transfers.append((start, link_free - start))
            arrived.append((link_free, req))
        ready = sorted(arrived, key=lambda x: (x[0], x[1].rid))
    ready.reverse()
    while ready or running:
        if overlap:
            while ready and ready[-1][0] <= now:
                running.append(ready.pop()[1])
        elif ready and ready[-1][0] <= now:              # the decode device receives one finished prefill itself,
            _, req = ready.pop()                         # then decodes a step: the running decodes waited for it
            seconds = link.seconds(nbytes[req.rid])
            transfers.append((now, seconds))
            now += seconds
            running.append(req)
        if not running:
            now = max(now, ready[-1][0])
            continue
        seconds = step_seconds(len(running), 0, cost)
        start, now = now, now + seconds
        for req in running:
            req.token_times.append(now)
        steps.append(StepRecord(start, seconds, tuple(r.rid for r in running), ()))
        running = [r for r in running if not r.done]
    result = LoopResult(requests, steps, label)
    result.prefill_steps, result.transfers = prefill_steps, transfers
    end = max(r.token_times[-1] for r in requests)
    result.busy = {"prefill": sum(s.seconds for s in prefill_steps) / end,
                   "decode": sum(s.seconds for s in steps) / end}
    return result


def run_colocated_replicas(workload: Workload | list | None = None, replicas: int = 2, token_budget: int = 8192,
                           chunked: bool = False, cost: DeviceCost | None = None, schedule_step=None,
                           label: str | None = None) -> LoopResult:
    """The same devices spent on colocated replicas: request i is served by replica i mod `replicas`, each
    an engine of helpers/course/engine_loop.py. One LoopResult over all requests (steps of every replica)."""
    requests = sorted(_fresh(workload or Workload()), key=lambda r: (r.arrival, r.rid))
    parts = [run_workload(requests[k::replicas], token_budget, chunked, cost, schedule_step)
             for k in range(replicas)]
    steps = sorted((s for p in parts for s in p.steps), key=lambda s: s.start)
    result = LoopResult(requests, steps, label or f"colocated ×{replicas}")
    end = max(r.token_times[-1] for r in requests)
    result.busy = {f"replica {k}": sum(s.seconds for s in p.steps) / end for k, p in enumerate(parts)}
    return result


def compare_disaggregation(workload: Workload | None = None, link: Link | None = None, cost: DeviceCost | None = None,
                           chunk_budget: int = 256, unchunked_budget: int = 8192, schedule_step=None) -> dict:
    """One workload served four ways (modelled device time): colocated unchunked on one device, chunked on one
    device (engine_loop), colocated unchunked on two replicas, and disaggregated 1 prefill + 1 decode device.
    Returns {label: LoopResult}."""
    workload = workload or Workload()
    return {
        "colocated": run_workload(workload, unchunked_budget, False, cost, schedule_step, "colocated"),
        "chunked": run_workload(workload, chunk_budget, True, cost, schedule_step, f"chunked ({chunk_budget})"),
        "colocated ×2": run_colocated_replicas(workload, 2, unchunked_budget, False, cost, schedule_step),
        "disaggregated": run_disaggregated_model(workload, link, cost),
    }


def tradeoff(prompt_lens=(64, 2048), links: dict | None = None, workload: Workload | None = None,
             cost: DeviceCost | None = None, overlap: bool = False, schedule_step=None) -> list[dict]:
    """ITL p99 of the running decodes and TTFT p50, colocated (one device, unchunked) vs disaggregated, for each
    prompt length × link. overlap=False: the decode device waits for each transfer (our recv_kv)."""
    links = links or {"fast link": Link(), "slow link": Link(gbytes_per_s=0.01, latency_ms=1.0)}
    base = workload or Workload()
    rows = []
    for n in prompt_lens:
        w = Workload(**{**vars(base), "long_prompt": n})
        colocated = run_workload(w, max(8192, n), False, cost, schedule_step, "colocated")
        for name, link in links.items():
            disagg = run_disaggregated_model(w, link, cost, overlap=overlap)
            transfer_ms = link.seconds(transfer_bytes(n, 4, 4, 32)) * 1e3
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
