"""The OpenAI-compatible completions protocol: validate a request body, build a response body.

    POST /v1/completions  {"prompt": "It was", "max_tokens": 16, "temperature": 0}
    -> {"id": "cmpl-0", "object": "text_completion", "model": ..., "choices": [{"index": 0, "text": ...,
        "finish_reason": "length", ...}], "usage": {"prompt_tokens": ..., "completion_tokens": ..., ...}}

The seed's gRPC service maps onto it one to one: `InferenceService.Predict` is `POST /v1/completions`,
`InferenceRequest.model_id` is `model`, `input_data` is `prompt` (text, or token ids), and
`InferenceResponse` is the JSON above. Every mistake in a request is answered with HTTP 400 and a body
{"error": {"message", "type", "param", "code"}} that says what was wrong, as vLLM and OpenAI answer it.

Sampling parameters are checked so that no request can make the sampler fail: numbers must be finite
(JSON's NaN and Infinity are refused, and so is 1e400, which Python reads as infinity), and a temperature
too small to divide by is handled as vLLM handles it (`SAMPLING_EPS`, `MIN_TEMPERATURE` below).
"""
from __future__ import annotations

import json
import math
import reprlib
import sys
import time

# Parameters this server understands. Anything else is refused by name rather than silently ignored: a
# client that sends `max_new_tokens` (Hugging Face's name) should learn it has no effect here.
ACCEPTED = {"model", "prompt", "max_tokens", "temperature", "top_p", "seed", "n", "stream",
            "return_token_ids", "user"}
RENAMED = {"max_new_tokens": "max_tokens", "max_length": "max_tokens (which does not count the prompt)",
           "do_sample": "temperature (0 = greedy)", "best_of": "n (vLLM removed best_of)"}

# Sampling divides the logits by the temperature. Below SAMPLING_EPS a temperature means greedy decoding;
# between it and MIN_TEMPERATURE it is raised to MIN_TEMPERATURE, since logits / 1e-45 overflow float32 to
# inf and softmax turns inf into NaN. vLLM uses the same two numbers (_SAMPLING_EPS, _MAX_TEMP in
# vllm/sampling_params.py).
SAMPLING_EPS = 1e-5
MIN_TEMPERATURE = 1e-2
_short = reprlib.Repr()   # a value quoted in an error message, cut short (a client may send megabytes)
_short.maxstring = _short.maxother = 60
_show = _short.repr


class BadRequest(ValueError):
    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.message, self.param, self.status = message, param, status


def error_body(message: str, status: int, param: str | None = None) -> dict:
    kind = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError", 405: "MethodNotAllowed",
            413: "RequestTooLarge", 503: "ServiceUnavailable", 504: "Timeout"}.get(status, "InternalServerError")
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def _number(body, name, default, low, high, integer=False, low_open=False):
    v = body.get(name, default)
    if v is None:
        return default
    ok_type = (isinstance(v, int) if integer else isinstance(v, (int, float))) and not isinstance(v, bool)
    if not ok_type:
        raise BadRequest(f"'{name}' must be {'an integer' if integer else 'a number'}, got {_show(v)}", name)
    if isinstance(v, float) and not math.isfinite(v):
        raise BadRequest(f"'{name}'={v!r} is not a finite number", name)
    if v < low or v > high or (low_open and v == low):
        bounds = f"{'>' if low_open else '>='} {low} and <= {high}"
        raise BadRequest(f"'{name}'={_show(v)} is out of range: it must be {bounds}", name)
    return v


def decode_json(body: bytes):
    """The request body as JSON, or BadRequest: not JSON, not UTF-8, NaN/Infinity (not JSON either, though
    Python's json module reads them), an integer over Python's 4,300-digit limit, or nesting so deep that
    the parser runs out of stack are all the client's mistakes, answered 400."""
    def refuse_constant(name):
        raise BadRequest(f"the body is not valid JSON: {name} is not a JSON number")
    try:
        return json.loads(body, parse_constant=refuse_constant)
    except BadRequest:
        raise
    except RecursionError:
        raise BadRequest("the body is nested too deeply for this server's JSON parser") from None
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError, the int digit limit, bad encodings
        if "integer string conversion" in str(e):
            raise BadRequest("the body holds an integer with more digits than this server reads "
                             f"({sys.get_int_max_str_digits()})") from None
        raise BadRequest(f"the body is not valid JSON: {str(e)[:200]}") from None


def sampling_temperature(temperature: float) -> float:
    """The temperature the sampler uses: 0 (greedy) below SAMPLING_EPS, at least MIN_TEMPERATURE otherwise."""
    if temperature < SAMPLING_EPS:
        return 0.0
    return max(temperature, MIN_TEMPERATURE)


def parse_completion(body, *, model_name: str, max_model_len: int, vocab_size: int, encode) -> dict:
    """Validate a decoded JSON body. Returns {prompt (token ids), max_tokens, temperature, top_p, seed,
    return_token_ids}; raises BadRequest with a message naming the offending parameter."""
    if not isinstance(body, dict):
        raise BadRequest(f"the request body must be a JSON object, got {type(body).__name__}")
    unknown = sorted(set(body) - ACCEPTED)
    if unknown:
        hints = "; ".join(f"'{k}': use {RENAMED[k]}" for k in unknown if k in RENAMED)
        raise BadRequest(f"unknown parameter(s) {', '.join(_show(k) for k in unknown[:10])}"
                         + (f" ({hints})" if hints else "") + f". Accepted: {', '.join(sorted(ACCEPTED))}",
                         unknown[0][:60])
    if "model" in body and body["model"] != model_name:
        raise BadRequest(f"model {_show(body['model'])} is not served here; this server serves {model_name!r}",
                         "model", status=404)
    if "prompt" not in body:
        raise BadRequest("'prompt' is required: a string, or a list of token ids", "prompt")
    prompt = body["prompt"]
    if isinstance(prompt, str):
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError as e:  # JSON allows "\ud800", a lone surrogate no UTF-8 text contains
            raise BadRequest(f"'prompt' is not valid Unicode text: {e.reason} at character {e.start}",
                             "prompt") from None
        ids = encode(prompt)
    elif isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        bad = [t for t in prompt if not 0 <= t < vocab_size]
        if bad:
            raise BadRequest(f"token ids must lie in [0, {vocab_size}); got {bad[:5]}", "prompt")
        ids = list(prompt)
    else:
        raise BadRequest("'prompt' must be a string or a list of token ids (one prompt per request: send "
                         "several requests, the server batches them)", "prompt")
    if not ids:
        raise BadRequest("'prompt' is empty: send at least one token", "prompt")
    max_tokens = _number(body, "max_tokens", 16, 1, max_model_len, integer=True)
    if len(ids) + max_tokens > max_model_len:
        raise BadRequest(f"this model's maximum context length is {max_model_len} tokens; you requested "
                         f"{len(ids) + max_tokens} tokens ({len(ids)} in the prompt, {max_tokens} for the "
                         "completion). Shorten the prompt or lower max_tokens.", "prompt")
    params = {"prompt": ids, "max_tokens": max_tokens,
              "temperature": sampling_temperature(float(_number(body, "temperature", 1.0, 0.0, 2.0))),
              "top_p": float(_number(body, "top_p", 1.0, 0.0, 1.0, low_open=True)),
              "seed": _number(body, "seed", None, -2**63, 2**63 - 1, integer=True)}
    if _number(body, "n", 1, 1, 1, integer=True) != 1:
        raise BadRequest("'n' must be 1 here", "n")
    if body.get("stream", False) not in (False, None):
        raise BadRequest("streaming is not supported by this server: send 'stream': false", "stream")
    if not isinstance(body.get("return_token_ids", False), bool):
        raise BadRequest("'return_token_ids' must be true or false", "return_token_ids")
    params["return_token_ids"] = body.get("return_token_ids", False)
    if not isinstance(body.get("user", ""), (str, type(None))):
        raise BadRequest(f"'user' must be a string, got {_show(body['user'])}", "user")
    return params


def completion_body(rid: int, model_name: str, params: dict, tokens: list[int], decode) -> dict:
    choice = {"index": 0, "text": decode(tokens), "logprobs": None,
              "finish_reason": "length" if len(tokens) >= params["max_tokens"] else "stop"}
    if params.get("return_token_ids"):
        # vLLM's extension (vllm-project/vllm#22587): exact ids, since text may not round-trip
        choice["prompt_token_ids"], choice["token_ids"] = params["prompt"], tokens
    n_prompt = len(params["prompt"])
    return {"id": f"cmpl-{rid}", "object": "text_completion", "created": int(time.time()), "model": model_name,
            "choices": [choice],
            "usage": {"prompt_tokens": n_prompt, "completion_tokens": len(tokens),
                      "total_tokens": n_prompt + len(tokens)}}
