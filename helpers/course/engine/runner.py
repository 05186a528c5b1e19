"""Model runners: what differs between the engine's replicas is only how a step's tokens are computed.

A runner's `execute(output, kv)` runs one scheduled step (SchedulerOutput: {rid: tokens} in order) and returns
{rid: logits [vocab]} for every request that has caught up in this step (its next token is due); the engine
samples. `release(rid)` forgets a request's state (finished, failed or preempted).

    PagedRunner(PagedLlamaRunner(...))   the paged KV cache (chapter 7): every scheduled token — prompt chunks and
                                   decodes of several requests — in ONE forward pass, as vLLM's model runner does
    ContiguousRunner(model)        chapter 6's transformers cache, one tensor per request, left-padded to batch
                                   the decodes (prompt chunks run one request at a time)
    ModelledRunner()               no model: a modelled run, where only the schedule and the clock matter;
                                   every sampled token is 0
"""
from __future__ import annotations

import torch
from transformers import DynamicCache

__all__ = ["PagedRunner", "ContiguousRunner", "ModelledRunner"]


def _entries(output):
    """(request, start, n, due) per scheduled request: due = its next token comes out of this step."""
    out = []
    for request in output.scheduled:
        n = output.num_scheduled_tokens[request.rid]
        start = request.num_computed_tokens
        out.append((request, start, n, start + n == request.num_tokens))
    return out


def _token_ids(request, start: int, n: int) -> list[int]:
    """request.all_token_ids[start:start + n] without building the whole list (a decode reads one token)."""
    prompt = request.prompt
    if start >= len(prompt):
        return request.tokens[start - len(prompt):start - len(prompt) + n]
    if start + n <= len(prompt):
        return prompt[start:start + n]
    return request.all_token_ids[start:start + n]


class ModelledRunner:
    """Computes nothing; returns token 0 for every request that is due."""

    def execute(self, output, kv) -> dict:
        return {request.rid: 0 for request, _, _, due in _entries(output) if due}

    def release(self, rid) -> None:
        pass


class PagedRunner:
    """The tiny Llama on a paged KV cache (helpers/course/paged_llama.py's PagedLlamaRunner, whose block manager is the
    KV cache manager's): one forward over every token of the step."""

    def __init__(self, paged):
        self.paged = paged

    def execute(self, output, kv) -> dict:
        entries = _entries(output)
        if not entries:
            return {}
        batch = [(request.rid, _token_ids(request, start, n), start) for request, start, n, _ in entries]
        logits = self.paged.forward_batch(batch)                      # [len(entries), vocab]: last position each
        return {request.rid: logits[i] for i, (request, _, _, due) in enumerate(entries) if due}

    def release(self, rid) -> None:
        pass                                                          # the blocks are the KV manager's


class ContiguousRunner:
    """Chapter 6's contiguous cache: per request, per layer, keys and values [1, kv_heads, length, head_dim].
    Decodes are batched in one forward, left-padded to the longest with an attention mask; a prompt (or chunk of
    one) runs alone with its own cache (padding a prompt into the decode batch would cost more than it saves)."""

    def __init__(self, model):
        self.model, self.caches = model, {}

    @torch.no_grad()
    def execute(self, output, kv) -> dict:
        logits, decodes = {}, []
        for request, start, n, due in _entries(output):
            if n == 1 and start > 0 and request.rid in self.caches and start == request.num_tokens - 1:
                decodes.append(request)
                continue
            ids = torch.tensor([request.all_token_ids[start:start + n]])
            past = DynamicCache(self.caches[request.rid]) if start else None
            out = self.model(input_ids=ids, position_ids=torch.arange(start, start + n)[None],
                             past_key_values=past, use_cache=True)
            self.caches[request.rid] = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
            if due:
                logits[request.rid] = out.logits[0, -1]
        if decodes:
            logits.update(self._decode(decodes))
        return logits

    def _decode(self, requests) -> dict:
        lengths = [r.num_tokens - 1 for r in requests]              # tokens in each cache
        longest = max(lengths)
        layers = []
        for layer in range(len(self.caches[requests[0].rid])):
            keys, values = [], []
            for r, n in zip(requests, lengths):
                k, v = self.caches[r.rid][layer]
                pad = longest - n  # left padding: every request's newest entry lines up at the right
                keys.append(torch.nn.functional.pad(k, (0, 0, pad, 0)))
                values.append(torch.nn.functional.pad(v, (0, 0, pad, 0)))
            layers.append((torch.cat(keys), torch.cat(values)))
        mask = torch.zeros(len(requests), longest + 1, dtype=torch.long)
        for i, n in enumerate(lengths):
            mask[i, longest - n:] = 1
        out = self.model(input_ids=torch.tensor([[r.all_token_ids[-1]] for r in requests]),
                         position_ids=torch.tensor([[n] for n in lengths]),
                         attention_mask=mask, past_key_values=DynamicCache(layers), use_cache=True)
        new = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
        for i, (r, n) in enumerate(zip(requests, lengths)):
            self.caches[r.rid] = [(k[i:i + 1, :, longest - n:], v[i:i + 1, :, longest - n:]) for k, v in new]
        return {r.rid: out.logits[i, -1] for i, r in enumerate(requests)}

    def release(self, rid) -> None:
        self.caches.pop(rid, None)
