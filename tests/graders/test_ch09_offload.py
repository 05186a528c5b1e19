"""Graders for chapter 9's KV offload tier (labs/kv_offload.py): exercise 9.3, `OffloadingConnector`'s decisions —
`get_num_new_matched_tokens` (what a new request loads from the host tier) and `blocks_to_save` (what goes there).

The learner's connector runs only inside launched ranks (helpers.launch), never in the grading process. It gets
the grader's own block hashes (a SHA-256 chain written here, the same shape as exercise 7.3's, so grading 9.3 needs
no 7.3) and a HostTierClient (helpers/course/kv_offload.py) the grader fills and reads. The engine run borrows
chapter 7's grader pieces (tests/graders/test_ch07_chunked_prefill.py: its block manager, paged attention and
scheduler step), so it needs none of the learner's 7.1-7.4 either. Each check returns a list of failures;
tests/graders/planted_ch09_offload.py runs the same checks on wrong answers planted in the reference and on valid
answers written differently.

What the graders check:
  MATCH (get_num_new_matched_tokens, block_size 4, a tier in the rank's memory): which blocks count — the
      longest run of the request's block hashes the tier holds, starting right after its local hits (8 local
      tokens and 4 tier blocks: 8 more, not 16), in TOKENS; a run that breaks midway (block 2 missing) stops
      there; a tier holding blocks 1.. but not block 0 matches 0; a request of exactly 4 full blocks loads 3
      (never the block holding its last token) while one of 17 tokens loads 4; a re-admitted request whose
      generated tokens fill blocks counts them (num_tokens, not the prompt); local hits past what the tier
      holds: 0; a lookup moves no bytes and loads nothing.
  SAVE (blocks_to_save through TierConnector.save, a grader pool behind `read`): after 10 of 18 tokens are
      computed, blocks 0 and 1 are sent (never the partial block 2, never a block past the computed tokens even
      when the request's last sampled token fills it); after 18, only 2 and 3 (each hash once); a step that
      completes no block sends nothing; a second request sharing two blocks sends only its own; what the tier
      holds equals the pool's K and V bit for bit; KV bytes on the client and in the tier equal blocks ×
      block_size × 2 × layers × kv_heads × head_dim × 4 B (the formula, written out here).
  ENGINE (2 ranks on gloo: the tiny Llama's paged engine with prefix caching on rank 0, the host tier's process
      on rank 1; a 10-block device pool that evicts): five requests, two sharing a 40-token prefix the pool has
      evicted by the time they come, one of exactly 5 full blocks; the learner's loads (which request, from
      which position, how many tokens, which hashes) and stored hashes equal those of the grader's own decisions
      on the same run; bytes the tier's process received and sent = blocks × the formula; every request's tokens
      equal those of the same engine without a tier and its top-5 logprobs agree within a float32 bound, and the
      KV loaded equals the KV recomputed without the tier within a float32 bound.

Mistakes each check catches (planted in tests/graders/planted_ch09_offload.py and asserted caught):
  count_anywhere      every block the tier holds after the local hits counts, not the leading run
  loads_last_token    a request of whole blocks loads its last block (its last token is never computed)
  from_block_zero     the run counted from block 0, local hits included, not after them
  returns_blocks      the number of blocks returned, not tokens
  prompt_only         the prompt's blocks only (a re-admitted request's generated tokens never load)
  saves_partial       the computed tokens' partial block saved too (ceil, not floor)
  saves_twice         every full block sent after every step (no check of what the tier holds)
  saves_uncomputed    full blocks of all the request's tokens, computed or not
"""
from __future__ import annotations

import hashlib
import pickle

import pytest
import torch

from helpers import launch, load_impl
# imported here, once, so that the forked ranks do not each import transformers
from helpers.course import tiny_llama  # noqa: F401
from helpers.course.engine import Request
from helpers.course.kv_offload import HostTierClient, TierConnector
from tests.graders.planted import planted_tests

MATCH = "labs/kv_offload.py: OffloadingConnector.get_num_new_matched_tokens"
SAVE = "labs/kv_offload.py: OffloadingConnector.blocks_to_save"
BS, LAYERS, KV_HEADS, HEAD_DIM = 4, 2, 2, 3


def _impl(impl):
    return impl if impl is not None else load_impl("kv_offload")


def grader_hashes(token_ids, block_size, parent=None, cache_salt=None):
    """The grader's own chain: one SHA-256 per full block over (parent, the block's tokens, the salt on block 0)."""
    ids, out = [int(t) for t in token_ids], []
    for start in range(0, len(ids) - block_size + 1, block_size):
        extra = (cache_salt,) if cache_salt and parent is None else None
        parent = hashlib.sha256(pickle.dumps((parent or bytes(32), tuple(ids[start:start + block_size]), extra))
                                ).digest()
        out.append(parent)
    return out


def formula_bytes(blocks, block_size, layers, kv_heads, head_dim, element_size=4):
    """block_size × layers × 2 (K and V) × kv_heads × head_dim × bytes per value, per block."""
    return blocks * block_size * layers * 2 * kv_heads * head_dim * element_size


def _call(failures, where, fn, *args):
    """Run learner code: (ok, value); an exception becomes a failure saying where."""
    try:
        return True, fn(*args)
    except NotImplementedError:
        raise
    except Exception as exc:
        failures.append(f"{where} raised {type(exc).__name__}: {str(exc)[:200]}")
        return False, exc


def _connector(kv, tier, failures):
    ok, connector = _call(failures, "OffloadingConnector(tier, block_size, num_layers, hasher)",
                          kv.OffloadingConnector, tier, BS, LAYERS, grader_hashes)
    return connector if ok else None


def _tier():
    return HostTierClient(LAYERS, BS, KV_HEADS, HEAD_DIM, capacity_blocks=64)


def _fill(tier, hashes):
    if hashes:
        tier.store(hashes, torch.randn(len(hashes), LAYERS, 2, BS, KV_HEADS, HEAD_DIM))


def _request(rid, prompt, generated=()):
    request = Request(rid, prompt, max_tokens=len(generated) + 1)
    request.tokens.extend(generated)
    return request


# ---------------------------------------------------------------------------------------------------- MATCH

def check_match(impl=None):
    failures, kv = [], _impl(impl)
    prompt = list(range(100, 118))                  # 18 tokens: blocks 0..3 full, 2 tokens in block 4
    hashes = grader_hashes(prompt, BS)
    other = [7] + prompt[1:]                        # differs in its first token: every hash differs
    cases = [
        # (what, request tokens, generated, blocks the tier holds, local hits, expected, rule)
        ("18 tokens, the tier holds blocks 0-3, no local hits", prompt, (), [0, 1, 2, 3], 0, 16,
         "the tier supplies the 4 full blocks: 16 TOKENS (block_size × blocks)"),
        ("18 tokens, the tier holds blocks 0-3, 8 tokens found locally", prompt, (), [0, 1, 2, 3], 8, 8,
         "the tokens AFTER the local hits: blocks 2 and 3, 8 tokens (the local 8 are not loaded again)"),
        ("18 tokens, the tier holds blocks 0, 1, 3 (not 2)", prompt, (), [0, 1, 3], 0, 8,
         "a prefix that breaks midway stops the match: block 2 is missing, so block 3 cannot be used"),
        ("18 tokens, the tier holds blocks 1-3 (not 0)", prompt, (), [1, 2, 3], 0, 0,
         "a match starts at the first block after the local hits: without block 0 nothing loads"),
        ("16 tokens (4 full blocks), the tier holds blocks 0-3", prompt[:16], (), [0, 1, 2, 3], 0, 12,
         "never the request's last token: block 3 holds position 15, which must be computed for its logits"),
        ("17 tokens, the tier holds blocks 0-3", prompt[:17], (), [0, 1, 2, 3], 0, 16,
         "block 3 ends before the last token (position 16): all 4 blocks load"),
        ("a re-admitted request: 10 prompt + 8 generated tokens, the tier holds blocks 0-3", prompt[:10],
         tuple(prompt[10:]), [0, 1, 2, 3], 0, 16,
         "a request's blocks are those of ALL its tokens (prompt and generated: request.num_tokens), not the "
         "prompt's only"),
        ("18 tokens, 12 found locally, the tier holds blocks 0-1", prompt, (), [0, 1], 12, 0,
         "nothing the tier holds lies after the local hits: 0"),
        ("another prefix (first token differs), the tier holds the first prompt's blocks 0-3", other, (),
         [0, 1, 2, 3], 0, 0, "blocks are found by their chained hash: another prefix has other hashes"),
    ]
    for what, tokens, generated, held, local, want, rule in cases:
        tier = _tier()
        _fill(tier, [hashes[i] for i in held])
        connector = _connector(kv, tier, failures)
        if connector is None:
            return failures
        before = tier.figures()
        request = _request("r", tokens, generated)
        ok, got = _call(failures, f"{MATCH} ({what})", connector.get_num_new_matched_tokens, request, local)
        if not ok:
            return failures
        if got != want:
            failures.append(f"[9.3] {what}: get_num_new_matched_tokens(request, num_computed_tokens={local}) = "
                            f"{got!r}, expected {want}: {rule} ({MATCH})")
            return failures
        if tier.figures() != before or connector.loads:
            failures.append(f"[9.3] {what}: get_num_new_matched_tokens moved blocks (the tier's counters changed): "
                            f"it only looks up hashes (self.tier.lookup); the engine loads later ({MATCH})")
            return failures
    return failures


# ---------------------------------------------------------------------------------------------------- SAVE

def _pool_reader(kv_by_layer):
    def read(layer, start, count):
        k, v = kv_by_layer[layer]
        return k[start:start + count], v[start:start + count]
    return read


def _expect_stored(failures, tier, before, want_hashes, names, what, rule):
    sent = tier.stored_hashes[before:]
    if sent != want_hashes:
        got = [names.get(h, "?") for h in sent]
        rule = rule(got) if callable(rule) else rule
        failures.append(f"[9.3] {what}: the tier was sent blocks {got}, expected {[names[h] for h in want_hashes]}: "
                        f"{rule} ({SAVE})")
        return False
    return True


def _first_save_rule(got):
    if "block 3" in got:
        return ("block 3 (positions 12-15) has no keys and values yet: only blocks of the first num_computed_tokens "
                "tokens (10) are saved, blocks 0 and 1")
    return ("the FULL blocks of the computed tokens: blocks 0 and 1 (block 2 holds 2 computed tokens: partial, never "
            "saved)")


def check_save(impl=None):
    failures, kv = [], _impl(impl)
    torch.manual_seed(93)
    tokens = list(range(200, 218))                   # 18 tokens
    hashes = grader_hashes(tokens, BS)
    names = {h: f"block {i}" for i, h in enumerate(hashes)}
    pool = [(torch.randn(24, KV_HEADS, HEAD_DIM), torch.randn(24, KV_HEADS, HEAD_DIM)) for _ in range(LAYERS)]
    tier = _tier()
    connector = _connector(kv, tier, failures)
    if connector is None:
        return failures
    request = _request("a", tokens[:16], tuple(tokens[16:]))     # 16 prompt tokens, 2 generated
    steps = [
        (10, [0, 1], "after 10 of 18 tokens are computed", _first_save_rule),
        (18, [2, 3], "after all 18 are computed",
         "each hash once: blocks 0 and 1 are in the tier already; only 2 and 3 are new (block 4 is partial)"),
        (18, [], "after a step that completed no block", "nothing new is full: nothing is sent"),
    ]
    for computed, want, what, rule in steps:
        before = len(tier.stored_hashes)
        ok, _ = _call(failures, f"TierConnector.save -> {SAVE} ({what})", connector.save, request, computed,
                      _pool_reader(pool))
        if not ok or not _expect_stored(failures, tier, before, [hashes[i] for i in want], names, what, rule):
            return failures
    # a block the just-sampled token fills is not computed yet
    request = _request("b", tokens[:16], tuple(tokens[16:]) + (9, 9))    # 20 tokens: block 4 full, 19 computed
    more = grader_hashes(request.all_token_ids, BS)
    names.update({more[4]: "block 4"})
    before = len(tier.stored_hashes)
    what = "a request of 20 tokens with 19 computed (its last sampled token fills block 4)"
    ok, _ = _call(failures, f"TierConnector.save -> {SAVE} ({what})", connector.save, request, 19, _pool_reader(pool))
    if not ok or not _expect_stored(failures, tier, before, [], names, what,
                                    "block 4's last position (the token just sampled) has no keys and values yet: "
                                    "only blocks of the first num_computed_tokens tokens, which are all in the tier"):
        return failures
    # another request sharing the first two blocks
    shared = tokens[:8] + [300 + i for i in range(8)] + [5]
    theirs = grader_hashes(shared, BS)
    names.update({theirs[2]: "its block 2", theirs[3]: "its block 3"})
    before = len(tier.stored_hashes)
    what = "a second request sharing blocks 0-1, 17 tokens computed"
    ok, _ = _call(failures, f"TierConnector.save -> {SAVE} ({what})", connector.save, _request("c", shared), 17,
                  _pool_reader(pool))
    if not ok or not _expect_stored(failures, tier, before, [theirs[2], theirs[3]], names, what,
                                    "blocks 0 and 1 were saved by the first request (the same hashes): only its own "
                                    "blocks 2 and 3"):
        return failures
    # the tier holds the pool's K and V, and the bytes are the formula
    for i in range(4):
        got = tier.load([hashes[i]])[0]
        for layer in range(LAYERS):
            k, v = pool[layer]
            if not (torch.equal(got[layer, 0], k[i * BS:(i + 1) * BS]) and
                    torch.equal(got[layer, 1], v[i * BS:(i + 1) * BS])):
                failures.append(f"[9.3] the tier's block {i} (layer {layer}) is not the pool's K and V of positions "
                                f"{i * BS}..{(i + 1) * BS - 1}: blocks_to_save returns block INDICES of the "
                                f"request ({SAVE})")
                return failures
    stored = len(tier.stored_hashes)
    want = formula_bytes(stored, BS, LAYERS, KV_HEADS, HEAD_DIM)
    if tier.kv_bytes_sent != want or stored != 6:
        six = formula_bytes(6, BS, LAYERS, KV_HEADS, HEAD_DIM)
        failures.append(f"[9.3] {stored} blocks and {tier.kv_bytes_sent:,} KV bytes sent, expected 6 blocks and "
                        f"{six:,} B (blocks × block_size × layers × 2 × kv_heads × head_dim × 4 B) ({SAVE})")
    return failures


# ---------------------------------------------------------------------------------------------------- ENGINE

ENGINE_BS, ENGINE_BLOCKS, TIER_BLOCKS = 8, 10, 64


class _Reference:
    """The grader's own decisions (written apart from the reference answer)."""

    def get_num_new_matched_tokens(self, request, num_computed_tokens):
        hashes = self.block_hashes(request)
        n = num_computed_tokens // self.block_size
        while n < (request.num_tokens - 1) // self.block_size and self.tier.lookup(hashes[n]):
            n += 1
        return n * self.block_size - num_computed_tokens

    def blocks_to_save(self, request, num_computed_tokens):
        hashes = self.block_hashes(request)
        return [i for i in range(num_computed_tokens // self.block_size) if not self.tier.lookup(hashes[i])]


class _Spy:
    """A connector that supplies nothing and records the KV of the first 40 tokens of request 'B'."""

    def __init__(self):
        self.kv = None

    def get_num_new_matched_tokens(self, request, num_computed_tokens):
        return 0

    def load(self, request, start, count, write):
        raise AssertionError("the spy supplies nothing")

    def save(self, request, num_computed_tokens, read):
        if request.rid == "B" and self.kv is None and num_computed_tokens >= 40:
            self.kv = [read(layer, 0, 40) for layer in range(tiny_llama.CONFIG.num_hidden_layers)]


def _requests():
    ids = tiny_llama.encode(tiny_llama.CORPUS_PATH.read_text(encoding="utf-8"))
    prefix = ids[:40]                                  # 5 blocks of 8
    plan = [("A", prefix + ids[40:44], 4), ("F1", ids[200:248], 2), ("F2", ids[400:448], 2),
            ("B", prefix + ids[600:612], 4), ("F3", ids[800:848], 2), ("C", prefix, 3)]
    return [Request(rid, prompt, n, arrival=float(i), logprobs=5) for i, (rid, prompt, n) in enumerate(plan)]


def _engine(connector):
    import types

    from helpers.course.engine import KVCacheManager, LLMEngine, ModelledClock, PagedRunner, SchedulerConfig, StepPlan
    from helpers.course.paged_llama import PagedLlamaRunner
    from tests.graders.test_ch07_chunked_prefill import GraderBlocks, _grader_paged_attention, reference_step
    paged = PagedLlamaRunner(tiny_llama.load_model(), num_blocks=ENGINE_BLOCKS, block_size=ENGINE_BS)
    paged.paged = types.SimpleNamespace(paged_attention=_grader_paged_attention)
    paged.manager = GraderBlocks(ENGINE_BLOCKS, ENGINE_BS, caching=True)
    kv = KVCacheManager(ENGINE_BLOCKS, ENGINE_BS, True, block_manager=paged.manager)
    return LLMEngine(PagedRunner(paged), kv, SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=2),
                     clock=ModelledClock(), connector=connector,
                     schedule_step=lambda running, waiting, kv, config: StepPlan(*reference_step(running, waiting,
                                                                                                  kv, config)))


def _tier_run(cls, tier):
    from helpers.course.engine import run_requests
    config = tiny_llama.CONFIG
    loaded = []
    plain_load = tier.load

    def load(hashes):
        blocks = plain_load(hashes)
        loaded.append(blocks.clone())
        return blocks
    tier.load = load
    connector = cls(tier, ENGINE_BS, config.num_hidden_layers, grader_hashes)
    requests = _requests()
    try:
        run_requests(_engine(connector), requests, max_steps=400)
    finally:
        tier.tier_side = tier.close()                  # the tier's process ends its loop whatever happened
    return connector, tier, requests, loaded


def check_engine(rank, impl=None):
    """Rank 1: the host tier's process (twice: the grader's run, then the learner's). Rank 0: the runs."""
    from helpers.course.engine import run_requests
    from helpers.course.kv_offload import serve_host_tier
    config = tiny_llama.CONFIG
    if rank == 1:
        return [serve_host_tier(0, config.num_hidden_layers, ENGINE_BS, config.num_key_value_heads, config.head_dim,
                                TIER_BLOCKS) for _ in range(2)]
    failures, kv = [], _impl(impl)

    def make_tier():
        return HostTierClient(config.num_hidden_layers, ENGINE_BS, config.num_key_value_heads, config.head_dim,
                              TIER_BLOCKS, peer=1)
    want, want_tier, _, _ = _tier_run(type("GraderConnector", (_Reference, TierConnector), {}), make_tier())
    label = "the tiny Llama, 10 device blocks of 8, requests A F1 F2 B F3 C (B and C share A's 40-token prefix)"
    try:
        got, tier, requests, loaded = _tier_run(kv.OffloadingConnector, make_tier())
    except NotImplementedError:
        raise
    except Exception as exc:
        return [f"[9.3] {label}: the engine raised {type(exc).__name__}: {str(exc)[:200]} ({MATCH})"]
    spy = _Spy()
    plain = _requests()
    run_requests(_engine(spy), plain, max_steps=400)
    sane = [(rid, start, count) for rid, start, count, _ in want.loads]
    c_load = [(start, count) for rid, start, count in sane if rid == "C"]
    if ("B", 0, 40) not in sane or len(c_load) != 1 or sum(c_load[0]) != 32:
        return [f"[9.3] {label}: the grader's own run loads {sane}, expected B and C to load A's blocks: the "
                f"grader's workload is wrong"]
    if [(r, s, c) for r, s, c, _ in got.loads] != sane or [h for *_, h in got.loads] != [h for *_, h in want.loads]:
        failures.append(f"[9.3] {label}: the connector loaded (request, start, tokens) {[l[:3] for l in got.loads]}, "
                        f"expected {sane}: B loads A's 5 blocks (40 tokens) after the pool evicted them, C (exactly "
                        f"5 blocks) loads up to block 3, never block 4, which holds its last token ({MATCH})")
        return failures
    if tier.stored_hashes != want_tier.stored_hashes:
        extra = len(tier.stored_hashes) - len(want_tier.stored_hashes)
        failures.append(f"[9.3] {label}: {len(tier.stored_hashes)} blocks sent to the tier, expected "
                        f"{len(want_tier.stored_hashes)} ({extra:+d}): each full computed block once ({SAVE})")
        return failures
    return failures + _same_as_without(label, tier, requests, plain, loaded, spy)


def _same_as_without(label, tier, requests, plain, loaded, spy):
    from helpers.claims import max_abs_diff, tolerance
    config, failures = tiny_llama.CONFIG, []
    block = formula_bytes(1, ENGINE_BS, config.num_hidden_layers, config.num_key_value_heads, config.head_dim)
    side = tier.tier_side
    if (side["kv_bytes_received"], side["kv_bytes_sent"]) != (block * tier.blocks_stored, block * tier.blocks_loaded):
        failures.append(f"[9.3] {label}: the tier's process received {side['kv_bytes_received']:,} and sent "
                        f"{side['kv_bytes_sent']:,} KV bytes for {tier.blocks_stored} / {tier.blocks_loaded} blocks of "
                        f"{block:,} B (the formula)")
    for got, want in zip(requests, plain):
        if got.tokens != want.tokens:
            failures.append(f"[9.3] {label}: request {got.rid} generated {got.tokens} with the tier, {want.tokens} "
                            f"without: the loaded KV is not the prefix's ({MATCH})")
            return failures
        for a, b in zip(got.output_logprobs, want.output_logprobs):
            x, y = torch.tensor([p for _, p in a["top"]]), torch.tensor([p for _, p in b["top"]])
            if [t for t, _ in a["top"]] != [t for t, _ in b["top"]] or max_abs_diff(x, y) > tolerance(y):
                failures.append(f"[9.3] {label}: request {got.rid}'s top-5 logprobs differ with the tier "
                                f"({a['top'][:2]}... vs {b['top'][:2]}...) ({MATCH})")
                return failures
    b_load = loaded[0]                                  # B's load: [5, layers, 2, block, kv_heads, head_dim]
    for layer, (k, v) in enumerate(spy.kv):
        for index, want in ((0, k), (1, v)):
            got = b_load[:, layer, index].reshape(-1, *want.shape[1:])
            if max_abs_diff(got, want) > tolerance(want, torch.float32, 64 * config.num_hidden_layers):
                failures.append(f"[9.3] {label}: the KV B loaded (layer {layer}) differs from the KV recomputed "
                                f"without the tier by {max_abs_diff(got, want):.1e}")
                return failures
    return failures


# ---------------------------------------------------------------------------------------- the graded tests

CHECKS = {"match": check_match, "save": check_save}


def _run(rank, world_size, names, impl=None):
    """Run the named checks in this rank (learner code runs only here, never in the grading process)."""
    return [f for name in names for f in CHECKS[name](impl)]


def _engine_job(rank, world_size, impl_name=None):
    impl = None
    if impl_name is not None:
        from tests.graders import planted_ch09_offload as planted
        impl = planted.build(impl_name)
    return check_engine(rank, impl)


def _assert_none(failures):
    assert not failures, "\n".join(failures[:6])


@pytest.mark.exercise("9.3", "KV offload connector")
def test_offloading_connector_matches_host_tier_blocks():
    _assert_none(launch(_run, 1, ["match"], show_output=False)[0])


@pytest.mark.exercise("9.3", "KV offload connector")
def test_offloading_connector_saves_full_blocks_once():
    _assert_none(launch(_run, 1, ["save"], show_output=False)[0])


@pytest.mark.exercise("9.3", "KV offload connector")
def test_engine_with_host_tier_loads_evicted_prefix():
    # the model runs three times (the grader's decisions, the learner's, none): room on a busy machine
    _assert_none(launch(_engine_job, 2, show_output=False, timeout=180)[0])


# ------------------------------------------------------------- planted wrong answers (not an exercise)

# The engine alternative runs in its own 2-rank job (the tier in another process), as test_connector_in_the_engine.
planted_results, test_planted_mistakes_are_caught, test_valid_alternatives_pass, test_reference_passes_every_check = \
    planted_tests("planted_ch09_offload", CHECKS, "solutions.kv_offload",
                  own={"engine": lambda name: launch(_engine_job, 2, name, show_output=False, timeout=180)[0]})
