"""The course's engine (helpers/course/engine) against issue 19's "Done when": vLLM V1's scheduling rules on random
workloads (checked by an independent re-derivation of each step, written here), the model's tokens through every
runner and setting, prefix caching across concurrent prefills and conversation turns, vLLM's hit metric under
preemption, KV events, a KV connector, look-ahead slots and failure isolation. Runs with the reference answers
(COURSE_IMPL=solutions) of exercises 7.1, 7.3 and 7.4, which the engine calls."""
import hashlib
import pickle
import random
from collections import Counter

import pytest
import torch

from helpers.course import tiny_llama
from helpers.course.engine import (AllBlocksCleared, BlockRemoved, BlockStored, KVCacheManager, KVConnector,
                                   KVEventLog, LLMEngine, ModelledClock, ModelledRunner, Request, RequestStatus,
                                   SchedulerConfig, run_requests, sample)


pytestmark = pytest.mark.usefixtures("one_torch_thread")   # tests/conftest.py


@pytest.fixture(scope="module")
def model():
    return tiny_llama.load_model()


def blocks(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


# ---------------------------------------------------------------------------------------------- KV event replay
def chain_hash(parent, tokens, extra=None) -> bytes:
    """The block hash, written out here: vLLM's scheme, SHA-256 of the pickled (parent hash, block tokens, extra
    keys), with the course's first parent (32 zero bytes; vLLM 0.32's is sha256 of "vllm-none-hash")."""
    data = pickle.dumps((parent if parent is not None else bytes(32), tuple(int(t) for t in tokens), extra),
                        protocol=pickle.HIGHEST_PROTOCOL)
    return hashlib.sha256(data).digest()


class CacheReplay:
    """The prefix cache as a router would know it: KV events replayed. cached: {hash: the token prefix up to and
    including its block}; prefixes: {token prefix: hash} for the cached ones."""

    def __init__(self, salts=()):
        self.known, self.cached, self.removed, self.extras = {}, {}, 0, [None] + [(salt,) for salt in salts]

    def apply(self, events) -> None:
        for event in events:
            if isinstance(event, BlockStored):
                size = event.block_size
                assert len(event.token_ids) == size * len(event.block_hashes)
                if event.parent_block_hash is None:
                    prefix, parent = (), None
                else:
                    assert event.parent_block_hash in self.known, "BlockStored names a parent never stored"
                    prefix, parent = self.known[event.parent_block_hash], event.parent_block_hash
                for i, h in enumerate(event.block_hashes):
                    tokens = tuple(event.token_ids[i * size:(i + 1) * size])
                    extras = self.extras if parent is None else [None]    # a salt enters the first block only
                    assert any(h == chain_hash(parent, tokens, extra) for extra in extras), \
                        "a stored block's hash is not SHA-256 over (parent hash, its tokens, extra keys)"
                    prefix, parent = prefix + tokens, h
                    self.known[h] = prefix
                    assert h not in self.cached, "a hash stored twice without being removed"
                    self.cached[h] = prefix
            elif isinstance(event, BlockRemoved):
                for h in event.block_hashes:
                    assert h in self.cached, "BlockRemoved for a hash not in the cache"
                    del self.cached[h]
                    self.removed += 1
            elif isinstance(event, AllBlocksCleared):
                self.cached.clear()

    @property
    def prefixes(self) -> dict:
        return {prefix: h for h, prefix in self.cached.items()}

    def hits(self, tokens, block_size: int, prefixes=None) -> int:
        """Tokens of the longest cached full-block prefix of `tokens`, never the last token."""
        prefixes = self.prefixes if prefixes is None else prefixes
        n = 0
        while n + block_size <= len(tokens) - 1 and tuple(tokens[:n + block_size]) in prefixes:
            n += block_size
        return n


# ---------------------------------------------------------------------------------------------- V1 rules checker
class V1Checker:
    """Re-derives every step of the engine's scheduler from vLLM V1's rules and the state before the step, and
    compares: which requests get how many tokens in which order, who is preempted, who is admitted, and the free
    blocks after. Written from vLLM's scheduler.py / kv_cache_manager.py, not from the course's code."""

    def __init__(self, engine, kv, config, log):
        self.engine, self.kv, self.config, self.log = engine, kv, config, log
        self.replay = CacheReplay()
        self.steps = self.preemptions = self.admissions_with_hits = self.cuts = self.concurrent_prefills = 0
        schedule = engine.scheduler.schedule

        def checked(*args, **kwargs):
            before = self.snapshot()
            output = schedule(*args, **kwargs)
            self.check(before, output)
            return output
        engine.scheduler.schedule = checked

    def snapshot(self) -> dict:
        sched, manager = self.engine.scheduler, self.kv.block_manager
        self.replay.apply(self.log.take())
        return {"running": [(r, r.num_computed_tokens, r.num_tokens, list(manager.block_table(r.rid)))
                            for r in sched.running],
                "waiting": list(sched.waiting), "free": self.kv.num_free_blocks,
                "prefixes": self.replay.prefixes, "removed": self.replay.removed}

    def check(self, before: dict, output) -> None:
        config, bs, manager = self.config, self.kv.block_size, self.kv.block_manager
        self.replay.apply(self.log.take())
        evicted_in_step = self.replay.removed > before["removed"]
        running = [r for r, *_ in before["running"]]
        computed = {r.rid: c for r, c, _, _ in before["running"]}
        tables = {r.rid: list(t) for r, _, _, t in before["running"]}
        refs = Counter(b for t in tables.values() for b in t)
        eligible = len(running) + len(before["waiting"])
        threshold = config.long_prefill_token_threshold if eligible > 1 else 0   # alone, it starves no one
        budget, free = config.max_num_batched_tokens, before["free"]

        def share(n: int) -> int:
            return min(threshold if 0 < threshold < n else n, budget)

        expected, preempted, admitted = {}, [], []
        where = f"step {self.steps} (running {[r.rid for r in running]})"
        index = 0
        while index < len(running) and budget > 0:                   # 1. running, in admission order
            request = running[index]
            n = share(request.num_tokens - computed[request.rid])
            need = max(0, blocks(computed[request.rid] + n, bs) - len(tables[request.rid]))
            scheduled = True
            while need > free:                                       # the newest running request is preempted
                victim = running.pop()
                preempted.append(victim.rid)
                free += sum(1 for b in tables[victim.rid] if refs[b] == 1)
                refs.subtract(tables.pop(victim.rid))
                if victim is request:
                    scheduled = False
                    break
            if not scheduled:
                break
            new = manager.block_table(request.rid)[len(tables[request.rid]):]    # the blocks it got, by id
            assert len(new) == need, f"request {request.rid} got {len(new)} new blocks, it needs {need}"
            tables[request.rid] += new
            refs.update(new)
            free -= need
            expected[request.rid] = n
            budget -= n
            index += 1
        waiting = list(before["waiting"])
        while not preempted and waiting and budget > 0 and len(running) < config.max_num_seqs:   # 2. waiting
            request = waiting[0]
            if request in output.admitted:
                hits = request.num_computed_tokens              # set at admission; the engine adds the step later
                held = manager.block_table(request.rid)[:hits // bs]
            else:                                                # the head that stopped admissions: the cache now
                hits = self.replay.hits(request.all_token_ids, bs) if self.kv.enable_caching else 0
                held = [manager.cached[self.replay.prefixes[tuple(request.all_token_ids[:(i + 1) * bs])]]
                        for i in range(hits // bs)]
            if not config.enable_chunked_prefill and \
                    min(request.num_tokens - hits, threshold or request.num_tokens) > budget:
                break                                            # without chunked prefill a prompt is not split
            n = share(request.num_tokens - hits)
            evictable_hits = sum(1 for b in held if refs[b] == 0)    # cached blocks no one holds count as free
            new = blocks(hits + n, bs) - hits // bs
            if config.full_sequence_must_fit and \
                    blocks(request.num_tokens, bs) - hits // bs + evictable_hits > free:
                break
            if new + evictable_hits > free:
                break
            assert request in output.admitted, f"{where}: V1 admits request {request.rid} ({hits} hits, {n} tokens)"
            waiting.pop(0)
            admitted.append((request.rid, hits))
            refs.update(held)
            tables[request.rid] = list(manager.block_table(request.rid))
            assert len(tables[request.rid]) == len(held) + new
            refs.update(tables[request.rid][len(held):])
            free -= new + evictable_hits
            running.append(request)
            expected[request.rid] = n
            budget -= n

        got = list(output.num_scheduled_tokens.items())
        assert got == list(expected.items()), f"{where}: scheduled {got}, V1 schedules {list(expected.items())}"
        assert [r.rid for r in output.preempted] == preempted, f"{where}: preempted {output.preempted}, V1 {preempted}"
        assert [(r.rid, r.num_computed_tokens) for r in output.admitted] == admitted, f"{where}: admitted"
        assert self.kv.num_free_blocks == free, f"{where}: {self.kv.num_free_blocks} free blocks, V1 leaves {free}"
        queue = [r.rid for r in self.engine.scheduler.waiting]
        rest = [r.rid for r in before["waiting"] if r not in output.admitted]
        assert queue == preempted[::-1] + rest, f"{where}: waiting {queue}; V1: the preempted at the head, {rest}"
        for request in output.preempted:                             # blocks freed, computed reset, tokens kept
            assert request.num_computed_tokens == 0 and request.status == RequestStatus.PREEMPTED
            assert request.rid not in manager.tables and request.num_tokens == dict(
                (r.rid, n) for r, _, n, _ in before["running"])[request.rid]

        # The same rules, stated one by one (the re-derivation above implies them; these say which one broke).
        total = output.total_num_scheduled_tokens
        assert total <= config.max_num_batched_tokens, f"{where}: {total} tokens, over the budget"
        rids = [rid for rid, _ in got]
        old = [r.rid for r, *_ in before["running"]]
        n_running = sum(1 for rid in rids if rid in old)
        assert rids[:n_running] == [rid for rid in old if rid in rids], "running requests not first, in order"
        assert all(rid not in old for rid in rids[n_running:]), "a running request scheduled after an admission"
        assert not (output.preempted and output.admitted), "a request admitted in a step that preempted"
        assert [r.rid for r in output.preempted] == old[::-1][:len(output.preempted)], "not the newest preempted"
        assert len(self.engine.scheduler.running) <= config.max_num_seqs
        full = {r.rid: min(r.num_tokens - r.num_computed_tokens, threshold or r.num_tokens)
                for r in self.engine.scheduler.running}           # what each would get with budget to spare
        cut = [rid for rid, n in got if n < full[rid]]
        assert len(cut) <= 1 and (not cut or (cut[0] == rids[-1] and total == config.max_num_batched_tokens)), \
            f"{where}: requests cut by the budget: {cut}"
        for request in self.engine.scheduler.running:                # each holds exactly the blocks of its tokens
            if request.rid in output.num_scheduled_tokens:
                end = request.num_computed_tokens + output.num_scheduled_tokens[request.rid]
                assert len(manager.block_table(request.rid)) == blocks(end, bs)
        for rid, hits in admitted:                                   # hits: cached full blocks, never the last token
            request = next(r for r in output.admitted if r.rid == rid)
            assert hits % bs == 0 and hits <= request.num_tokens - 1
            if not self.kv.enable_caching:
                assert hits == 0
            else:
                assert self.replay.hits(request.all_token_ids[:hits + 1], bs) == hits, "a hit that is not cached"
                if not evicted_in_step:                               # the longest cached prefix before the step
                    assert hits >= self.replay.hits(request.all_token_ids, bs, before["prefixes"]), \
                        f"{where}: request {rid} hit {hits} tokens; more were cached"
                self.admissions_with_hits += hits > 0
        self.preemptions += len(output.preempted)
        self.cuts += len(cut)
        self.concurrent_prefills += sum(1 for _, n in got if n > 1) > 1
        self.steps += 1


def random_workload(seed: int):
    rng = random.Random(seed)
    block_size = rng.choice([4, 8, 16])
    prefixes = [[rng.randrange(1, 256) for _ in range(rng.randint(4, 40))] for _ in range(2)]
    requests = []
    for i in range(rng.randint(2, 8)):
        own = [rng.randrange(1, 256) for _ in range(rng.randint(1, 32))]
        prompt = rng.choice(prefixes) + own if rng.random() < 0.6 else own
        requests.append((i, prompt, rng.randint(1, 24), rng.choice([0, 0, rng.randint(0, 10)])))
    largest = max(blocks(len(p) + m, block_size) for _, p, m, _ in requests)
    seqs = rng.randint(1, 6)
    budget, threshold = rng.randint(max(seqs, 4), 64), rng.choice([0, 0, rng.randint(2, 24)])
    num_blocks, caching = largest + rng.randint(0, 2 * largest), rng.random() < 0.5
    chunked = rng.random() < 0.8
    if not chunked:              # whole prompts (and recomputations) must fit a step, as vLLM requires
        budget = max(budget, max(len(p) + m for _, p, m, _ in requests))
    config = SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=seqs, long_prefill_token_threshold=threshold,
                             enable_chunked_prefill=chunked)
    return block_size, num_blocks, caching, config, requests


@pytest.mark.parametrize("seed", range(80))
def test_the_scheduler_follows_vllm_v1_rules_on_random_workloads(seed):
    block_size, num_blocks, caching, config, specs = random_workload(seed)
    log = KVEventLog()
    kv = KVCacheManager(num_blocks, block_size, enable_caching=caching, events=log)
    engine = LLMEngine.modelled(kv=kv, config=config)
    checker = V1Checker(engine, kv, config, log)
    requests = {i: Request(i, prompt, max_tokens, arrival=t) for i, prompt, max_tokens, t in specs}
    pending = sorted(requests.values(), key=lambda r: -r.arrival)
    for t in range(5000):
        while pending and pending[-1].arrival <= t:
            engine.add_request(pending.pop())
        if not engine.has_unfinished:
            if not pending:
                break
            continue
        engine.step()
        assert not engine.take_failed()
    else:
        raise AssertionError("the engine did not finish")
    for request in requests.values():
        assert request.status == RequestStatus.FINISHED and len(request.tokens) == request.max_tokens
    assert kv.num_free_blocks == num_blocks and not kv.block_manager.tables, "blocks still held at the end"
    assert checker.steps == len(engine.steps)


def test_the_random_workloads_preempt_chunk_and_hit():
    """The workloads above exercise what they check: preemptions, prefix hits, budget cuts, several prompts part-way
    through prefill in one step."""
    preemptions = hits = cuts = concurrent = 0
    for seed in range(0, 80, 4):
        block_size, num_blocks, caching, config, specs = random_workload(seed)
        log = KVEventLog()
        kv = KVCacheManager(num_blocks, block_size, enable_caching=caching, events=log)
        engine = LLMEngine.modelled(kv=kv, config=config)
        checker = V1Checker(engine, kv, config, log)
        run_requests(engine, [Request(i, p, m, arrival=0.0) for i, p, m, _ in specs])
        preemptions += checker.preemptions
        hits += checker.admissions_with_hits
        cuts += checker.cuts
        concurrent += checker.concurrent_prefills
    assert preemptions > 5 and hits > 5 and cuts > 5 and concurrent > 5, (preemptions, hits, cuts, concurrent)


# ---------------------------------------------------------------------------------------------- the model's tokens
SYSTEM = tiny_llama.encode("Four score and seven years ago our fathers brought forth ")
QUESTIONS = ["on this continent", "a new nation", "conceived in Liberty, and", "dedicated"]


@torch.no_grad()
def reference(model, prompt, max_tokens, temperature=0.0, top_p=1.0, seed=None):
    """Greedy: tiny_llama.generate (transformers' cache). Sampled: the whole sequence recomputed every token,
    sampled with a generator seeded as the request's."""
    if temperature == 0:
        return tiny_llama.generate(model, prompt, max_tokens)
    generator, ids = torch.Generator().manual_seed(seed), list(prompt)
    for _ in range(max_tokens):
        ids.append(sample(model(torch.tensor([ids])).logits[0, -1], temperature, top_p, generator))
    return ids[len(prompt):]


def serve(engine, temperature):
    requests = [Request(i, SYSTEM + tiny_llama.encode(q), 10 + i, temperature=temperature, top_p=0.9,
                        seed=100 + i, arrival=0.0) for i, q in enumerate(QUESTIONS)]
    run_requests(engine, requests)
    return {r.rid: r.tokens for r in requests}


ENGINES = {
    "contiguous": lambda m: LLMEngine.contiguous(m),
    "paged, whole prompts": lambda m: LLMEngine.paged(m, num_blocks=64, block_size=16),
    "paged, budget 8": lambda m: LLMEngine.paged(m, num_blocks=64, block_size=16,
                                                 config=SchedulerConfig(max_num_batched_tokens=8)),
    "paged, budget 16, prefix caching": lambda m: LLMEngine.paged(
        m, num_blocks=64, block_size=8, enable_prefix_caching=True, config=SchedulerConfig(max_num_batched_tokens=16)),
    "paged, 12 blocks of 8 (preempts), prefix caching": lambda m: LLMEngine.paged(
        m, num_blocks=12, block_size=8, enable_prefix_caching=True, config=SchedulerConfig(max_num_batched_tokens=16)),
    "paged, 20 blocks of 8 (preempts)": lambda m: LLMEngine.paged(m, num_blocks=20, block_size=8),
}


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_every_engine_gives_the_models_tokens(model, temperature):
    want = {i: reference(model, SYSTEM + tiny_llama.encode(q), 10 + i, temperature, 0.9, 100 + i)
            for i, q in enumerate(QUESTIONS)}
    for name, build in ENGINES.items():
        engine = build(model)
        assert serve(engine, temperature) == want, f"{name}: other tokens than the model's"
        if "preempts" in name:
            assert engine.scheduler.num_preemptions > 0, f"{name}: expected a preemption"
        if "prefix caching" in name:
            assert engine.kv.stats.hits > 0, f"{name}: the shared system prompt should hit"
        if hasattr(engine.kv, "block_manager"):
            assert engine.kv.num_free_blocks == engine.kv.num_blocks


def test_two_prompts_prefill_at_once_with_prefix_caching(model):
    """Both prompts part-way through prefill in the same step; the second hits the blocks the first is computing."""
    engine = LLMEngine.paged(model, num_blocks=64, block_size=8, enable_prefix_caching=True,
                             config=SchedulerConfig(max_num_batched_tokens=24, long_prefill_token_threshold=12))
    prompts = [SYSTEM + tiny_llama.encode(q) for q in QUESTIONS[:2]]
    requests = [Request(i, p, 8, arrival=0.0) for i, p in enumerate(prompts)]
    run_requests(engine, requests)
    assert any({rid for rid, _ in s.chunks} == {0, 1} for s in engine.steps), "no step computed both prompts"
    assert requests[1].num_cached_tokens > 0, "the second prompt should hit the first's blocks"
    for request, prompt in zip(requests, prompts):
        assert request.tokens == reference(model, prompt, 8)


def test_a_follow_up_turn_hits_the_previous_answers_blocks(model):
    bs = 8
    engine = LLMEngine.paged(model, num_blocks=64, block_size=bs, enable_prefix_caching=True)
    first = Request("turn 1", SYSTEM + tiny_llama.encode(QUESTIONS[0]), 24, arrival=0.0)
    run_requests(engine, [first])
    prompt = first.prompt + first.tokens + tiny_llama.encode(" and so")
    second = Request("turn 2", prompt, 8, arrival=0.0)
    run_requests(engine, [second])
    computed = len(first.prompt) + len(first.tokens) - 1          # the last answer token was never computed
    assert second.num_cached_tokens == computed // bs * bs > len(first.prompt) // bs * bs
    assert second.tokens == reference(model, prompt, 8)


def test_the_exported_hit_metric_is_vllms_under_preemption(model):
    """Issue 19's repro: 3 prompts sharing a 58-token system prompt, 12 blocks of 16, 40 new tokens each, one
    preemption. vLLM counts one lookup per admission (queries = the request's tokens then, hits = its cached
    tokens) and keeps a preempted request's re-admission apart; the issue gives 201 queries / 96 hits."""
    system = tiny_llama.encode("We hold these truths to be self-evident, that all men are ")[:58]
    assert len(system) == 58
    prompts = [system + tiny_llama.encode(s) for s in (" created ", " endowed ", " equal by")]   # 67 tokens each
    engine = LLMEngine.paged(model, num_blocks=12, block_size=16, enable_prefix_caching=True)
    admissions = []
    schedule = engine.scheduler.schedule

    def recording(*args, **kwargs):
        output = schedule(*args, **kwargs)
        admissions.extend((r.rid, r.num_tokens, r.num_computed_tokens, r.num_preemptions > 0)
                          for r in output.admitted)
        return output
    engine.scheduler.schedule = recording
    requests = [Request(i, p, 40, arrival=0.0) for i, p in enumerate(prompts)]
    run_requests(engine, requests)
    assert engine.scheduler.num_preemptions >= 1
    first = [a for a in admissions if not a[3]]
    again = [a for a in admissions if a[3]]
    assert sorted(rid for rid, *_ in first) == [0, 1, 2] and again
    # The expectation from the requests alone: a first admission looks up its prompt; the first request misses,
    # the others find the system prompt's full blocks (58 // 16 = 3 blocks).
    queries = sum(len(p) for p in prompts)
    hits = 2 * (58 // 16 * 16)
    stats = engine.kv_stats()
    assert (stats["prefix_queries"], stats["prefix_hits"]) == (queries, hits) == (201, 96)
    assert [r.num_cached_tokens for r in requests] == [0, 48, 48]
    assert engine.kv.stats.preempted_queries == sum(n for _, n, _, _ in again)
    assert engine.kv.stats.preempted_hits == sum(h for _, _, h, _ in again)
    for request, prompt in zip(requests, prompts):
        assert request.tokens == reference(model, prompt, 40)


def test_kv_events_mirror_the_prefix_cache():
    """Every block stored in or removed from the cache is an event; replayed, they give the manager's cache after
    every step; hashes chain (parent, tokens, salt); reset_prefix_cache sends AllBlocksCleared."""
    rng = random.Random(5)
    shared = [rng.randrange(256) for _ in range(21)]
    prompts = [shared + [rng.randrange(256) for _ in range(rng.randint(1, 15))] for _ in range(8)]
    log = KVEventLog()
    kv = KVCacheManager(14, 4, enable_caching=True, events=log)
    engine = LLMEngine.modelled(kv=kv, config=SchedulerConfig(max_num_batched_tokens=12, max_num_seqs=3))
    for i, p in enumerate(prompts):
        engine.add_request(Request(i, p, rng.randint(2, 12), cache_salt="tenant b" if i == 3 else None))
    replay = CacheReplay(salts=["tenant b"])
    while engine.has_unfinished:
        engine.step()
        replay.apply(log.take())
        assert set(replay.cached) == set(kv.block_manager.cached)
    assert replay.removed > 0 and engine.scheduler.num_preemptions > 0
    assert kv.reset_prefix_cache()
    events = log.take()
    assert isinstance(events[-1], AllBlocksCleared)
    replay.apply(events)
    assert not replay.cached and not kv.block_manager.cached and kv.num_free_blocks == 14


def test_a_connector_that_supplies_tokens_is_honoured(model):
    """A connector holding the KV of a prefix computed by another engine: those tokens are loaded, not computed,
    and the tokens are still the model's."""
    layers, want = model.config.num_hidden_layers, 37

    class PrefixStore(KVConnector):
        def __init__(self):
            self.tokens, self.kv, self.loads = None, None, []

        def save(self, request, num_computed_tokens, read):
            if self.kv is None and read is not None and num_computed_tokens >= want:
                self.tokens = request.all_token_ids[:want]
                self.kv = [read(layer, 0, want) for layer in range(layers)]

        def get_num_new_matched_tokens(self, request, num_computed_tokens):
            if self.kv is not None and request.all_token_ids[:want] == self.tokens:
                return want - num_computed_tokens
            return 0

        def load(self, request, start, count, write):
            self.loads.append((request.rid, start, count))
            for layer, (k, v) in enumerate(self.kv):
                write(layer, k[start:start + count], v[start:start + count])

    store = PrefixStore()
    producer = LLMEngine.paged(model, num_blocks=32, block_size=16, connector=store)
    run_requests(producer, [Request("a", SYSTEM + tiny_llama.encode(QUESTIONS[0]), 2, arrival=0.0)])
    assert store.kv is not None
    prompt = SYSTEM + tiny_llama.encode(QUESTIONS[1])
    assert prompt[:want] == store.tokens
    consumer = LLMEngine.paged(model, num_blocks=32, block_size=16, enable_prefix_caching=True, connector=store)
    request = Request("b", prompt, 12, arrival=0.0)
    run_requests(consumer, [request])
    assert store.loads == [("b", 0, want)]
    assert consumer.steps[0].chunks == (("b", len(prompt) - want),), "the supplied tokens were computed again"
    stats = consumer.kv_stats()       # vLLM's prefix-cache metric counts local hits only, not a connector's
    assert (stats["prefix_queries"], stats["prefix_hits"]) == (len(prompt), 0)
    assert request.tokens == reference(model, prompt, 12)


def test_lookahead_slots_are_reserved_and_rolled_back():
    k, bs = 3, 4
    kv = KVCacheManager(32, bs)
    engine = LLMEngine.modelled(kv=kv, config=SchedulerConfig(num_lookahead_tokens=k))
    request = Request(0, list(range(1, 11)), 6)
    engine.add_request(request)
    engine.step()                                    # the prompt (admitted: no look-ahead in the course's 7.4)
    before = request.num_computed_tokens
    engine.step()                                    # a decode: its token's slot + k look-ahead slots
    manager = kv.block_manager
    assert manager.seq_len(0) == before + 1 + k
    assert len(manager.block_table(0)) == blocks(before + 1 + k, bs)
    free = kv.num_free_blocks
    kv.rollback(request, request.num_computed_tokens)  # every speculative token rejected
    assert manager.seq_len(0) == request.num_computed_tokens
    assert len(manager.block_table(0)) == blocks(request.num_computed_tokens, bs)
    assert kv.num_free_blocks == free + blocks(before + 1 + k, bs) - blocks(request.num_computed_tokens, bs) > free
    while engine.has_unfinished:
        engine.step()
    assert len(request.tokens) == 6 and kv.num_free_blocks == 32


def test_a_runner_failing_for_one_request_fails_only_that_request():
    class Flaky(ModelledRunner):
        def execute(self, output, kv):
            if any(r.rid == "bad" and r.num_computed_tokens > 0 for r in output.scheduled):
                raise RuntimeError("boom")
            return super().execute(output, kv)

    kv = KVCacheManager(32, 4, enable_caching=True)
    engine = LLMEngine(Flaky(), kv, SchedulerConfig(max_num_batched_tokens=8), clock=ModelledClock())
    requests = [Request(rid, list(range(1, 9)), 5) for rid in ("a", "bad", "c")]
    for request in requests:
        engine.add_request(request)
    failed = []
    while engine.has_unfinished:
        engine.step()
        failed += engine.take_failed()
    assert [r.rid for r in failed] == ["bad"] and "boom" in failed[0].error
    assert failed[0].status == RequestStatus.FAILED
    for request in requests:
        if request.rid != "bad":
            assert request.status == RequestStatus.FINISHED and len(request.tokens) == 5
    assert kv.num_free_blocks == 32 and not kv.block_manager.tables


def test_the_vllm_scheduler_checks_course_side_runs():
    """`make vllm-scheduler-check` (not part of make test: it needs .venv-vllm) drives the engine as here; its
    course side must keep running as the engine changes."""
    from helpers import vllm_scheduler_check
    workloads = vllm_scheduler_check.make_workloads(3)
    for caching in (False, True):
        for workload in workloads:
            trace = vllm_scheduler_check.run_course(workload, caching)
            assert trace["steps"] and trace["steps"][-1]["free"] == workload["num_blocks"]
