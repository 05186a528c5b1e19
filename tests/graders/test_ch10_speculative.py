"""Graders for chapter 10's speculative decoding (labs/speculative_decoding.py): the rejection sampler (10.1) and the
verification step on the paged KV cache (10.2).

Each exercise has check functions that return a list of failures; the graders run them on the implementation under
test (COURSE_IMPL) inside a launched rank, and tests/graders/planted_ch10_speculative.py runs the same functions on
wrong answers planted in the reference and on valid answers written differently. They need no other exercise: the
distributions are the grader's own tables, and 10.2's KV side is the grader's own block manager behind the engine's
KVCacheManager (its `rollback` is the only call the exercise needs).

What the graders check:
  10.1 rejection_sample: GREEDY — accept while the draft token is the row's argmax, then the argmax of the first
       row that disagrees; all accepted: the drafts and the bonus token (argmax of the LAST row); k = 0: one token.
       DRAFT EQUAL TO TARGET — every draft token accepted (p/q = 1) and a bonus token: k + 1 tokens. THE GENERATOR —
       the same seed gives the same tokens, another seed other tokens at least once. THE DISTRIBUTION — the first two
       tokens emitted (a second round from the last emitted token when the first round emits one), over 2000 draws
       from a toy bigram target p and a different draft q (vocab 4, 16 cells), against the target's own
       p(t1 | c) p(t2 | t1) (every cell expects at least 20): Pearson's chi-square, 15 degrees of freedom; a
       p-value below 1e-4 fails. That is the
       false-alarm rate for a correct sampler per run of the check (three such checks: k = 1, k = 2, and a point-mass
       draft, so at most 3e-4 in all); the seeds are fixed, so a given answer passes or fails the same every run.
  10.2 verify_and_rollback: for greedy requests with a known number of accepted drafts (none, some, all; across a
       block boundary, so a whole block of rejected slots must go back to the free list), the tokens returned and
       appended, request.num_computed_tokens (the last token + the accepted drafts), the block table after (the first
       ceil(computed / block_size) blocks of the one before, in order; the rest free), nothing registered in the
       prefix cache, and max_tokens respected; for a sampled request the same bookkeeping holds for whatever was
       emitted.

Mistakes each grader catches (planted in tests/graders/planted_ch10_speculative.py and asserted caught):
  10.1 resample_from_p, no_bonus, bonus_from_first_row, keeps_rejected_draft, drops_last_accepted, ratio_inverted,
       greedy_emits_draft, global_rng
  10.2 no_rollback, rollback_to_start, counts_target_token, rollback_counts_rejected, cache_scored_tokens,
       ignores_max_tokens
"""
from __future__ import annotations

import pytest
import torch

from helpers import launch, load_impl
from tests.graders.planted import planted_tests

SAMPLER = "labs/speculative_decoding.py: rejection_sample"
VERIFY = "labs/speculative_decoding.py: verify_and_rollback"
FALSE_ALARM = 1e-4

# The toy language of the distribution checks: bigram tables over 4 tokens, P[c] = p(. | previous token c).
P = torch.tensor([[.50, .20, .20, .10], [.10, .50, .25, .15], [.25, .25, .25, .25], [.10, .15, .30, .45]],
                 dtype=torch.float64)
Q = torch.tensor([[.10, .20, .30, .40], [.40, .10, .40, .10], [.70, .10, .10, .10], [.25, .25, .25, .25]],
                 dtype=torch.float64)


def _impl(impl):
    return impl if impl is not None else load_impl("speculative_decoding")


def _call(impl, *args, **kwargs):
    try:
        return impl.rejection_sample(*args, **kwargs), None
    except NotImplementedError:
        raise
    except Exception as exc:
        return None, f"{SAMPLER} raised {type(exc).__name__}: {exc}"


def _tokens(out):
    return [int(t) for t in (out.tolist() if isinstance(out, torch.Tensor) else out)]


# ------------------------------------------------------------------------------------------ 10.1
def check_greedy(impl=None):
    impl, failures = _impl(impl), []
    g = torch.Generator().manual_seed(0)
    for case in range(12):
        k = case % 4
        logits = torch.randn(k + 1, 16, generator=g, dtype=torch.float64)
        probs = torch.softmax(logits, dim=-1)
        best = probs.argmax(dim=-1).tolist()
        agree = case % (k + 1) if k else 0                      # drafts 0 .. agree-1 equal the argmax
        drafts = [best[i] if i < agree else (best[i] + 1) % 16 for i in range(k)]
        if case % 3 == 0:
            drafts = best[:k]
            agree = k
        want = drafts[:agree] + [best[agree]]
        out, err = _call(impl, torch.tensor(drafts), None, probs, None, greedy=True)
        if err:
            return [err]
        got = _tokens(out)
        if got == want:
            continue
        if agree == k and got == drafts:
            failures.append(f"{SAMPLER}: greedy, all {k} draft tokens equal the target's argmax: expected them AND "
                            f"the bonus token (argmax of the last row, target_probs[k]) = {want}, got {got}")
        elif agree < k and len(got) == agree + 1 and got[-1] == drafts[agree]:
            failures.append(f"{SAMPLER}: greedy, draft token {agree} ({drafts[agree]}) is not the target's argmax "
                            f"({best[agree]}): the round stops there and emits the TARGET's argmax: expected {want}, "
                            f"got {got}")
        else:
            failures.append(f"{SAMPLER}: greedy with drafts {drafts} and row argmaxes {best}: accept while the draft "
                            f"token is its row's argmax, then emit the argmax of the first row that disagrees (or the "
                            f"bonus row): expected {want}, got {got}")
        break
    return failures


def check_draft_equals_target(impl=None):
    impl, failures = _impl(impl), []
    g = torch.Generator().manual_seed(1)
    for case in range(10):
        k = 1 + case % 3
        probs = torch.softmax(torch.randn(k + 1, 8, generator=g, dtype=torch.float64), dim=-1)
        drafts = torch.multinomial(probs[:k], 1, generator=g).flatten()
        out, err = _call(impl, drafts, probs[:k].clone(), probs, torch.Generator().manual_seed(case))
        if err:
            return [err]
        got = _tokens(out)
        if got[:k] != drafts.tolist() or len(got) != k + 1:
            if got == drafts.tolist():
                failures.append(f"{SAMPLER}: when every draft token is accepted the target still adds its bonus "
                                f"token, drawn from the last row target_probs[k]: draft probs equal to the target's "
                                f"(p/q = 1) must give {k} drafts + 1 bonus = {k + 1} tokens, got {got}")
            else:
                failures.append(f"{SAMPLER}: draft probs equal to the target's: p(x)/q(x) = 1 for every draft token, "
                                f"so all are accepted (u < 1) and a bonus token follows: expected {drafts.tolist()} + "
                                f"one token, got {got}")
            break
    return failures


def check_generator(impl=None):
    impl = _impl(impl)
    outs = {}
    for seed in (5, 5, 6):
        g, run = torch.Generator().manual_seed(seed), []
        for c in range(30):
            drafts = torch.tensor([c % 4, (c + 1) % 4])
            out, err = _call(impl, drafts, torch.stack([Q[c % 4], Q[drafts[0]]]),
                             torch.stack([P[c % 4], P[drafts[0]], P[drafts[1]]]), g)
            if err:
                return [err]
            run.append(tuple(_tokens(out)))
        outs.setdefault(seed, []).append(run)
    if outs[5][0] != outs[5][1]:
        return [f"{SAMPLER}: two runs with generators seeded alike gave different tokens: draw every random number "
                f"(the uniforms, the recovered and the bonus tokens) from `generator` (the request's), never from "
                f"torch's global generator"]
    if outs[5][0] == outs[6][0]:
        return [f"{SAMPLER}: generators seeded 5 and 6 gave the same tokens in 30 rounds: the random draws must "
                f"come from `generator`"]
    return []


def _joint_counts(impl, k: int, point_mass: bool, draws: int, seed: int):
    """Counts of the first two emitted tokens after context token 0 over `draws` runs, and an error or None."""
    g = torch.Generator().manual_seed(seed)                      # the grader's draws (the drafts)
    sampler = torch.Generator().manual_seed(seed + 1)            # the exercise's draws
    counts = torch.zeros(4, 4, dtype=torch.float64)
    for _ in range(draws):
        emitted, context = [], 0
        while len(emitted) < 2:
            drafts, rows_q, rows_p, c = [], [], [P[context]], context
            for _ in range(k):
                q = Q[c]
                x = (c + 1) % 4 if point_mass else int(torch.multinomial(q, 1, generator=g))
                drafts.append(x)
                rows_q.append(q)
                rows_p.append(P[x])
                c = x
            out, err = _call(impl, torch.tensor(drafts), None if point_mass else torch.stack(rows_q),
                             torch.stack(rows_p), sampler)
            if err:
                return None, err
            got = _tokens(out)
            if not 1 <= len(got) <= k + 1 or got[:-1] != drafts[:len(got) - 1]:
                return None, (f"{SAMPLER}: returned {got} for drafts {drafts}: the result must be a prefix of the "
                              f"drafts (the accepted ones) followed by exactly one token of the target's")
            emitted += got
            context = emitted[-1]
        counts[emitted[0], emitted[1]] += 1
    return counts, None


def chi_square_p_value(counts: torch.Tensor, expected_probs: torch.Tensor) -> tuple[float, float]:
    """(Pearson's statistic, its p-value with cells − 1 degrees of freedom: the regularised upper incomplete gamma
    Q(df/2, stat/2), torch.special.gammaincc)."""
    expected = expected_probs.flatten() * counts.sum()
    stat = float(((counts.flatten() - expected) ** 2 / expected).sum())
    df = counts.numel() - 1
    return stat, float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                               torch.tensor(stat / 2, dtype=torch.float64)))


def check_distribution(impl=None, k: int = 2, point_mass: bool = False, draws: int = 2000, seed: int = 0):
    impl = _impl(impl)
    counts, err = _joint_counts(impl, k, point_mass, draws, seed)
    if err:
        return [err]
    expected = P[0][:, None] * P                                 # p(t1 | 0) p(t2 | t1)
    stat, p_value = chi_square_p_value(counts, expected)
    if p_value >= FALSE_ALARM:
        return []
    first = counts.sum(dim=1) / draws
    what = "a point-mass (n-gram) draft" if point_mass else f"a draft model, k = {k}"
    return [f"{SAMPLER}: the emitted tokens are not distributed as the target's ({what}): chi-square {stat:.1f} on "
            f"15 degrees of freedom, p = {p_value:.1e} < {FALSE_ALARM:g}; first token frequencies "
            f"{[round(x, 3) for x in first.tolist()]} vs the target's {[round(x, 3) for x in P[0].tolist()]}. "
            f"Accept x with probability min(1, p(x)/q(x)); at a rejection draw from max(0, p - q) normalised (not "
            f"from p); after k accepted drafts draw the bonus from the LAST row"]


# ------------------------------------------------------------------------------------------ 10.2
class GraderBlocks:
    """The grader's own block manager (the interface KVCacheManager.rollback and the exercise may touch): a free
    list, block tables, and a prefix cache keyed by the token ids up to a block's end (registrations recorded)."""

    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.free_blocks = list(range(num_blocks))
        self.tables, self.num_tokens, self.cached, self.hash_of_block, self.evictable = {}, {}, {}, {}, {}

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    def blocks_needed(self, n: int) -> int:
        return -(-n // self.block_size)

    def block_table(self, seq_id):
        return list(self.tables[seq_id])

    def seq_len(self, seq_id) -> int:
        return self.num_tokens[seq_id]

    def allocate(self, seq_id, n: int):
        self.tables[seq_id] = [self.free_blocks.pop(0) for _ in range(self.blocks_needed(n))]
        self.num_tokens[seq_id] = n
        return list(self.tables[seq_id])

    def append_slot(self, seq_id):
        table, position = self.tables[seq_id], self.num_tokens[seq_id]
        if position == len(table) * self.block_size:
            table.append(self.free_blocks.pop(0))
        self.num_tokens[seq_id] = position + 1
        return table[position // self.block_size], position % self.block_size

    def truncate(self, seq_id, n: int) -> None:
        if not 1 <= n <= self.num_tokens[seq_id]:
            raise ValueError(f"num_tokens={n} must be in [1, {self.num_tokens[seq_id]}]")
        keep = self.blocks_needed(n)
        self.free_blocks.extend(self.tables[seq_id][keep:])
        self.tables[seq_id] = self.tables[seq_id][:keep]
        self.num_tokens[seq_id] = n

    def cache_blocks(self, seq_id, token_ids, cache_salt=None):
        new = []
        for i, block in enumerate(self.tables[seq_id][:len(token_ids) // self.block_size]):
            key = tuple(int(t) for t in token_ids[:(i + 1) * self.block_size])
            if key not in self.cached and block not in self.hash_of_block:
                self.cached[key], self.hash_of_block[block] = block, key
                new.append(key)
        return new

    def free(self, seq_id) -> None:
        self.free_blocks.extend(self.tables.pop(seq_id))
        del self.num_tokens[seq_id]


def _verify_case(impl, k: int, accepted: int, prompt_len: int, generated: int, block_size: int = 4,
                 max_tokens: int = 50, temperature: float = 0.0, seed: int = 0):
    """A request that has caught up, its slots reserved for k drafts, greedy logits that accept `accepted`."""
    from helpers.course.engine.kv_cache_manager import KVCacheManager
    from helpers.course.engine.request import Request
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, 32, (prompt_len,), generator=g).tolist()
    request = Request("r", prompt, max_tokens=max_tokens, temperature=temperature, seed=seed)
    request.tokens = torch.randint(0, 32, (generated,), generator=g).tolist()
    start = request.num_tokens - 1
    request.num_computed_tokens = start
    blocks = GraderBlocks(16, block_size)
    kv = KVCacheManager(16, block_size, enable_caching=False, block_manager=blocks)
    blocks.allocate("r", start + 1 + k)
    blocks.cache_blocks("r", request.all_token_ids[:start])              # what the engine cached already
    logits = torch.randn(k + 1, 32, generator=g, dtype=torch.float64)
    best = logits.argmax(dim=-1).tolist()
    drafts = [best[i] if i < accepted else (best[i] + 1) % 32 for i in range(k)]
    probs = torch.softmax(torch.randn(k, 32, generator=g), dim=-1) if temperature else None
    return request, drafts, logits, kv, blocks, probs, best


def check_verify(impl=None):
    impl, failures = _impl(impl), []
    cases = [  # (k, accepted, prompt_len, generated, max_tokens, temperature)
        (4, 1, 6, 1, 50, 0.0), (4, 0, 7, 1, 50, 0.0), (4, 4, 5, 2, 50, 0.0), (3, 2, 3, 2, 50, 0.0),
        (5, 1, 9, 2, 50, 0.0), (4, 4, 5, 2, 4, 0.0), (3, 3, 6, 1, 50, 0.0), (4, 2, 8, 3, 50, 1.0),
        (6, 0, 4, 1, 50, 0.0), (6, 5, 4, 1, 50, 0.0)]
    for i, (k, accepted, prompt_len, generated, max_tokens, temperature) in enumerate(cases):
        request, drafts, logits, kv, blocks, probs, best = _verify_case(impl, k, accepted, prompt_len, generated,
                                                                        max_tokens=max_tokens,
                                                                        temperature=temperature, seed=i)
        start, before_tokens, table = request.num_computed_tokens, list(request.tokens), blocks.block_table("r")
        cached_before, free_before = dict(blocks.cached), len(blocks.free_blocks)
        where = (f"{VERIFY} (k = {k} drafts {drafts}, last token at position {start}, block size 4, "
                 f"{'sampled' if temperature else 'greedy'})")
        try:
            out = impl.verify_and_rollback(request, drafts, logits.clone(), kv, probs)
        except NotImplementedError:
            raise
        except Exception as exc:
            return [f"{where} raised {type(exc).__name__}: {exc}"]
        got = _tokens(out) if out is not None else None
        appended = request.tokens[len(before_tokens):]
        if temperature:
            want = appended if 1 <= len(appended) <= k + 1 and appended[:-1] == drafts[:len(appended) - 1] else None
            if want is None:
                return [f"{where}: appended {appended}: expected accepted drafts then one target token"]
        else:
            want = (drafts[:accepted] + [best[accepted]])[:max_tokens - generated]
        if request.tokens[:len(before_tokens)] != before_tokens or appended != want:
            if len(appended) > max_tokens - generated:
                return [f"{where}: the request may generate {max_tokens - generated} more tokens (max_tokens="
                        f"{max_tokens}) but {len(appended)} were appended: keep no more than it may generate"]
            return [f"{where}: request.tokens should grow by the accepted drafts and the target's token {want}, grew "
                    f"by {appended}"]
        if got != want:
            return [f"{where}: returned {got}, but appended {appended}: return the tokens appended"]
        computed = start + len(want)
        if request.num_computed_tokens != computed:
            extra = request.num_computed_tokens - computed
            hint = ("it counts the target's emitted token, whose keys and values are computed only next step"
                    if extra == 1 else "count the last token and the accepted drafts: their keys and values are "
                    "right; the rejected drafts' are not")
            return [f"{where}: request.num_computed_tokens should be {start} + {len(want)} = {computed}, got "
                    f"{request.num_computed_tokens}: {hint}"]
        held = blocks.seq_len("r")
        if held != computed:
            what = ("the rejected draft tokens' slots are still held: roll them back with kv.rollback(request, "
                    "request.num_computed_tokens)" if held > computed else
                    "slots of ACCEPTED tokens were rolled back too: their keys and values are lost")
            return [f"{where}: after verification the request holds {held} slots, expected {computed} (the last "
                    f"token + accepted drafts): {what}"]
        keep = blocks.blocks_needed(computed)
        if blocks.block_table("r") != table[:keep]:
            return [f"{where}: block table {blocks.block_table('r')} after, {table} before: roll back the slots "
                    f"past position {computed - 1}, i.e. keep the first {keep} blocks, in order"]
        if len(blocks.free_blocks) != free_before + len(table) - keep:
            return [f"{where}: {len(table) - keep} blocks held only rejected slots and must be free again; the free "
                    f"list went from {free_before} to {len(blocks.free_blocks)} blocks"]
        registered = [key for key in blocks.cached if key not in cached_before]
        if registered:
            key = max(registered, key=len)
            bad = [p for p in range(len(key)) if p >= computed or key[p] != request.all_token_ids[p]]
            return [f"{where}: the prefix cache registered a block of tokens {list(key)} during verification"
                    + (f" (position {bad[0]} is a draft token that was rejected or is not computed)" if bad else "")
                    + ": register nothing here; a rejected token's keys and values must never be found under a "
                    "hash (the KV manager caches computed tokens of request.num_tokens at the next allocation)"]
    return failures


CHECKS = {"greedy": check_greedy, "draft_equals_target": check_draft_equals_target, "generator": check_generator,
          "distribution_k2": lambda impl=None: check_distribution(impl, k=2, seed=0),
          "distribution_k1": lambda impl=None: check_distribution(impl, k=1, seed=10),
          "distribution_point_mass": lambda impl=None: check_distribution(impl, k=2, point_mass=True, seed=20),
          "verify": check_verify}


def _run(rank, world_size, names, impl=None):
    torch.set_num_threads(1)
    failures = []
    for name in names:
        failures += CHECKS[name](impl)
    return failures


def _graded(*names):
    failures = launch(_run, 1, list(names), show_output=False, timeout=300)[0]
    assert not failures, "\n".join(failures[:6])


@pytest.mark.exercise("10.1", "rejection sampling")
def test_rejection_sample_greedy():
    _graded("greedy", "draft_equals_target", "generator")


@pytest.mark.exercise("10.1", "rejection sampling")
def test_rejection_sample_keeps_the_target_distribution():
    _graded("distribution_k2", "distribution_k1", "distribution_point_mass")


@pytest.mark.exercise("10.2", "verify and roll back")
def test_verify_and_rollback():
    _graded("verify")


# ------------------------------------------------------------- planted wrong answers (not an exercise)

# No reference test here: the graded tests run every check on the reference (COURSE_IMPL=solutions), slowly enough.
planted_results, test_planted_mistakes_are_caught, test_valid_alternatives_pass, _ = \
    planted_tests("planted_ch10_speculative", CHECKS, "solutions.speculative_decoding", timeout=600, reference=False)
