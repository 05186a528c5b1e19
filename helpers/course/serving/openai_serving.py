"""Completions and chat completions on top of the balancer: n choices, stop strings, logprobs, streaming.

This is the course's version of vLLM's `OpenAIServingCompletion` and `OpenAIServingChat`
(vllm/entrypoints/openai/completion/serving.py, chat_completion/serving.py). A request becomes

    n submissions to the balancer  ->  tokens as each replica step produces them  ->  text  ->  a response

* **n > 1** is a fan-out, as vLLM's `ParentRequest` does it (vllm/v1/engine/parallel_sampling.py): n child
  requests with the parent's parameters; with a seed, child i gets seed + i (so the n choices differ, and the
  same request gives the same n choices again); without one, every child draws its own.
* **Text** comes from the tokens step by step (`TextStream`): a character whose UTF-8 bytes are still arriving
  is held back until it is whole, as vLLM's incremental detokenizer does (vllm/v1/engine/detokenizer.py).
* **Stop strings** are found in that text (`check_stop_strings`, vLLM's function of the same name): the text is
  cut before the stop string, the tokens after the one that completed it are dropped, finish_reason is
  "stop", and the request is cancelled on its replica (`balancer.cancel`), which frees its KV blocks. While
  streaming, the last len(longest stop) - 1 characters are held back: they may be the start of a stop string
  that the next token completes, and text once sent cannot be taken back.
* **Streaming** is server-sent events: one `data: {json}` chunk per replica step (chat: a first chunk with the
  role), the last chunk of a choice with its finish_reason, with `stream_options.include_usage` a usage chunk
  with no choices, then `data: [DONE]`. A client that disconnects has its requests cancelled: Starlette stops
  the response's generator, whose `finally` cancels what is unfinished.
* **logprobs** (completions: `logprobs: k`; chat: `logprobs: true, top_logprobs: k`) are the replica's: the
  logprob of each sampled token in the model's distribution and the k most likely tokens, in OpenAI's two
  formats (`completion_logprobs`, `chat_logprobs`).
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator

from fastapi.responses import JSONResponse, StreamingResponse

from helpers.course.serving.balancer import NoReplicaError, RequestFailed
from helpers.course.serving.protocol import (BadRequest, ChatCompletionRequest, CompletionRequest, chat_prompt,
                                             completion_prompt, error_body, sampling_params, stop_strings)

REQUEST_TIMEOUT = 120.0   # seconds before a request is given up (504, or an error event when streaming)


def random_id(prefix: str) -> str:
    """`cmpl-<32 hex digits>`: unique across restarts (vLLM: vllm/utils/__init__.py random_uuid, 16 digits)."""
    return f"{prefix}-{uuid.uuid4().hex}"


def check_stop_strings(text: str, new_chars: int, stop: list[str]) -> tuple[str, int] | None:
    """(the stop string, where it starts) for the stop string that ends earliest among those that end in the
    last `new_chars` characters of `text`, or None (vllm/v1/engine/detokenizer.py, check_stop_strings)."""
    best = None
    for s in stop:
        at = text.find(s, max(0, len(text) - new_chars - len(s) + 1))
        if at != -1 and (best is None or at + len(s) < best[1] + len(best[0])):
            best = (s, at)
    return best


class TextStream:
    """One choice's text, built token by token, with stop strings (vLLM's IncrementalDetokenizer, small)."""

    def __init__(self, decode, stop: list[str]):
        self.decode, self.stop = decode, stop
        self.hold = max((len(s) for s in stop), default=1) - 1   # characters a stop string may still claim
        self.tokens: list[int] = []
        self.text = ""            # the text of self.tokens, but for a character still incomplete
        self.sent = 0             # characters already handed out by delta()
        self.stopped = None       # the stop string found, if any

    def add(self, token_ids: list[int]) -> int:
        """Append new tokens; returns how many were kept (those after a stop string's last token are not)."""
        for kept, token in enumerate(token_ids):
            self.tokens.append(token)
            # a byte-level model's text grows one byte at a time: a character whose bytes have not all arrived
            # decodes to U+FFFD, not yet part of the text
            text = self.decode(self.tokens).rstrip("\ufffd")
            new_chars, self.text = len(text) - len(self.text), text
            found = check_stop_strings(self.text, new_chars, self.stop) if self.stop and new_chars > 0 else None
            if found:
                self.stopped, at = found
                self.text = self.text[:at]
                return kept + 1
        return len(token_ids)

    def delta(self, finished: bool) -> str:
        """The text not handed out yet; while unfinished, less the characters a stop string may still claim."""
        if finished and not self.stopped:
            self.text = self.decode(self.tokens)   # an incomplete last character is U+FFFD now, as OpenAI's
        end = len(self.text) if finished else max(self.sent, len(self.text) - self.hold)
        out, self.sent = self.text[self.sent:end], end
        return out


class Choice:
    """One of the n sequences of a request: its stream from the balancer, its text, its logprobs."""

    def __init__(self, index: int, params: dict, text: TextStream):
        self.index, self.params, self.text = index, params, text
        self.stream = None                 # the balancer's Stream, once submitted
        self.logprobs: list[dict] = []   # {"token", "logprob", "top"} per kept token
        self.streamed_chars = 0          # completions' text_offset of the next streamed token
        self.finish_reason: str | None = None
        self.replica = self.retries = None


class OpenAIServing:
    """The two endpoints' logic; server.py routes requests to `completions` and `chat_completions`."""

    def __init__(self, balancer, metrics, model_module, model_name: str, tokenizer=None):
        self.balancer, self.metrics, self.model_name = balancer, metrics, model_name
        self.encode, self.decode = model_module.encode, model_module.decode
        config = model_module.CONFIG
        self.max_model_len, self.vocab_size = config.max_position_embeddings, config.vocab_size
        self._tokenizer = tokenizer

    @property
    def tokenizer(self):
        """The model's Hugging Face tokenizer, for its chat template (loaded on the first chat request)."""
        if self._tokenizer is None:
            from helpers.course.tokenizer import load_tokenizer
            self._tokenizer = load_tokenizer()
        return self._tokenizer

    # ------------------------------------------------------------------------------------ endpoints
    async def completions(self, request: CompletionRequest, raw_request):
        ids = completion_prompt(request, vocab_size=self.vocab_size, encode=self.encode)
        params = self._params(request, ids, max_tokens=request.max_tokens, logprobs=request.logprobs)
        return await self._respond(request, params, raw_request, chat=False, logprobs=request.logprobs)

    async def chat_completions(self, request: ChatCompletionRequest, raw_request):
        ids = self.encode(chat_prompt(request, self.tokenizer))
        top = (request.top_logprobs or 0) if request.logprobs else None
        params = self._params(request, ids, max_tokens=request.max_completion_tokens or request.max_tokens,
                              logprobs=top)
        return await self._respond(request, params, raw_request, chat=True, logprobs=top)

    def _params(self, request, ids, max_tokens, logprobs) -> dict:
        params = sampling_params(request, ids, model_name=self.model_name, max_model_len=self.max_model_len,
                                 max_tokens=max_tokens)
        return {**params, "logprobs": logprobs}

    async def _respond(self, request, params: dict, raw_request, *, chat: bool, logprobs):
        rid = random_id("chatcmpl" if chat else "cmpl")
        n = request.n or 1
        run = Generation(self.balancer, params, n, stop_strings(request), self.decode)
        if request.stream:
            include_usage = bool(request.stream_options and request.stream_options.include_usage)
            events = self._stream(run, rid, chat, logprobs, include_usage)
            return StreamingResponse(events, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        received = time.perf_counter()
        try:
            async with contextlib.aclosing(run.steps()) as steps:
                async with asyncio.timeout(REQUEST_TIMEOUT):
                    async for _ in steps:
                        pass
        except TimeoutError:
            return error_response(504, f"no replica answered within {REQUEST_TIMEOUT:g} s")
        except RequestFailed as e:   # it failed on its replica (which carries on): not retried
            return error_response(e.status, e.message, headers={"X-Replica": str(e.replica)})
        except NoReplicaError as e:
            return error_response(503, str(e))
        except asyncio.CancelledError:
            self.metrics.disconnects.inc()   # server.py cancels us when the client leaves
            raise
        self.metrics.latency.observe(time.perf_counter() - received)
        self.metrics.tokens.inc(run.completion_tokens)
        body = (chat_body if chat else completion_body)(rid, self.model_name, params, run, logprobs,
                                                        request.return_token_ids, self.decode)
        first = run.choices[0]
        return JSONResponse(body, headers={"X-Replica": str(first.replica), "X-Retries": str(first.retries)})

    async def _stream(self, run: Generation, rid: str, chat: bool, logprobs, include_usage: bool):
        """The server-sent events of a streamed request (vLLM: completion_stream_generator,
        chat_completion_stream_generator)."""
        head = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                "created": int(time.time()), "model": self.model_name}
        finished, received = False, time.perf_counter()
        try:
            if chat:   # the first chunk of each choice says who speaks
                for c in run.choices:
                    yield sse({**head, "choices": [{"index": c.index, "delta": {"role": "assistant", "content": ""},
                                                    "logprobs": None, "finish_reason": None}]})
            async with contextlib.aclosing(run.steps()) as steps:
                async with asyncio.timeout(REQUEST_TIMEOUT):
                    async for choice, text, new_logprobs in steps:
                        lp = None
                        if logprobs is not None:
                            lp = format_logprobs(chat, new_logprobs, logprobs, self.decode, choice.streamed_chars)
                            choice.streamed_chars += sum(len(t) for t in lp.get("tokens", ()))
                        if chat:
                            delta = {"content": text} if text or not choice.finish_reason else {}
                            item = {"index": choice.index, "delta": delta, "logprobs": lp,
                                    "finish_reason": choice.finish_reason}
                        else:
                            item = {"index": choice.index, "text": text, "logprobs": lp,
                                    "finish_reason": choice.finish_reason}
                        yield sse({**head, "choices": [item]})
            if include_usage:
                yield sse({**head, "choices": [], "usage": usage(len(run.params["prompt"]), run)})
            self.metrics.latency.observe(time.perf_counter() - received)
            self.metrics.tokens.inc(run.completion_tokens)
            finished = True
        except (RequestFailed, NoReplicaError, TimeoutError) as e:
            status = e.status if isinstance(e, RequestFailed) else 503 if isinstance(e, NoReplicaError) else 504
            message = e.message if isinstance(e, RequestFailed) else str(e) or \
                f"no replica answered within {REQUEST_TIMEOUT:g} s"
            yield sse(error_body(message, status))   # vLLM sends the error as an event too
            finished = True
        finally:
            if not finished:
                self.metrics.disconnects.inc()   # the client left: run.steps() cancelled what was unfinished
        yield "data: [DONE]\n\n"


class Generation:
    """The n child requests of one client request, merged into one sequence of steps."""

    def __init__(self, balancer, params: dict, n: int, stop: list[str], decode):
        self.balancer, self.params = balancer, params
        self.choices = []
        for i in range(n):
            child = dict(params)
            if params["seed"] is not None:
                child["seed"] = params["seed"] + i   # vLLM's ParentRequest: seed + index
            self.choices.append(Choice(i, child, TextStream(decode, stop)))

    @property
    def completion_tokens(self) -> int:
        return sum(len(c.text.tokens) for c in self.choices)

    async def steps(self) -> AsyncIterator[tuple[Choice, str, list]]:
        """(choice, new text, new logprob entries) for each output of a replica step, until every choice has a
        finish_reason. The children are submitted when it starts (a client gone before that costs nothing);
        closing it early (the client left, a timeout) cancels the unfinished ones."""
        queue: asyncio.Queue = asyncio.Queue()
        for c in self.choices:
            c.stream = self.balancer.submit(c.params)

        async def pump(choice):
            try:
                async for out in choice.stream:
                    queue.put_nowait((choice, out))
            except Exception as e:   # RequestFailed, NoReplicaError
                queue.put_nowait((choice, e))

        pumps = [asyncio.ensure_future(pump(c)) for c in self.choices]
        try:
            left = len(self.choices)
            while left:
                choice, out = await queue.get()
                if choice.finish_reason is not None:
                    continue   # stopped by a stop string: what its replica sent since is dropped
                if isinstance(out, Exception):
                    raise out
                kept = choice.text.add(out["token_ids"])
                new_logprobs = [{"token": t, **e} for t, e in zip(out["token_ids"][:kept], out.get("logprobs") or [])]
                choice.logprobs += new_logprobs
                choice.replica, choice.retries = out.get("replica"), out.get("retries")
                if choice.text.stopped is not None:
                    choice.finish_reason = "stop"
                    self.balancer.cancel(choice.stream.rid, finished=True)   # no more compute; KV blocks freed
                elif out["finished"]:
                    choice.finish_reason = "length" if len(choice.text.tokens) >= self.params["max_tokens"] \
                        else "stop"
                text = choice.text.delta(finished=choice.finish_reason is not None)
                if text or new_logprobs or choice.finish_reason:
                    yield choice, text, new_logprobs
                left -= choice.finish_reason is not None
        finally:
            for p in pumps:
                p.cancel()
            for c in self.choices:
                if c.finish_reason is None and c.stream is not None:
                    self.balancer.cancel(c.stream.rid)


# ------------------------------------------------------------------------------------ response bodies
def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def error_response(status: int, message: str, param=None, code=None, headers=None) -> JSONResponse:
    return JSONResponse(error_body(message, status, param, code), status_code=status, headers=headers)


def usage(n_prompt: int, run: Generation) -> dict:
    return {"prompt_tokens": n_prompt, "completion_tokens": run.completion_tokens,
            "total_tokens": n_prompt + run.completion_tokens}


def completion_body(rid, model_name, params, run: Generation, logprobs, return_token_ids, decode) -> dict:
    choices = []
    for c in run.choices:
        choice = {"index": c.index, "text": c.text.text, "finish_reason": c.finish_reason,
                  "logprobs": None if logprobs is None else format_logprobs(False, c.logprobs, logprobs, decode)}
        if return_token_ids:   # vLLM's extension (vllm-project/vllm#22587): exact ids, since text may not round-trip
            choice["prompt_token_ids"], choice["token_ids"] = params["prompt"], c.text.tokens
        choices.append(choice)
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model_name,
            "choices": choices, "usage": usage(len(params["prompt"]), run)}


def chat_body(rid, model_name, params, run: Generation, logprobs, return_token_ids, decode) -> dict:
    choices = []
    for c in run.choices:
        choice = {"index": c.index, "message": {"role": "assistant", "content": c.text.text},
                  "logprobs": None if logprobs is None else format_logprobs(True, c.logprobs, logprobs, decode),
                  "finish_reason": c.finish_reason}
        if return_token_ids:
            choice["prompt_token_ids"], choice["token_ids"] = params["prompt"], c.text.tokens
        choices.append(choice)
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model_name,
            "choices": choices, "usage": usage(len(params["prompt"]), run)}


def format_logprobs(chat: bool, entries: list[dict], k: int, decode, text_offset: int = 0):
    """The replica's logprobs ({"token", "logprob", "top": [[id, logprob], ...]} per token) in OpenAI's format.
    Completions: {tokens, token_logprobs, top_logprobs: [{token: logprob}], text_offset}; the top dict holds
    the k best and the sampled token (as vLLM's). Chat: {content: [{token, logprob, bytes, top_logprobs}]}.
    Logprobs of -inf (a token top-p ruled out) are sent as -9999.0, as vLLM and OpenAI do (JSON has no -inf)."""
    def piece(token_id: int) -> str:
        return decode([token_id])

    def lp(x: float) -> float:
        return max(x, -9999.0)

    if chat:
        return {"content": [{"token": piece(e["token"]), "logprob": lp(e["logprob"]),
                             "bytes": list(piece(e["token"]).encode("utf-8")),
                             "top_logprobs": [{"token": piece(t), "logprob": lp(x),
                                               "bytes": list(piece(t).encode("utf-8"))} for t, x in e["top"][:k]]}
                            for e in entries]}
    tokens = [piece(e["token"]) for e in entries]
    offsets, at = [], text_offset
    for t in tokens:
        offsets.append(at)
        at += len(t)
    return {"tokens": tokens, "token_logprobs": [lp(e["logprob"]) for e in entries],
            "top_logprobs": [{piece(t): lp(x) for t, x in [*e["top"][:k], (e["token"], e["logprob"])]}
                             for e in entries],
            "text_offset": offsets}

