"""Wrong answers to chapter 3's exercises, planted to prove that the graders catch them.

Most produce the right numbers the wrong way: a pipeline whose stages never work at the same time (a
barrier after every micro-batch, every input received before any is computed, one request group decoded
after the other), a send that waits for the receiver, hidden states re-sent for the whole sequence instead
of the new token (no KV cache), logits sent back instead of token ids, a collective where a message to the
neighbour belongs, a receive posted that no send will ever match. tests/graders/test_ch03_pipeline.py::
test_planted_mistakes_are_caught runs each through its exercise's own checks (one case each) and asserts
that it fails with the message that points at its mistake. None of them is an answer: each fails its grader.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.distributed as dist

from helpers.course.pipeline_runtime import recv_tensor, send_tensor, stage_neighbours, wait_all
from helpers.course.schedule_sim import Action


@dataclass
class Planted:
    exercise: str
    name: str
    doc: str
    case: str            # the grader case (of that exercise's cases) that runs it
    caught_by: str       # regex the grader's message must match
    impl: object


# ------------------------------------------------------------------------------------- 3.1 / 3.2

def _stage_class(mistake: str = ""):
    class PipelineStage:
        def __init__(self, module, prev_rank=None, next_rank=None, group=None):
            if mistake == "neighbours_by_rank_number":      # rank - 1 / rank + 1 instead of the given ranks
                me = dist.get_rank()
                prev_rank = None if prev_rank is None else me - 1
                next_rank = None if next_rank is None else me + 1
            self.module, self.prev_rank, self.next_rank, self.group = module, prev_rank, next_rank, group
            self.pending_sends = []

        @classmethod
        def from_ranks(cls, module, stage_ranks, group=None):
            return cls(module, *stage_neighbours(stage_ranks, dist.get_rank()), group)

        is_first = property(lambda self: self.prev_rank is None)
        is_last = property(lambda self: self.next_rank is None)

        def forward(self, x=None, timeline=None, micro_batch=None, prefetch_next=False):
            span = timeline.span("F", micro_batch=micro_batch) if timeline is not None else nullcontext()
            if mistake == "span_wraps_receive":             # the span also times the wait for the input
                with span:
                    if not self.is_first:
                        x = recv_tensor(self.prev_rank, self.group, prefetch=prefetch_next)
                    y = self.module(x)
                    if not self.is_last:
                        self.pending_sends += send_tensor(y, self.next_rank, self.group)
                return y if self.is_last else None
            if not self.is_first:
                x = recv_tensor(self.prev_rank, self.group, prefetch=prefetch_next)
            with span:
                y = self.module(x)
                if not self.is_last:
                    self.pending_sends += send_tensor(y, self.next_rank, self.group)
                    if mistake == "blocking_send":          # waits until the next stage has received it
                        wait_all(self.pending_sends)
            return y if self.is_last else None

        def wait_sends(self):
            wait_all(self.pending_sends)

    return PipelineStage


def _gpipe(mistake: str = ""):
    def gpipe_forward(stage, batch, num_micro_batches, timeline=None):
        m = num_micro_batches
        if mistake != "no_argument_checks":
            if m < 1:
                raise ValueError(f"num_micro_batches={m} must be at least 1")
            if stage.is_first and batch.shape[0] < m:
                raise ValueError(f"a batch of {batch.shape[0]} cannot be split into {m} micro-batches")
        if stage.is_first:
            split = torch.chunk if mistake == "chunk_split" else torch.tensor_split
            micro_batches = list(split(batch, m))
            m = len(micro_batches) if mistake == "no_argument_checks" else m
        if mistake == "receive_all_first" and not stage.is_first:
            # every input collected before any is computed: stage s starts when stage s-1 has finished all
            micro_batches = [recv_tensor(stage.prev_rank, stage.group, prefetch=i < m - 1) for i in range(m)]
        outputs = []
        for i in range(m):
            if mistake == "receive_all_first":
                with timeline.span("F", micro_batch=i) if timeline is not None else nullcontext():
                    y = stage.module(micro_batches[i])
                    if not stage.is_last:
                        stage.pending_sends += send_tensor(y, stage.next_rank, stage.group)
            else:
                prefetch = True if mistake == "prefetch_after_last" else i < m - 1 and mistake != "no_prefetch"
                y = stage.forward(micro_batches[i] if stage.is_first else None, timeline=timeline,
                                  micro_batch=i, prefetch_next=prefetch)
            if stage.is_last:
                outputs.append(y)
            if mistake == "barrier_per_micro_batch":        # every micro-batch leaves before the next enters
                dist.barrier()
        if mistake != "no_wait_sends":
            stage.wait_sends()
        return torch.cat(outputs) if stage.is_last else None
    return gpipe_forward


def _pp(stage_mistake="", gpipe_mistake=""):
    return SimpleNamespace(PipelineStage=_stage_class(stage_mistake), gpipe_forward=_gpipe(gpipe_mistake))


# --------------------------------------------------------------------------------------------- 3.3

def _one_f_one_b(mistake: str):
    def one_f_one_b_order(num_stages, num_micro_batches):
        p, m = num_stages, num_micro_batches
        if mistake == "gpipe_order":                        # right bubble, m activations held everywhere
            return [[Action("F", i) for i in range(m)] + [Action("B", i) for i in range(m)] for _ in range(p)]
        orders = []
        for rank in range(p):
            warmup = {"warmup_one_too_many": min(p - rank, m), "no_warmup_cap": p - 1 - rank}.get(
                mistake, min(p - 1 - rank, m))
            ops = [Action("F", mb) for mb in range(warmup)]
            for k in range(m - warmup):
                pair = [Action("F", warmup + k), Action("B", k)]
                ops += pair[::-1] if mistake == "backward_first" else pair
            ops += [Action("B", mb) for mb in range(m - warmup, m)]
            orders.append(ops)
        return orders
    return one_f_one_b_order


# --------------------------------------------------------------------------------------------- 3.4

def _pipelined_generate(mistake: str):
    def pipelined_generate(stage, stage_ranks, prompt_groups, max_new_tokens, group=None, timeline=None):
        if mistake != "no_argument_checks" and max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens} must be at least 1")
        rank = dist.get_rank()
        index = stage_ranks.index(rank)
        prev_rank = stage_ranks[index - 1] if index > 0 else None
        next_rank = stage_ranks[index + 1] if index + 1 < len(stage_ranks) else None
        first_rank, last_rank = stage_ranks[0], stage_ranks[-1]
        G, n = len(prompt_groups), max_new_tokens
        caches = [stage.new_cache() for _ in range(G)]
        tokens = [g.clone() for g in prompt_groups]
        local, pending = [None] * G, []
        expected, received = G * n, 0

        def receive(src):
            nonlocal received
            received += 1
            prefetch = True if mistake == "prefetch_after_last" else received < expected
            return recv_tensor(src, group, prefetch=prefetch)

        def token_to_first(g, out):
            if mistake == "broadcast_token":                # a collective for a message to one rank
                t = out if stage.is_last else torch.empty(prompt_groups[g].shape[0], 1, dtype=torch.int64)
                dist.broadcast(t, last_rank, group=group)
                if stage.is_first:
                    local[g] = t
                return
            if stage.is_last and stage.is_first:
                local[g] = out
            elif stage.is_last:
                pending.extend(send_tensor(out, first_rank, group))

        def token_at_first(g):
            if mistake == "broadcast_token" or stage.is_last:
                return local[g]
            t = receive(last_rank)
            return t.argmax(dim=-1, keepdim=True) if mistake == "logits_back" else t

        def step(g, s):
            L = prompt_groups[g].shape[1]
            if mistake == "no_kv_cache":                    # the whole sequence again at every step
                cache, start = None, 0
            else:
                cache, start = caches[g], (0 if s == 0 else L + s - 1)
            if stage.is_first:
                if s > 0:
                    tokens[g] = torch.cat([tokens[g], token_at_first(g)], dim=1)
                x = tokens[g] if (s == 0 or mistake == "no_kv_cache") else tokens[g][:, -1:]
            else:
                x = receive(prev_rank)
            label = "decode" if (mistake == "wrong_labels" or s > 0) else "prefill"
            with timeline.span(label, micro_batch=g) if timeline is not None else nullcontext():
                out = stage(x, cache, start)
                if stage.is_last:
                    out = out[:, -1] if mistake == "logits_back" else out[:, -1].argmax(dim=-1, keepdim=True)
            if not stage.is_last:
                pending.extend(send_tensor(out, next_rank, group))
            if stage.is_last or mistake == "broadcast_token":
                token_to_first(g, out if stage.is_last else None)

        if mistake == "one_group_at_a_time":                # right ids, but only one stage ever busy
            for g in range(G):
                for s in range(n):
                    step(g, s)
                if stage.is_first:
                    tokens[g] = torch.cat([tokens[g], token_at_first(g)], dim=1)
        else:
            for s in range(n):
                for g in range(G):
                    step(g, s)
            if stage.is_first:
                for g in range(G):
                    tokens[g] = torch.cat([tokens[g], token_at_first(g)], dim=1)
        wait_all(pending)
        return tokens if stage.is_first else None
    return pipelined_generate


PLANTED = [
    Planted("3.1", "blocking_send", "forward waits for its send to complete (the next stage must have posted "
            "its receive) before it returns", "handover", r"waits for the receiver", _pp("blocking_send")),
    Planted("3.1", "span_wraps_receive", "the 'F' span also times the wait for the input",
            "p4", r"span .* starts before .* could have arrived", _pp("span_wraps_receive")),
    Planted("3.1", "neighbours_by_rank_number", "sends to rank + 1 and receives from rank - 1 instead of "
            "next_rank / prev_rank", "ranks0213",
            r"sent .* to rank 1, but its next stage is rank 2|receive from prev_rank and send to next_rank",
            _pp("neighbours_by_rank_number")),
    Planted("3.2", "barrier_per_micro_batch", "a barrier after every micro-batch: no two stages ever compute "
            "at once", "overlap", r"called barrier|did not overlap", _pp(gpipe_mistake="barrier_per_micro_batch")),
    Planted("3.2", "receive_all_first", "each stage receives all its inputs before computing any",
            "overlap", r"did not overlap", _pp(gpipe_mistake="receive_all_first")),
    Planted("3.2", "chunk_split", "torch.chunk: 7 rows in 3 micro-batches of 3, 3, 1 instead of 3, 2, 2",
            "p2", r"micro-batch sizes .*\[3, 3, 1\].*\[3, 2, 2\]", _pp(gpipe_mistake="chunk_split")),
    Planted("3.2", "prefetch_after_last", "prefetch_next=True on the last micro-batch too: a receive posted "
            "that no send will match", "p2", r"receives? posted .* never sent",
            _pp(gpipe_mistake="prefetch_after_last")),
    Planted("3.2", "no_prefetch", "prefetch_next never passed: each receive is posted only when its input is "
            "needed (only the timing changes)", "p2", r"prefetch_next=\[False, False, False\]",
            _pp(gpipe_mistake="no_prefetch")),
    Planted("3.2", "no_wait_sends", "returns without stage.wait_sends(): its last sends may still be in flight",
            "p2", r"wait_sends", _pp(gpipe_mistake="no_wait_sends")),
    Planted("3.2", "no_argument_checks", "no ValueError for num_micro_batches < 1 or too small a batch",
            "p1", r"ValueError", _pp(gpipe_mistake="no_argument_checks")),
    Planted("3.3", "gpipe_order", "all forwards, then all backwards", "4x8", r"expected F0 F1 F2 F3 B0",
            _one_f_one_b("gpipe_order")),
    Planted("3.3", "warmup_one_too_many", "p - r warm-up forwards instead of p - 1 - r", "4x8",
            r"rank 0: expected", _one_f_one_b("warmup_one_too_many")),
    Planted("3.3", "backward_first", "B before F in the steady state", "4x8", r"rank 0: expected F0 F1 F2 F3 B0",
            _one_f_one_b("backward_first")),
    Planted("3.3", "no_warmup_cap", "warm-up not capped at m: fewer micro-batches than stages break",
            "3x1", r"rank 0: expected F0 B0", _one_f_one_b("no_warmup_cap")),
    Planted("3.4", "one_group_at_a_time", "every step of group 0, then of group 1, ...: the right ids, one "
            "stage busy at a time", "overlap", r"did not overlap", _pipelined_generate("one_group_at_a_time")),
    Planted("3.4", "no_kv_cache", "no KV cache: every step recomputes and re-sends the whole sequence",
            "2 stages", r"bytes .* rank 0 -> rank 1", _pipelined_generate("no_kv_cache")),
    Planted("3.4", "logits_back", "the last stage sends the logits back, the first stage takes the argmax",
            "2 stages", r"bytes .* rank 1 -> rank 0", _pipelined_generate("logits_back")),
    Planted("3.4", "broadcast_token", "the token goes back by a broadcast to every rank",
            "2 stages", r"called broadcast", _pipelined_generate("broadcast_token")),
    Planted("3.4", "prefetch_after_last", "prefetch on the very last receive: a receive no send will match",
            "2 stages", r"receives? posted .* never sent", _pipelined_generate("prefetch_after_last")),
    Planted("3.4", "wrong_labels", "every span labelled 'decode', the prefill too", "2 stages",
            r"spans of group 0: expected", _pipelined_generate("wrong_labels")),
    Planted("3.4", "no_argument_checks", "no ValueError for max_new_tokens < 1", "1 stage", r"ValueError",
            _pipelined_generate("no_argument_checks")),
]


# ------------------------------------------------------------- valid alternatives: each must pass its grader

def _own_transport_stage():
    """3.1 without send_tensor / recv_tensor: a shape message then the data, sent with batch_isend_irecv,
    received with blocking recv; no prefetch."""
    base = _stage_class()

    class PipelineStage(base):
        def forward(self, x=None, timeline=None, micro_batch=None, prefetch_next=False):
            if not self.is_first:
                shape = torch.empty(2, dtype=torch.int64)
                dist.recv(shape, self.prev_rank, group=self.group)
                x = torch.empty(*shape.tolist())
                dist.recv(x, self.prev_rank, group=self.group)
            with timeline.span("F", micro_batch=micro_batch) if timeline is not None else nullcontext():
                y = self.module(x)
                if not self.is_last:
                    shape, data = torch.tensor(y.shape, dtype=torch.int64), y.contiguous()
                    ops = [dist.P2POp(dist.isend, shape, self.next_rank, self.group),
                           dist.P2POp(dist.isend, data, self.next_rank, self.group)]
                    self.pending_sends += dist.batch_isend_irecv(ops) + [shape, data]
            return y if self.is_last else None
    return PipelineStage


def _int32_tokens_no_prefetch_generate():
    """3.4 with blocking receives and no prefetch, token ids sent back as int32."""
    def pipelined_generate(stage, stage_ranks, prompt_groups, max_new_tokens, group=None, timeline=None):
        if max_new_tokens < 1 or dist.get_rank() not in stage_ranks:
            raise ValueError("max_new_tokens must be at least 1 and this rank a stage rank")
        i = stage_ranks.index(dist.get_rank())
        prev_rank = stage_ranks[i - 1] if i > 0 else None
        next_rank = stage_ranks[i + 1] if i + 1 < len(stage_ranks) else None
        caches = [stage.new_cache() for _ in prompt_groups]
        tokens, pending, local = [g.clone() for g in prompt_groups], [], {}

        def token(g):
            return local.pop(g) if stage.is_last else recv_tensor(stage_ranks[-1], group).long()

        for s in range(max_new_tokens):
            for g, prompt in enumerate(prompt_groups):
                if stage.is_first:
                    if s:
                        tokens[g] = torch.cat([tokens[g], token(g)], 1)
                    x = prompt if s == 0 else tokens[g][:, -1:]
                else:
                    x = recv_tensor(prev_rank, group)
                with timeline.span("decode" if s else "prefill", micro_batch=g) if timeline else nullcontext():
                    out = stage(x, caches[g], 0 if s == 0 else prompt.shape[1] + s - 1)
                if stage.is_last:
                    out = out[:, -1].argmax(-1, keepdim=True).to(torch.int32)
                    if stage.is_first:
                        local[g] = out.long()
                    else:
                        pending += send_tensor(out, stage_ranks[0], group)
                else:
                    pending += send_tensor(out, next_rank, group)
        if stage.is_first:
            tokens = [torch.cat([t, token(g)], 1) for g, t in enumerate(tokens)]
        wait_all(pending)
        return tokens if stage.is_first else None
    return pipelined_generate


VALID = [  # (exercise, name, cases, implementation)
    ("3.1", "own_transport_batch_isend_irecv", ("ranks203group", "handover", "p4"), SimpleNamespace(
        PipelineStage=_own_transport_stage(), gpipe_forward=_gpipe())),
    ("3.4", "int32_tokens_no_prefetch", ("1 stage", "2 stages reversed", "overlap"),
     _int32_tokens_no_prefetch_generate()),
]
