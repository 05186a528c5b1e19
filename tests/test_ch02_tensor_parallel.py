"""Graders for chapter 2 (labs/tensor_parallel.py, labs/tp_llama.py).

Each launched job checks many shapes at once (a job costs ~0.2 s to start on the 2-core machine). Every
full reference layer is built from a fixed seed on every rank, so all ranks shard the same weights. At
world_size 4 each job also runs the layer inside two sub-groups {0,1} and {2,3} (the `group=` argument).
"""
import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

from helpers import launch, load_impl
from helpers.comm_trace import CommTracer
from helpers.transformer_layers import MLP, Attention, TransformerBlock

WORLD_SIZES = [1, 2, 4]
TOL = 1e-5


def _groups(rank, world_size):
    """[(group, label)]: the whole world, plus (at world size 4) this rank's half as a sub-group."""
    out = [(None, "WORLD")]
    if world_size == 4:
        halves = [dist.new_group([0, 1]), dist.new_group([2, 3])]   # every rank creates every group
        out.append((halves[rank // 2], f"sub-group {[0, 1] if rank < 2 else [2, 3]}"))
    return out


def _check_all(results):
    bad = [msg for rank_msgs in results for msg in rank_msgs]
    assert not bad, "\n".join(bad[:8])


# ----------------------------------------------------------------------------------------- 2.1 column

COLUMN_CASES = [  # (batch shape, in_features, out_features, bias)
    ((3,), 8, 16, True), ((2, 5), 12, 8, False), ((1, 4, 3), 16, 32, True), ((7,), 4, 4, True),
]


def _column_job(rank, world_size):
    tp = load_impl("tensor_parallel")
    failures = []
    for group, label in _groups(rank, world_size):
        for i, (batch, fin, fout, bias) in enumerate(COLUMN_CASES):
            torch.manual_seed(100 + i)
            full = nn.Linear(fin, fout, bias=bias)
            x = torch.randn(*batch, fin)
            expected = full(x)
            n, r = dist.get_world_size(group), dist.get_rank(group)
            for gather in (True, False):
                layer = tp.ColumnParallelLinear.from_linear(full, group=group, gather_output=gather)
                with torch.no_grad():
                    y = layer(x)
                want = expected if gather else expected[..., r * fout // n:(r + 1) * fout // n]
                where = f"rank {rank} {label} in={fin} out={fout} bias={bias} gather_output={gather} x{tuple(x.shape)}"
                if y.shape != want.shape:
                    failures.append(f"{where}: output shape {tuple(y.shape)}, expected {tuple(want.shape)}")
                elif (y - want).abs().max() > TOL:
                    failures.append(f"{where}: max |diff| vs nn.Linear = {(y - want).abs().max():.2e}")
            if layer.weight.shape != (fout // n, fin):
                failures.append(f"rank {rank} {label}: weight shard shape {tuple(layer.weight.shape)}, "
                                f"expected {(fout // n, fin)} (this rank stores only its rows)")
    return failures


@pytest.mark.exercise("2.1", "ColumnParallelLinear (gather_output)")
@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_column_parallel(world_size):
    _check_all(launch(_column_job, world_size, show_output=False))


@pytest.mark.exercise("2.1", "ColumnParallelLinear (gather_output)")
def test_column_parallel_not_divisible():
    tp = load_impl("tensor_parallel")
    with pytest.raises(ValueError, match=r"out_features=10 is not divisible by world_size=4"):
        tp.ColumnParallelLinear.from_linear(nn.Linear(6, 10), rank=0, world_size=4)


# -------------------------------------------------------------------------------------------- 2.2 row

ROW_CASES = [((3,), 16, 8, True), ((2, 5), 8, 12, False), ((1, 4, 3), 32, 16, True), ((7,), 4, 4, True)]


def _row_job(rank, world_size):
    tp = load_impl("tensor_parallel")
    failures = []
    for group, label in _groups(rank, world_size):
        n, r = dist.get_world_size(group), dist.get_rank(group)
        for i, (batch, fin, fout, bias) in enumerate(ROW_CASES):
            torch.manual_seed(200 + i)
            full = nn.Linear(fin, fout, bias=bias)
            if bias:
                nn.init.uniform_(full.bias, 1.0, 2.0)   # large, so a bias added n times (or once per rank) shows
            x = torch.randn(*batch, fin)
            expected = full(x)
            for parallel_input in (False, True):
                layer = tp.RowParallelLinear.from_linear(full, group=group, input_is_parallel=parallel_input)
                inp = x[..., r * fin // n:(r + 1) * fin // n] if parallel_input else x
                with torch.no_grad():
                    y = layer(inp)
                where = f"rank {rank} {label} in={fin} out={fout} bias={bias} input_is_parallel={parallel_input}"
                if y.shape != expected.shape:
                    failures.append(f"{where}: output shape {tuple(y.shape)}, expected {tuple(expected.shape)}")
                elif (y - expected).abs().max() > TOL:
                    failures.append(f"{where}: max |diff| vs nn.Linear = {(y - expected).abs().max():.2e} "
                                    "(the bias must be added once, after the all-reduce, on every rank)")
            if layer.weight.shape != (fout, fin // n):
                failures.append(f"rank {rank} {label}: weight shard shape {tuple(layer.weight.shape)}, "
                                f"expected {(fout, fin // n)} (this rank stores only its input columns)")
    return failures


@pytest.mark.exercise("2.2", "RowParallelLinear (input_is_parallel, bias once)")
@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_row_parallel(world_size):
    _check_all(launch(_row_job, world_size, show_output=False))


@pytest.mark.exercise("2.2", "RowParallelLinear (input_is_parallel, bias once)")
def test_row_parallel_not_divisible():
    tp = load_impl("tensor_parallel")
    with pytest.raises(ValueError, match=r"in_features=6 is not divisible by world_size=4"):
        tp.RowParallelLinear.from_linear(nn.Linear(6, 8), rank=0, world_size=4)


# -------------------------------------------------------------------------------------------- 2.3 MLP

MLP_CASES = [((2, 3), 8, 32), ((5,), 16, 16), ((1, 2, 4), 12, 24)]


def _mlp_job(rank, world_size):
    tp = load_impl("tensor_parallel")
    failures = []
    for group, label in _groups(rank, world_size):
        n = dist.get_world_size(group)
        for i, (batch, hidden, ffn) in enumerate(MLP_CASES):
            where = f"rank {rank} {label} hidden={hidden} ffn={ffn}"
            torch.manual_seed(300 + i)
            full = MLP(hidden, ffn)
            x = torch.randn(*batch, hidden)
            target = torch.randn(*batch, hidden)
            x_full = x.clone().requires_grad_(True)
            (full(x_full) * target).sum().backward()

            mlp = tp.ParallelMLP.from_mlp(full, group=group)
            x_tp = x.clone().requires_grad_(True)
            with CommTracer() as trace:
                y = mlp(x_tp)
            if (y - full(x)).abs().max() > TOL:
                failures.append(f"{where}: max |diff| vs the full MLP = {(y - full(x)).abs().max():.2e}")
            expected_counts = {"all_reduce": 1} if n > 1 else {}
            if trace.counts() != expected_counts:
                failures.append(f"{where}: the forward pass called {trace.counts()}; expected {expected_counts} "
                                "(column gather_output=False feeding row input_is_parallel=True needs one all-reduce)")
            # Training: the conjugate operators make every gradient equal the single-process one.
            (y * target).sum().backward()
            if x_tp.grad is None or (x_tp.grad - x_full.grad).abs().max() > 1e-4:
                failures.append(f"{where}: dL/dx differs from the single-process gradient (the input gradient "
                                "must be all-reduced in backward: copy_to_tensor_model_parallel_region)")
            shards = [(mlp.fc1.weight.grad, full.fc1.weight.grad, 0), (mlp.fc2.weight.grad, full.fc2.weight.grad, 1)]
            for got, ref, dim in shards:
                want = ref.chunk(n, dim=dim)[dist.get_rank(group)]
                if got is None or got.shape != want.shape or (got - want).abs().max() > 1e-4:
                    failures.append(f"{where}: a weight gradient differs from the same slice of the full gradient")
    return failures


@pytest.mark.exercise("2.3", "parallel MLP with one all-reduce")
@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_parallel_mlp(world_size):
    _check_all(launch(_mlp_job, world_size, show_output=False))


# -------------------------------------------------------------------------------------- 2.4 attention

ATTN_CASES = [  # (hidden, heads, kv_heads, batch, seq)
    (32, 8, 8, 2, 5), (32, 8, 4, 1, 7), (64, 8, 2, 2, 3), (16, 4, 1, 3, 4), (48, 4, 4, 1, 1),
]


def _attention_job(rank, world_size):
    tp = load_impl("tensor_parallel")
    failures = []
    for group, label in _groups(rank, world_size):
        n = dist.get_world_size(group)
        for i, (hidden, heads, kv_heads, b, s) in enumerate(ATTN_CASES):
            where = f"rank {rank} {label} hidden={hidden} heads={heads} kv_heads={kv_heads}"
            torch.manual_seed(400 + i)
            full = Attention(hidden, heads, kv_heads)
            x = torch.randn(b, s, hidden)
            attn = tp.ParallelAttention.from_attention(full, group=group)
            with torch.no_grad(), CommTracer() as trace:
                y = attn(x)
                want = full(x)
            if y.shape != want.shape or (y - want).abs().max() > TOL:
                failures.append(f"{where}: max |diff| vs the full attention = "
                                f"{(y - want).abs().max() if y.shape == want.shape else 'shape ' + str(tuple(y.shape))}")
            if trace.counts() != ({"all_reduce": 1} if n > 1 else {}):
                failures.append(f"{where}: forward called {trace.counts()}; expected one all_reduce (o_proj's)")
            if attn.num_heads != heads // n:
                failures.append(f"{where}: this rank should hold {heads // n} query heads, holds {attn.num_heads}")
        # A whole block: two all-reduces, output equal to the full block.
        torch.manual_seed(450)
        block = TransformerBlock(32, 8, 2, ffn=64)
        pblock = tp.ParallelTransformerBlock.from_block(block, group=group)
        x = torch.randn(2, 6, 32)
        with torch.no_grad(), CommTracer() as trace:
            y = pblock(x)
        if (y - block(x)).abs().max() > TOL:
            failures.append(f"rank {rank} {label}: TP block max |diff| = {(y - block(x)).abs().max():.2e}")
        if trace.counts() != ({"all_reduce": 2} if n > 1 else {}):
            failures.append(f"rank {rank} {label}: TP block called {trace.counts()}; expected 2 all-reduces")
    return failures


@pytest.mark.exercise("2.4", "head-parallel attention (GQA)")
@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_parallel_attention(world_size):
    _check_all(launch(_attention_job, world_size, show_output=False))


@pytest.mark.exercise("2.4", "head-parallel attention (GQA)")
def test_attention_heads_not_divisible():
    tp = load_impl("tensor_parallel")
    with pytest.raises(ValueError, match=r"num_kv_heads=3"):
        tp.ParallelAttention.from_attention(Attention(24, 6, 3), rank=0, world_size=2)
    with pytest.raises(ValueError, match=r"num_heads=6 is not divisible by world_size=4"):
        tp.ParallelAttention.from_attention(Attention(24, 6, 6), rank=0, world_size=4)


# ----------------------------------------------------------------------------------- 2.5 Llama plan

LLAMA = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=64)


def _llama(seed=0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    # A larger init spread keeps greedy decoding of a random model from collapsing onto one token at once.
    return LlamaForCausalLM(LlamaConfig(**{**LLAMA, "initializer_range": 0.2, **overrides})).eval()


def _greedy(model, ids, n):
    from transformers import DynamicCache
    cache, out, step = DynamicCache(), ids, ids
    with torch.no_grad():
        for _ in range(n):
            logits = model(step, past_key_values=cache, use_cache=True).logits
            step = logits[:, -1:].argmax(-1)
            out = torch.cat([out, step], dim=1)
    return out


def _llama_job(rank, world_size, overrides):
    tp, plan = load_impl("tensor_parallel"), load_impl("tp_llama")
    failures = []
    ids = torch.tensor([[3, 141, 59, 26, 53, 58], [9, 7, 9, 3, 2, 38]])
    for group, label in _groups(rank, world_size):
        n = dist.get_world_size(group)
        where = f"rank {rank} {label} {overrides or ''}"
        full = _llama(**overrides)
        with torch.no_grad():
            want_logits = full(ids).logits
        want_tokens = _greedy(full, ids, 6)
        full_count = sum(p.numel() for _, p in full.named_parameters(remove_duplicate=False))  # tied weights: twice
        model = plan.shard_llama(_llama(**overrides), group=group)
        with torch.no_grad():
            logits = model(ids).logits
        if logits.shape != want_logits.shape or (logits - want_logits).abs().max() > 1e-4:
            failures.append(f"{where}: logits differ from the full model "
                            f"({(logits - want_logits).abs().max():.2e})" if logits.shape == want_logits.shape
                            else f"{where}: logits shape {tuple(logits.shape)}")
        tokens = _greedy(model, ids, 6)
        if not torch.equal(tokens, want_tokens):
            failures.append(f"{where}: greedy tokens with KV cache {tokens.tolist()} != full model's {want_tokens.tolist()}")
        mine = sum(p.numel() for p in model.parameters())
        replicated = sum(p.numel() for name, p in full.named_parameters() if "norm" in name)
        kv = sum(p.numel() for name, p in full.named_parameters() if "k_proj" in name or "v_proj" in name)
        kv_heads = full.config.num_key_value_heads
        expected = (full_count - replicated - kv) // n + kv // min(n, kv_heads) + replicated
        if mine != expected:
            failures.append(f"{where}: this rank holds {mine} parameters; expected {expected} (1/world_size of "
                            "every projection and embedding, K/V heads copied when world_size > num_kv_heads, "
                            "plus the replicated norms)")
        # The vocabulary-parallel pieces on their own.
        torch.manual_seed(7)
        emb = nn.Embedding(16 * n, 5)
        tokens_in = torch.randint(0, 16 * n, (3, 4))
        vp = tp.VocabParallelEmbedding.from_embedding(emb, group=group)
        with torch.no_grad():
            if (vp(tokens_in) - emb(tokens_in)).abs().max() > TOL:
                failures.append(f"{where}: VocabParallelEmbedding differs from nn.Embedding")
        full_logits = torch.randn(3, 4, 16 * n)
        full_logits[0, 0, :] = 1.0        # a tie across every rank: the lowest id wins, as in torch.argmax
        r = dist.get_rank(group)
        got = tp.parallel_argmax(full_logits[..., r * 16:(r + 1) * 16], group=group)
        if not torch.equal(got, full_logits.argmax(-1)):
            failures.append(f"{where}: parallel_argmax {got.tolist()} != argmax of the full logits")
    return failures


@pytest.mark.exercise("2.5", "TP plan for a transformers Llama")
@pytest.mark.parametrize("world_size,overrides", [(1, {}), (2, {}), (4, {}),
                                                  (4, {"num_key_value_heads": 2}),   # KV heads replicated
                                                  (2, {"tie_word_embeddings": True})])
def test_shard_llama(world_size, overrides):
    import transformers  # noqa: F401  (imported here, once: the forked ranks inherit it instead of importing it 4x)
    from transformers import DynamicCache, LlamaForCausalLM  # noqa: F401
    _check_all(launch(_llama_job, world_size, overrides, show_output=False))


@pytest.mark.exercise("2.5", "TP plan for a transformers Llama")
def test_shard_llama_not_divisible():
    plan = load_impl("tp_llama")
    with pytest.raises(ValueError, match=r"not divisible by world_size=3"):
        plan.shard_llama(_llama(), rank=0, world_size=3)
