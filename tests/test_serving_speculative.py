"""The server speculating (`--speculative-config`, vLLM's option and field names; config.py, replica.py): greedy
completions through the official `openai` client equal the same server's without speculation, streamed or not, stop
strings included (a step may now emit several tokens of a request); the replicas' spec-decode counters (metrics.py,
vLLM's vllm:spec_decode_* names) equal the offline engine's for the same requests and agree with each other; bad
configurations are refused with the field named."""
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from helpers.course import tiny_llama
from helpers.course.engine import LLMEngine
from helpers.course.serving import start_server
from helpers.course.serving.config import ServeConfig
from helpers.course.serving.metrics import parse, value
from helpers.course.speculative import DraftModelProposer, NgramProposer, generate_speculative

KEY = "test-key-spec"
PAGED = dict(replicas=1, max_batch=8, kv_cache="paged", num_blocks=64, block_size=16)
NGRAM = '{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 2, "prompt_lookup_max": 4}'
DRAFT = '{"method": "draft_model", "model": "helpers/course/data/draft_llama", "num_speculative_tokens": 3}'
# the "counted" servers serve the metrics test alone: their counters start from 0 with its requests (a cancelled
# stream's counts may reach a shared server's /metrics a heartbeat later)
CONFIGS = {"plain": None, "ngram": NGRAM, "draft_model": DRAFT, "counted ngram": NGRAM, "counted draft_model": DRAFT}
PROMPTS = ["It was the best of times, it was the worst of times, it was the", "The Project Gutenberg",
           "I am", "\"What is it?\" said Mr. Lorry. \"What is it?\""]
MAX_TOKENS = 40
COUNTED = [PROMPTS[0], PROMPTS[3]]      # the metrics test's requests (the n-gram rule finds drafts in both)


@pytest.fixture(scope="module")
def servers():
    """A paged server without speculation and two per method, started side by side."""
    def start(kind):
        return start_server(api_key=KEY, speculative_config=CONFIGS[kind], **PAGED, env={"COURSE_IMPL": "solutions"})
    with ThreadPoolExecutor(len(CONFIGS)) as pool:
        futures = {kind: pool.submit(start, kind) for kind in CONFIGS}
    try:
        yield {kind: f.result() for kind, f in futures.items()}
    finally:
        for f in futures.values():
            if f.exception() is None:
                f.result().stop()


def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def complete_all(server, prompts, **options) -> list:
    """Every prompt at once (so that a step holds several requests, some speculating), in order."""
    c = client(server)
    with ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(lambda p: c.completions.create(model="tiny-llama", prompt=p, max_tokens=MAX_TOKENS,
                                                             temperature=0, **options), prompts))


def streamed(server, prompt, **options) -> tuple[str, str, int]:
    """(text, finish_reason, chunks) of a streamed completion."""
    text, finish, chunks = "", None, 0
    for chunk in client(server).completions.create(model="tiny-llama", prompt=prompt, max_tokens=MAX_TOKENS,
                                                   temperature=0, stream=True, **options):
        if chunk.choices:
            text += chunk.choices[0].text
            finish = chunk.choices[0].finish_reason or finish
            chunks += 1
    return text, finish, chunks


@pytest.mark.parametrize("method", ["ngram", "draft_model"])
def test_greedy_completions_equal_the_server_without_speculation(servers, method):
    plain = complete_all(servers["plain"], PROMPTS)
    spec = complete_all(servers[method], PROMPTS)
    for a, b in zip(plain, spec):
        assert b.choices[0].text == a.choices[0].text
        assert b.choices[0].finish_reason == a.choices[0].finish_reason == "length"
        assert b.usage.completion_tokens == a.usage.completion_tokens == MAX_TOKENS
    # and the chat endpoint
    messages = [{"role": "user", "content": PROMPTS[0]}]
    chats = [client(servers[k]).chat.completions.create(model="tiny-llama", messages=messages, max_tokens=MAX_TOKENS,
                                                        temperature=0) for k in ("plain", method)]
    assert chats[1].choices[0].message.content == chats[0].choices[0].message.content


@pytest.mark.parametrize("method", ["ngram", "draft_model"])
def test_streaming_equals_too_with_stop_strings(servers, method):
    """A speculating step sends several tokens of a request in one chunk: the stream still carries the same text,
    and a stop string that falls inside such a chunk still cuts the text where it starts."""
    full = complete_all(servers["plain"], PROMPTS[:1])[0].choices[0].text
    text, finish, chunks = streamed(servers[method], PROMPTS[0])
    assert (text, finish) == (full, "length")
    assert chunks <= MAX_TOKENS
    if method == "draft_model":              # the draft is accepted on this prompt: some chunks carry several tokens
        assert chunks < MAX_TOKENS
    stop = full[len(full) // 2:len(full) // 2 + 3]       # a stop string from the middle of the continuation
    expected = streamed(servers["plain"], PROMPTS[0], stop=[stop])
    got = streamed(servers[method], PROMPTS[0], stop=[stop])
    assert got[:2] == expected[:2] == (full[:full.index(stop)], "stop")


def spec_counters(server) -> dict:
    samples = parse(httpx.get(server.url + "/metrics", timeout=10).text)
    out = {name: value(samples, f"serving_spec_decode_{name}_total", replica=0)
           for name in ("num_drafts", "num_draft_tokens", "num_accepted_tokens")}
    out["per_pos"] = [value(samples, "serving_spec_decode_num_accepted_tokens_per_pos_total", replica=0, position=i)
                      for i in range(3)]
    return out


def offline(method) -> dict:
    """The same requests, one at a time, on the engine in this process: its SpecStats, summed."""
    totals = {"num_drafts": 0, "num_draft_tokens": 0, "num_accepted_tokens": 0, "per_pos": [0, 0, 0], "tokens": 0}
    model = tiny_llama.load_model()
    for prompt in COUNTED:
        proposer = NgramProposer(2, 4, model.config.max_position_embeddings) if method == "ngram" else \
            DraftModelProposer(num_blocks=64)
        engine = LLMEngine.paged(model, num_blocks=64, block_size=16, proposer=proposer, num_speculative_tokens=3)
        generate_speculative(engine, [tiny_llama.encode(prompt)], MAX_TOKENS)
        s = engine.spec_stats
        for name in ("num_drafts", "num_draft_tokens", "num_accepted_tokens"):
            totals[name] += getattr(s, name)
        totals["per_pos"] = [a + b for a, b in zip(totals["per_pos"], s.accepted_per_pos)]
        totals["tokens"] += s.tokens_generated
    return totals


@pytest.mark.parametrize("method", ["ngram", "draft_model"])
def test_spec_decode_metrics_count_drafts_and_acceptances(servers, method):
    server = servers["counted " + method]
    before = spec_counters(server)
    assert before == {"num_drafts": 0, "num_draft_tokens": 0, "num_accepted_tokens": 0, "per_pos": [0, 0, 0]}
    for prompt in COUNTED:                   # one at a time: each alone in the engine, as offline
        complete_all(server, [prompt])
    want = offline(method)
    deadline = time.monotonic() + 30         # the replica's report follows its answer: poll for it
    while True:
        after = spec_counters(server)
        grown = {k: after[k] - before[k] for k in ("num_drafts", "num_draft_tokens", "num_accepted_tokens")}
        grown["per_pos"] = [a - b for a, b in zip(after["per_pos"], before["per_pos"])]
        if grown["num_drafts"] >= want["num_drafts"] or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert grown == {k: want[k] for k in grown}, (grown, want)
    assert want["num_drafts"] > 0 and want["num_accepted_tokens"] > 0      # it did speculate, and gain
    assert grown["num_accepted_tokens"] <= grown["num_draft_tokens"] <= 3 * grown["num_drafts"]
    assert sum(grown["per_pos"]) == grown["num_accepted_tokens"]
    assert grown["per_pos"] == sorted(grown["per_pos"], reverse=True)   # position i accepted only after 0 .. i-1
    # every token comes from a forward of the target: one per verification plus the accepted drafts, and one per
    # plain step (at least the first token of each request, from its prompt)
    plain_steps = len(COUNTED) * MAX_TOKENS - grown["num_drafts"] - grown["num_accepted_tokens"]
    assert plain_steps >= len(COUNTED)
    if method == "draft_model":              # a draft model proposes at every decode step but a request's last
        assert plain_steps <= 2 * len(COUNTED)
    assert want["tokens"] == len(COUNTED) * MAX_TOKENS


def test_sampled_requests_with_a_seed_repeat(servers):
    """Sampling under speculation (exercise 10.1's rejection sampler, the draft's q): the request's seed fixes it."""
    for method in ("ngram", "draft_model"):
        texts = [client(servers[method]).completions.create(model="tiny-llama", prompt=PROMPTS[0], max_tokens=20,
                                                            temperature=0.8, seed=7).choices[0].text
                 for _ in range(2)]
        assert texts[0] == texts[1] and texts[0]


def test_tensor_parallel_replica_speculates_alike(servers):
    """--tp 2: each rank runs its own proposer on the same tokens, so the ranks verify in lockstep; greedy text is
    the plain server's."""
    server = start_server(api_key=KEY, speculative_config=NGRAM, **{**PAGED, "tp": 2}, env={"COURSE_IMPL": "solutions"})
    try:
        got = [r.choices[0].text for r in complete_all(server, PROMPTS)]
        deadline = time.monotonic() + 30     # the replica's report follows its answers: poll for it
        while (counters := spec_counters(server))["num_drafts"] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        server.stop()
    assert got == [r.choices[0].text for r in complete_all(servers["plain"], PROMPTS)]
    assert 0 < counters["num_accepted_tokens"] <= counters["num_draft_tokens"]


def test_requests_speculation_cannot_serve_are_refused_with_400(servers):
    with pytest.raises(openai.BadRequestError, match="logprobs"):
        client(servers["ngram"]).completions.create(model="tiny-llama", prompt="It was", max_tokens=4, logprobs=2)
    assert client(servers["plain"]).completions.create(model="tiny-llama", prompt="It was", max_tokens=4,
                                                       logprobs=2).choices[0].logprobs is not None


@pytest.mark.parametrize("options, words", [
    (dict(speculative_config=NGRAM), "--kv-cache paged"),
    (dict(speculative_config=NGRAM, kv_cache="paged", pipeline_parallel_size=2), "--pp"),
    (dict(speculative_config='{"method": "eagle", "num_speculative_tokens": 2}', kv_cache="paged"), "method 'eagle'"),
    (dict(speculative_config='{"method": "ngram"}', kv_cache="paged"), "num_speculative_tokens"),
    (dict(speculative_config='{"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 4, '
                             '"prompt_lookup_max": 2}', kv_cache="paged"), "prompt_lookup_min=4"),
    (dict(speculative_config='{"method": "ngram", "num_speculative_tokens": 2, "draft_tensor_parallel_size": 1}',
          kv_cache="paged"), "draft_tensor_parallel_size"),
    (dict(speculative_config='{"method": "draft_model", "num_speculative_tokens": 2}', kv_cache="paged"), "model"),
    (dict(speculative_config='{"model": "no/such/dir", "num_speculative_tokens": 2}', kv_cache="paged"),
     "no/such/dir"),
    (dict(speculative_config="{method: ngram}", kv_cache="paged"), "not JSON"),
])
def test_bad_speculative_configs_are_refused_naming_the_field(options, words):
    with pytest.raises(ValueError, match="--speculative-config") as refused:
        ServeConfig(**options)
    assert words in str(refused.value)


def test_vllm_spellings_and_defaults():
    """vLLM's parsing (arg_utils.py: json.loads, "-" -> "_" in keys) and defaults (SpeculativeConfig.__post_init__:
    method from model, prompt lookup 5..5, one bound copied to the other); the option round-trips the command line."""
    config = ServeConfig.from_argv(["--kv-cache", "paged", "-sc", '{"model": "ngram", "num-speculative-tokens": 2}'])
    spec = config.speculative()
    assert (spec["method"], spec["prompt_lookup_min"], spec["prompt_lookup_max"]) == ("ngram", 5, 5)
    one = ServeConfig(kv_cache="paged", speculative_config='{"method": "ngram", "num_speculative_tokens": 2, '
                                                           '"prompt_lookup_max": 3}').speculative()
    assert (one["prompt_lookup_min"], one["prompt_lookup_max"]) == (3, 3)
    assert ServeConfig.from_argv(config.to_argv()) == config
    assert ServeConfig(kv_cache="paged", speculative_config=DRAFT).speculative()["method"] == "draft_model"


def test_a_draft_of_another_vocabulary_is_refused_at_startup(tmp_path):
    """The check that needs the target's config (ServeConfig.check_model, run by the server before it starts)."""
    (tmp_path / "config.json").write_text('{"vocab_size": 7}')
    (tmp_path / "model.safetensors").write_bytes(b"")
    config = ServeConfig(kv_cache="paged", speculative_config='{"method": "draft_model", "model": "%s", '
                                                              '"num_speculative_tokens": 2}' % tmp_path)
    with pytest.raises(SystemExit, match="vocabulary of 7 tokens"):
        config.check_model(tiny_llama.CONFIG)
    ServeConfig(kv_cache="paged", speculative_config=DRAFT).check_model(tiny_llama.CONFIG)   # the course's draft fits
