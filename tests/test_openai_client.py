"""The official `openai` client, unchanged, against the course's server (contiguous, paged and TP=2 replicas):
completions and chat, both streamed, stop strings, n, logprobs, seeds, model listing and the API key. Greedy
results are checked against the model run offline (tiny_llama.generate, a forward pass for logprobs), not
against the server itself."""
import asyncio
import functools
import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch

from helpers.course import tiny_llama
from helpers.course.serving import start_server
from helpers.course.serving.metrics import parse, value
from helpers.course.serving.openai_serving import TextStream
from helpers.course.tokenizer import load_tokenizer

KEY = "test-key-3a1f"
MODEL = "tiny-llama"
CONFIGS = {"contiguous": dict(replicas=1, max_batch=8),
           "paged": dict(replicas=1, max_batch=8, kv_cache="paged", num_blocks=64, block_size=16),
           "tp2": dict(replicas=1, max_batch=8, tp=2)}
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "It was the best of"}]


@pytest.fixture(scope="module")
def model():
    return tiny_llama.load_model()


@pytest.fixture(scope="module")
def chat_ids():
    text = load_tokenizer().apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    return tiny_llama.encode(text)


@pytest.fixture(scope="module")
def servers():
    """The three servers, started side by side (each start is mostly waiting for its replicas)."""
    def start(kind):
        s = start_server(api_key=KEY, **CONFIGS[kind], env={"COURSE_IMPL": "solutions"})
        s.kind = kind
        return s
    with ThreadPoolExecutor(len(CONFIGS)) as pool:
        futures = {kind: pool.submit(start, kind) for kind in CONFIGS}
    try:
        yield {kind: f.result() for kind, f in futures.items()}
    finally:
        for f in futures.values():
            if f.exception() is None:
                f.result().stop()


@pytest.fixture(scope="module", params=list(CONFIGS))
def server(request, servers):
    return servers[request.param]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


@functools.cache
def _generate(ids: tuple, n: int) -> str:
    return tiny_llama.decode(tiny_llama.generate(tiny_llama.load_model(), list(ids), n))


def reference(model, ids, n) -> str:
    """The greedy continuation, computed once per prompt for the three servers."""
    return _generate(tuple(ids), n)


def test_text_stream_holds_back_what_a_stop_string_or_a_character_may_still_need():
    """Streaming text (openai_serving.TextStream): a stop string arriving over several chunks is never sent, in
    part or whole; the bytes of one character are sent together; tokens after the stop string are dropped."""
    ids = tiny_llama.encode("ab é<|user|>zz")
    text = TextStream(tiny_llama.decode, ["<|user|>", "never"])
    sent, kept = [], 0
    for t in ids:
        kept += text.add([t])
        sent.append(text.delta(finished=text.stopped is not None))
        if text.stopped:
            break
    assert "".join(sent) == "ab é" and text.stopped == "<|user|>" and kept == len(tiny_llama.encode("ab é<|user|>"))
    assert all("<" not in s and "\ufffd" not in s for s in sent), sent
    several = TextStream(tiny_llama.decode, ["|u"])
    assert several.add(ids) == len(tiny_llama.encode("ab é<|u")), "the tokens after the stop string are dropped"
    assert several.delta(finished=True) == "ab é<"


def test_completion_and_its_stream_give_the_models_tokens(client, model):
    ids = tiny_llama.encode(tiny_llama.PROMPT)
    want = reference(model, ids, 12)
    reply = client.completions.create(model=MODEL, prompt=tiny_llama.PROMPT, max_tokens=12, temperature=0)
    assert reply.object == "text_completion" and reply.id.startswith("cmpl-")
    assert reply.choices[0].text == want and reply.choices[0].finish_reason == "length"
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(ids), 12)
    chunks = list(client.completions.create(model=MODEL, prompt=tiny_llama.PROMPT, max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert "".join(texts) == want and len(texts) > 1, texts
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    # the last token comes with the finish, as vLLM sends it: a benchmark counts every chunk with choices as a token
    assert texts[-1] != "" and len(texts) <= 12, texts
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert len({c.id for c in chunks}) == 1 and chunks[0].id != reply.id


def test_chat_and_its_stream_use_the_chat_template(client, model, chat_ids):
    want = reference(model, chat_ids, 10)
    reply = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=10, temperature=0)
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")
    assert reply.choices[0].message.role == "assistant" and reply.choices[0].message.content == want
    assert reply.choices[0].finish_reason == "length" and reply.usage.prompt_tokens == len(chat_ids)
    chunks = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=10, temperature=0,
                                                 stream=True))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == "length"


def test_stop_strings_cut_the_text_also_across_streamed_chunks(client, server, model):
    ids = tiny_llama.encode(tiny_llama.PROMPT)
    full = reference(model, ids, 16)
    stop = full[5:8]                      # three characters: three tokens, three streamed chunks
    cut = full.index(stop)
    reply = client.completions.create(model=MODEL, prompt=tiny_llama.PROMPT, max_tokens=16, temperature=0,
                                      stop=["never appears", stop])
    assert reply.choices[0].text == full[:cut] and reply.choices[0].finish_reason == "stop"
    assert reply.usage.completion_tokens == len(tiny_llama.encode(full[:cut + len(stop)]))
    def counts():   # requests in the TTFT and time-per-output-token histograms
        metrics = parse(server.get("/metrics"))
        return [value(metrics, f"serving_{name}_seconds_count") for name in ("time_to_first_token",
                                                                            "time_per_output_token")]
    before = counts()
    chunks = list(client.completions.create(model=MODEL, prompt=tiny_llama.PROMPT, max_tokens=16, temperature=0,
                                            stop=stop, stream=True))
    # a request that ends on a stop string is a finished request (vLLM: FINISHED_STOPPED): both histograms count it
    assert [after - b for after, b in zip(counts(), before)] == [1, 1]
    assert "".join(c.choices[0].text for c in chunks) == full[:cut]
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(stop not in c.choices[0].text for c in chunks)


def test_concurrent_streams_with_the_async_client(server, model):
    """AsyncOpenAI, eight streams at once: each gets its own prompt's tokens (they share the replica's batches)."""
    prompts = ["It was", "We hold these", "A", "The fox and the grapes", "Once upon", "Four score", "To be", "In"]

    async def main():
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)

        async def one(prompt):
            stream = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0,
                                                     stream=True)
            return "".join([chunk.choices[0].text async for chunk in stream])
        async with client:
            return await asyncio.gather(*[one(p) for p in prompts])
    assert asyncio.run(main()) == [reference(model, tiny_llama.encode(p), 6) for p in prompts]


def test_n_choices_and_seeds_as_vllm_derives_them(client):
    def sample(n, seed):
        reply = client.completions.create(model=MODEL, prompt="It was", max_tokens=8, temperature=1.0, n=n,
                                          seed=seed)
        return [c.text for c in sorted(reply.choices, key=lambda c: c.index)]
    three = sample(3, 1234)
    assert len(three) == 3 and sample(3, 1234) == three, "the same seed must give the same choices"
    assert len(set(three)) > 1, three
    assert sample(1, 1235) == three[1:2], "choice i of a seeded request is sampled with seed + i (vLLM's)"


def test_logprobs_are_the_models(client, model):
    ids = tiny_llama.encode(tiny_llama.PROMPT)
    reply = client.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0, logprobs=3)
    out = tiny_llama.generate(model, ids, 6)
    with torch.no_grad():
        logits = model(torch.tensor([ids + out])).logits[0, len(ids) - 1:-1].float()
    want = torch.log_softmax(logits, -1)
    lp = reply.choices[0].logprobs
    assert lp.tokens == [tiny_llama.decode([t]) for t in out]
    assert torch.allclose(torch.tensor(lp.token_logprobs), want[range(6), out], atol=1e-4)
    for step, top in enumerate(lp.top_logprobs):
        best = want[step].topk(3)
        expected = {tiny_llama.decode([int(t)]): float(x) for t, x in zip(best.indices, best.values)}
        assert top.keys() == expected.keys() and all(abs(top[k] - expected[k]) < 1e-4 for k in top), (top, expected)
    chat = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=3, temperature=0,
                                          logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == 3 and all(len(c.top_logprobs) == 2 and c.top_logprobs[0].logprob >= c.logprob - 1e-6
                                     for c in content)


def test_models_and_the_api_key(client, server):
    listed = client.models.list().data
    assert [m.id for m in listed] == [MODEL] and listed[0].owned_by and listed[0].created > 0
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt="x", max_tokens=1)
    assert e.value.code == "model_not_found" and e.value.type == "not_found_error"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="x", max_tokens=1, extra_body={"max_new_tokens": 3})
    assert e.value.param == "max_new_tokens" and "use max_tokens" in e.value.message
    wrong = openai.OpenAI(base_url=server.url + "/v1", api_key="not-the-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    lower = httpx.get(server.url + "/v1/models", headers={"Authorization": f"bearer {KEY}"})
    assert lower.status_code == 200, "the scheme is case-insensitive (RFC 9110)"
    assert httpx.get(server.url + "/health").status_code == 200, "/health needs no key"


def test_a_client_leaving_mid_stream_frees_its_kv_blocks(server):
    if server.kind != "paged":
        pytest.skip("KV blocks are counted by a paged replica")

    def used():
        return server.replicas()[0].get("kv_blocks_used")

    def disconnects():
        return value(parse(server.get("/metrics")), "serving_client_disconnects_total")
    before, tokens_before = disconnects(), server.replicas()[0]["tokens"]
    body = {"model": MODEL, "prompt": "It was", "max_tokens": 240, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as response:
        lines = response.iter_lines()
        deadline = time.monotonic() + 20
        while not used():   # the request holds blocks while it streams
            assert time.monotonic() < deadline, "the request never held a KV block"
            line = next(lines)
            assert not line.startswith("data: [DONE]"), "the request finished before the test could leave"
        assert json.loads(next(line for line in lines if line.startswith("data:"))[5:])["choices"]
    deadline = time.monotonic() + 20   # left: the server cancels the request and the replica frees its blocks
    while used() or disconnects() == before:
        assert time.monotonic() < deadline, f"still {used()} KV blocks used after the client left"
        time.sleep(0.05)
    generated = server.replicas()[0]["tokens"] - tokens_before
    assert generated < 200, f"the replica generated {generated} of the 240 tokens: the request was not cancelled"
