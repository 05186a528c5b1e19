"""The OpenAI-compatible protocol: the request bodies as pydantic models, the server's rules on top of them, and
OpenAI's error object.

    POST /v1/completions       {"prompt": "It was", "max_tokens": 16, "temperature": 0, "stop": ["\\n"]}
    POST /v1/chat/completions  {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 16, "stream": true}

The models below play the part of vLLM's `CompletionRequest` and `ChatCompletionRequest`
(vllm/entrypoints/openai/completion/protocol.py, chat_completion/protocol.py): field names, types and ranges,
and the published schema (`/openapi.json` is generated from them). Two differences, both on purpose:

* vLLM's models allow unknown fields (`extra="allow"`: they are logged and ignored). Here they are refused by
  name (`extra="forbid"`): a client that sends `max_new_tokens` (Hugging Face's name) should learn that it has
  no effect, not get 16 tokens and wonder why. RENAMED adds a hint for the names people confuse.
* The body is decoded by `decode_json` before pydantic sees it: Python's json module reads `NaN` and
  `Infinity` (which are not JSON) and `1e400` as infinity, and a 5,000-digit integer or a deeply nested array
  make it raise; each is the client's mistake and gets a 400 naming it.

Pydantic's own error messages ("Input should be a valid integer") are turned into the course's by
`explain` ("'max_tokens' must be an integer, got 'ten'"); every error names the parameter (`param`).

Sampling parameters are checked so that no request can make the sampler fail: numbers must be finite, and a
temperature too small to divide by is handled as vLLM handles it (`SAMPLING_EPS`, `MIN_TEMPERATURE`).

Errors. OpenAI answers {"error": {"message", "type", "param", "code"}} with `type` such as
"invalid_request_error" and `code` a string or null ("invalid_api_key", "model_not_found",
"context_length_exceeded"). vLLM 0.32 sends the same four keys with `type` the exception's name
("BadRequestError") and `code` the HTTP status as an integer (vllm/entrypoints/serve/engine/protocol.py,
`ErrorInfo`). The `openai` client reads either (it keeps `message`, and `str(code)`): this server answers as
OpenAI does.
"""
from __future__ import annotations

import json
import reprlib
import sys
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

# A client that sends one of these names is told the one it meant.
RENAMED = {"max_new_tokens": "max_tokens", "max_length": "max_tokens (which does not count the prompt)",
           "do_sample": "temperature (0 = greedy)", "best_of": "n (vLLM removed best_of)"}

# Sampling divides the logits by the temperature. Below SAMPLING_EPS a temperature means greedy decoding;
# between it and MIN_TEMPERATURE it is raised to MIN_TEMPERATURE, since logits / 1e-45 overflow float32 to
# inf and softmax turns inf into NaN. vLLM uses the same two numbers (_SAMPLING_EPS, _MAX_TEMP in
# vllm/sampling_params.py).
SAMPLING_EPS = 1e-5
MIN_TEMPERATURE = 1e-2
MAX_LOGPROBS = 20     # top-k logprobs per token at most (vLLM's default --max-logprobs)
MAX_N = 16            # choices per request
MAX_STOP = 4          # stop strings per request (OpenAI's limit)
INT64 = (-2**63, 2**63 - 1)
_short = reprlib.Repr()   # a value quoted in an error message, cut short (a client may send megabytes)
_short.maxstring = _short.maxother = 60
_show = _short.repr


# ----------------------------------------------------------------------------------------------- errors
ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
               429: "rate_limit_error"}   # any other 4xx: invalid_request_error; 5xx: server_error


class BadRequest(ValueError):
    """A request the server refuses: the HTTP status, a message naming what is wrong, the parameter, and
    OpenAI's string `code` where it has one."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.code = message, param, status, code


def error_body(message: str, status: int, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error object for an answer of HTTP `status`."""
    kind = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class ErrorInfo(BaseModel):
    """OpenAI's error object, documented in /openapi.json (vLLM documents its ErrorResponse on every route)."""
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


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


def check_text(text: str, param: str) -> str:
    """JSON allows "\\ud800", a lone surrogate that no UTF-8 text contains: refuse it by name."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise BadRequest(f"'{param}' is not valid Unicode text: {e.reason} at character {e.start}", param) from None
    return text


# ----------------------------------------------------------------------------------------------- requests
class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool | None = Field(False, description="send a last chunk with the usage, and no choices")


class SamplingRequest(BaseModel):
    """What completions and chat share. `None` means the default, as in OpenAI's API."""
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = Field(None, description="the served model's name (GET /v1/models)")
    max_tokens: int | None = Field(16, ge=1, description="tokens to generate at most")
    temperature: float | None = Field(1.0, ge=0.0, le=2.0, allow_inf_nan=False, description="0: greedy")
    top_p: float | None = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    seed: int | None = Field(None, ge=INT64[0], le=INT64[1], description="the same seed, the same tokens")
    n: int | None = Field(1, ge=1, le=MAX_N, description="choices to generate for the prompt")
    stream: bool | None = Field(False, description="send server-sent events, one chunk per step")
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = Field(None, description=f"up to {MAX_STOP} strings; the text ends before one")
    user: str | None = None
    return_token_ids: bool | None = Field(False, description="vLLM's extension: the prompt's and choices' ids")
    # vLLM's sampling extensions that `vllm bench serve` always sends (vllm/benchmarks/lib/endpoint_request_func.py,
    # async_request_openai_completions: "repetition_penalty": 1.0; benchmarks/serve.py sets ignore_eos for random
    # prompts); vLLM's CompletionRequest has both (vllm/entrypoints/openai/completion/protocol.py)
    repetition_penalty: float | None = Field(1.0, description="vLLM's extension: only 1.0 (no penalty) here")
    ignore_eos: bool | None = Field(False, description="vLLM's extension: the tiny Llama has no EOS token (a no-op)")

    @field_validator("repetition_penalty", mode="before")
    @classmethod
    def _repetition_penalty(cls, v):
        if v is None or (type(v) in (int, float) and v == 1):
            return None if v is None else 1.0
        raise BadRequest(f"'repetition_penalty' {_show(v)} is not supported here: only 1.0 (no penalty)",
                         "repetition_penalty")

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, v):
        if v is None:
            return v
        stops = [v] if isinstance(v, str) else v
        if not (isinstance(stops, list) and 1 <= len(stops) <= MAX_STOP and all(isinstance(s, str) and s
                                                                                for s in stops)):
            raise BadRequest(f"'stop' must be a non-empty string or a list of 1 to {MAX_STOP} non-empty strings, "
                             f"got {_show(v)}", "stop")
        for s in stops:
            check_text(s, "stop")
        return v


class CompletionRequest(SamplingRequest):
    """POST /v1/completions (vLLM: CompletionRequest)."""
    prompt: str | list[int] = Field(description="a string, or a list of token ids")
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="the k most likely tokens at each step")
    echo: bool | None = Field(False, description="not supported: false")

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, v):
        if isinstance(v, str) or (isinstance(v, list) and all(isinstance(t, int) and not isinstance(t, bool)
                                                              for t in v)):
            return v
        raise BadRequest("'prompt' must be a string or a list of token ids (one prompt per request: send "
                         "several requests, the server batches them)", "prompt")


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _content(cls, v):
        if isinstance(v, str) or (isinstance(v, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                                              for p in v)):
            return v
        raise BadRequest(f"a message's 'content' must be a string or a list of {{\"type\": \"text\", \"text\": "
                         f"...}} parts (this model reads text only), got {_show(v)}", "messages")

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(SamplingRequest):
    """POST /v1/chat/completions (vLLM: ChatCompletionRequest)."""
    messages: Annotated[list[ChatMessage], Field(min_length=1, description="the conversation so far: "
                                                                           "{role, content} objects")]
    max_tokens: int | None = Field(None, ge=1, description="tokens to generate at most; default: the rest of the "
                                   "context (vLLM's default)")
    max_completion_tokens: int | None = Field(None, ge=1, description="OpenAI's newer name for max_tokens")
    logprobs: bool | None = Field(False, description="the logprob of each generated token")
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="with logprobs: the k most likely")


def explain(error: ValidationError, model: type[BaseModel]) -> BadRequest:
    """A pydantic ValidationError as the course's BadRequest: the first problem, in words, naming its parameter.
    Unknown parameters come first, all of them, with a hint for the names that have one."""
    errors = error.errors()
    unknown = [str(e["loc"][0]) for e in errors if e["type"] == "extra_forbidden" and len(e["loc"]) == 1]
    if unknown:
        hints = "; ".join(f"'{k}': use {RENAMED[k]}" for k in unknown if k in RENAMED)
        return BadRequest(f"unknown parameter(s) {', '.join(_show(k) for k in unknown[:10])}"
                          + (f" ({hints})" if hints else "") + f". Accepted: {', '.join(sorted(model.model_fields))}",
                          unknown[0][:60])
    e = errors[0]
    cause = (e.get("ctx") or {}).get("error")
    if isinstance(cause, BadRequest):   # raised by one of our validators: already in words
        return cause
    loc = [str(p) for p in e["loc"] if not (isinstance(p, str) and ("[" in p or p in ("str", "list", "int")))]
    name = loc[0] + "".join(f"[{p}]" if p.isdigit() else f".{p}" for p in loc[1:]) if loc else "body"
    v, kind = e.get("input"), e["type"]
    field = model.model_fields.get(loc[0]) if loc and len(loc) == 1 else None
    if kind == "missing":
        hint = f": {field.description}" if field is not None and field.description else ""
        return BadRequest(f"'{name}' is required{hint}", name)
    if kind in ("int_type", "int_parsing", "int_from_float"):
        return BadRequest(f"'{name}' must be an integer, got {_show(v)}", name)
    if kind in ("float_type", "float_parsing"):
        return BadRequest(f"'{name}' must be a number, got {_show(v)}", name)
    if kind == "finite_number":
        return BadRequest(f"'{name}'={v!r} is not a finite number", name)
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal") and field is not None:
        return out_of_range(name, v, field)
    if kind == "bool_type":
        return BadRequest(f"'{name}' must be true or false, got {_show(v)}", name)
    if kind == "string_unicode":   # a key or a value holding a lone surrogate
        return BadRequest(f"'{name}' is not valid Unicode text (it holds a lone surrogate, which UTF-8 cannot "
                          "encode)", name)
    if kind == "string_type":
        return BadRequest(f"'{name}' must be a string, got {_show(v)}", name)
    if kind == "list_type":
        return BadRequest(f"'{name}' must be a list, got {_show(v)}", name)
    if kind == "model_type" or kind == "dict_type":
        return BadRequest(f"'{name}' must be a JSON object, got {_show(v)}", name)
    return BadRequest(f"'{name}': {e['msg']}, got {_show(v)}", name)


def out_of_range(name: str, v, field, high=None) -> BadRequest:
    """'{name}'={v} is out of range: it must be >= low and <= high (the bounds from the field's metadata)."""
    bounds = []
    for m in field.metadata:
        for attr, sign in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            if getattr(m, attr, None) is not None:
                bounds.append(f"{sign} {getattr(m, attr)}")
    if high is not None:
        bounds.append(f"<= {high}")
    return BadRequest(f"'{name}'={_show(v)} is out of range: it must be {' and '.join(bounds)}", name)


def validate(model: type[BaseModel], body):
    """The decoded JSON body as `model`, or BadRequest."""
    if not isinstance(body, dict):
        raise BadRequest(f"the request body must be a JSON object, got {type(body).__name__}")
    try:
        return model.model_validate(body)
    except ValidationError as e:
        raise explain(e, model) from None


# ----------------------------------------------------------------------------------------------- the rules
def sampling_temperature(temperature: float) -> float:
    """The temperature the sampler uses: 0 (greedy) below SAMPLING_EPS, at least MIN_TEMPERATURE otherwise."""
    if temperature < SAMPLING_EPS:
        return 0.0
    return max(temperature, MIN_TEMPERATURE)


def sampling_params(request: SamplingRequest, ids: list[int], *, model_name: str, max_model_len: int,
                    max_tokens: int | None = None) -> dict:
    """The checks that need the server (the model served, its context length) and the parameters a replica
    gets: {prompt (ids), max_tokens, temperature, top_p, seed}."""
    if request.model is not None and request.model != model_name:
        raise BadRequest(f"model {_show(request.model)} is not served here; this server serves {model_name!r}",
                         "model", status=404, code="model_not_found")
    if not ids:
        raise BadRequest("'prompt' is empty: send at least one token", "prompt")
    max_tokens = max_tokens if max_tokens is not None else request.max_tokens
    max_tokens = max_tokens if max_tokens is not None else max(1, max_model_len - len(ids))   # chat's default
    if max_tokens > max_model_len:
        name = "max_completion_tokens" if getattr(request, "max_completion_tokens", None) else "max_tokens"
        raise out_of_range(name, max_tokens, type(request).model_fields[name], high=max_model_len)
    if len(ids) + max_tokens > max_model_len:
        raise BadRequest(f"this model's maximum context length is {max_model_len} tokens; you requested "
                         f"{len(ids) + max_tokens} tokens ({len(ids)} in the prompt, {max_tokens} for the "
                         "completion). Shorten the prompt or lower max_tokens.",
                         "messages" if isinstance(request, ChatCompletionRequest) else "prompt",
                         code="context_length_exceeded")
    if request.stream_options is not None and not request.stream:
        raise BadRequest("'stream_options' can only be sent with 'stream': true", "stream_options")
    temperature = 1.0 if request.temperature is None else request.temperature
    return {"prompt": ids, "max_tokens": max_tokens, "temperature": sampling_temperature(float(temperature)),
            "top_p": 1.0 if request.top_p is None else float(request.top_p), "seed": request.seed}


def completion_prompt(request: CompletionRequest, *, vocab_size: int, encode) -> list[int]:
    """The prompt's token ids: the text encoded, or the ids checked against the vocabulary."""
    if request.echo:
        raise BadRequest("'echo' is not supported by this server: send 'echo': false", "echo")
    if isinstance(request.prompt, str):
        return encode(check_text(request.prompt, "prompt"))
    bad = [t for t in request.prompt if not 0 <= t < vocab_size]
    if bad:
        raise BadRequest(f"token ids must lie in [0, {vocab_size}); got {bad[:5]}", "prompt")
    return list(request.prompt)


def chat_prompt(request: ChatCompletionRequest, tokenizer) -> str:
    """The conversation as one prompt string, through the chat template the model's tokenizer declares, as vLLM
    applies it: `tokenizer.apply_chat_template(conversation, ...)` in vllm/renderers/hf.py
    `safe_apply_chat_template`, with ChatCompletionRequest's `add_generation_prompt` (default true), so the
    prompt ends with the assistant's turn marker."""
    if request.top_logprobs is not None and not request.logprobs:
        raise BadRequest("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    messages = [{"role": m.role, "content": check_text(m.text(), f"messages[{i}].content")}
                for i, m in enumerate(request.messages)]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def stop_strings(request: SamplingRequest) -> list[str]:
    return [] if request.stop is None else [request.stop] if isinstance(request.stop, str) else list(request.stop)


def schemas() -> dict:
    """The request models as OpenAPI component schemas ({name: JSON schema}), for /openapi.json."""
    out = {}
    for model in (CompletionRequest, ChatCompletionRequest):
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        out.update(schema.pop("$defs", {}))
        out[model.__name__] = schema
    return out

