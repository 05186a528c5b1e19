"""Wrong answers to chapter 2's exercises, planted in the reference solutions, for
tests/graders/test_ch02_tensor_parallel.py::test_planted_mistakes_are_caught.

Each variant is a realistic mistake; most compute the RIGHT forward numbers the wrong way (a missing
conjugate operator, a bias before the reduction, an extra collective, a replicated weight), so only a grader
that checks bytes, collectives and gradients catches them. `build(name)` returns an implementation object
(`.tensor_parallel`, `.tp_llama`) that the graders' check functions accept in place of load_impl(...).
Imports the reference answers lazily: absent in an instructor's clean checkout, the planted test skips.
"""
from __future__ import annotations

import copy
import types
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class Variant:
    exercise: str
    check: str                  # which grading check runs it (see CHECKS / ERROR_CHECKS in the grader)
    what: str
    points_at: tuple            # the first failure message must contain one of these
    overrides: dict = field(default_factory=dict)   # Llama config for check == "llama" (2 ranks)


VARIANTS = {
    "col_no_copy_to": Variant("2.1", "column", "forward without copy_to_tensor_model_parallel_region", ("dL/dx",)),
    "col_gather_then_slice": Variant("2.1", "column", "gather_output=False by all-gathering then slicing",
                                     ("expected no collective",)),
    "col_full_weight": Variant("2.1", "column", "the whole weight on every rank, output sliced", ("slice",)),
    "col_raw_gather": Variant("2.1", "column", "bare dist.all_gather for gather_output=True (no autograd)",
                              ("backward",)),
    "col_floor_split": Variant("2.1", "column_errors", "out_features // world_size, no ValueError", ("no ValueError",)),
    "row_bias_on_rank0": Variant("2.2", "row", "bias on rank 0 only, before the all-reduce", ("dL/db",)),
    "row_bias_divided": Variant("2.2", "row", "bias / world_size on every rank, before the all-reduce", ("dL/db",)),
    "row_plain_slice": Variant("2.2", "row", "input sliced by indexing, not scatter_to", ("dL/dx",)),
    "row_gather_partials": Variant("2.2", "row", "partial sums all-gathered and added locally",
                                   ("expected all_reduce",)),
    "row_floor_split": Variant("2.2", "row_errors", "in_features // world_size, no ValueError", ("no ValueError",)),
    "mlp_gathered": Variant("2.3", "mlp", "fc1 gathers, fc2 re-slices: two collectives", ("expected all_reduce",)),
    "mlp_bare_all_reduce": Variant("2.3", "mlp", "bare all-reduce, no copy_to in fc1", ("dL/dx",)),
    "mlp_replicated": Variant("2.3", "mlp", "the whole MLP on every rank", ("slice",)),
    "attn_kv_no_copy_to": Variant("2.4", "attention", "K/V projections without copy_to (issue 11)", ("dL/dx",)),
    "attn_replicated": Variant("2.4", "attention", "the whole attention on every rank", ("slice",)),
    "attn_gather_heads": Variant("2.4", "attention", "head outputs all-gathered, o_proj whole on every rank",
                                 ("o_proj",)),
    "attn_kv_rule_ignored": Variant("2.4", "attention_errors", "KV heads cut without the KV-head rule",
                                    ("no ValueError",)),
    "vocab_full_table": Variant("2.5", "vocab", "the whole embedding table on every rank", ("slice",)),
    "argmax_gathers_logits": Variant("2.5", "vocab", "parallel_argmax all-gathers the logits", ("carried",)),
    "argmax_tie_highest": Variant("2.5", "vocab", "ties resolved to the highest id", ("ties",)),
    "llama_kv_no_copy_to": Variant("2.5", "llama", "replicated K/V heads without copy_to (issue 11)",
                                   ("copy_to_tensor_model_parallel_region",), {"num_key_value_heads": 1}),
    "llama_head_replicated": Variant("2.5", "llama", "lm_head whole on every rank", ("parameters", "all_gather")),
    "llama_groups_stale": Variant("2.5", "llama", "num_key_value_groups left at the full model's (only eager "
                                  "attention reads it)", ("num_key_value_groups",), {"num_key_value_heads": 1}),
    "llama_kv_colwise": Variant("2.5", "llama_errors", "K/V always column-split, KV-head rule ignored",
                                ("no ValueError",)),
}


def _plain_linear(linear: nn.Linear) -> nn.Linear:
    """A plain nn.Linear with the same weights (no region operator in its forward)."""
    out = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None)
    with torch.no_grad():
        out.weight.copy_(linear.weight)
        if linear.bias is not None:
            out.bias.copy_(linear.bias)
    return out


def build(name: str | None):
    """The reference implementation with variant `name` planted (None: unmodified)."""
    import solutions.tensor_parallel as sol
    import solutions.tp_llama as sol_plan
    tp = types.SimpleNamespace(**{k: v for k, v in vars(sol).items() if not k.startswith("__")})
    plan = types.SimpleNamespace(**{k: v for k, v in vars(sol_plan).items() if not k.startswith("__")})
    if name is not None:
        _PLANT[name](sol, sol_plan, tp, plan)
    return types.SimpleNamespace(tensor_parallel=tp, tp_llama=plan)


# ------------------------------------------------------------------------------------ the mistakes

def _col_no_copy_to(sol, sol_plan, tp, plan):
    class Column(sol.ColumnParallelLinear):
        def forward(self, x):
            y = F.linear(x, self.weight, self.bias)                      # no copy_to: dL/dx is partial
            return sol.gather_from_tensor_model_parallel_region(y, self.group) if self.gather_output else y
    tp.ColumnParallelLinear = Column


def _col_gather_then_slice(sol, sol_plan, tp, plan):
    class Column(sol.ColumnParallelLinear):
        def forward(self, x):
            x = sol.copy_to_tensor_model_parallel_region(x, self.group)
            y = sol.gather_from_tensor_model_parallel_region(F.linear(x, self.weight, self.bias), self.group)
            return y if self.gather_output else y[
                ..., self.rank * self.out_per_rank:(self.rank + 1) * self.out_per_rank]
    tp.ColumnParallelLinear = Column


def _col_full_weight(sol, sol_plan, tp, plan):
    class Column(sol.ColumnParallelLinear):
        @classmethod
        def from_linear(cls, linear, rank=None, world_size=None, group=None, gather_output=True):
            layer = super().from_linear(linear, rank, world_size, group, gather_output)
            layer.weight = nn.Parameter(linear.weight.detach().clone())
            layer.bias = nn.Parameter(linear.bias.detach().clone()) if linear.bias is not None else None
            return layer

        def forward(self, x):
            y = F.linear(x, self.weight, self.bias)
            return y if self.gather_output else y[
                ..., self.rank * self.out_per_rank:(self.rank + 1) * self.out_per_rank]
    tp.ColumnParallelLinear = Column


def _col_raw_gather(sol, sol_plan, tp, plan):
    class Column(sol.ColumnParallelLinear):
        def forward(self, x):
            y = F.linear(sol.copy_to_tensor_model_parallel_region(x, self.group), self.weight, self.bias)
            if not self.gather_output:
                return y
            parts = [torch.empty_like(y) for _ in range(self.world_size)]
            dist.all_gather(parts, y.contiguous(), group=self.group)     # no autograd: the graph stops here
            return torch.cat(parts, dim=-1)
    tp.ColumnParallelLinear = Column


def _col_floor_split(sol, sol_plan, tp, plan):
    class Column(sol.ColumnParallelLinear):
        def __init__(self, in_features, out_features, bias=True, gather_output=True, group=None, rank=None,
                     world_size=None):
            nn.Module.__init__(self)
            self.rank, self.world_size = sol.group_rank_and_size(rank, world_size, group)
            self.in_features, self.out_features = in_features, out_features
            self.out_per_rank = out_features // self.world_size          # silently drops the remainder
            self.gather_output, self.group = gather_output, group
            self.weight = nn.Parameter(torch.empty(self.out_per_rank, in_features))
            self.bias = nn.Parameter(torch.zeros(self.out_per_rank)) if bias else None

        @classmethod
        def from_linear(cls, linear, rank=None, world_size=None, group=None, gather_output=True):
            layer = cls(linear.in_features, linear.out_features, linear.bias is not None, gather_output, group,
                        rank, world_size)
            with torch.no_grad():
                rows = slice(layer.rank * layer.out_per_rank, (layer.rank + 1) * layer.out_per_rank)
                layer.weight.copy_(linear.weight[rows])
            return layer
    tp.ColumnParallelLinear = Column


def _row_forward(mode):
    def forward(self, x):
        s = sol_module()
        if not self.input_is_parallel:
            if mode == "plain_slice":        # plain indexing: backward puts dL/dx in this rank's slice only
                x = x[..., self.rank * self.in_per_rank:(self.rank + 1) * self.in_per_rank]
            else:
                x = s.scatter_to_tensor_model_parallel_region(x, self.group)
        if mode == "rank0":
            return s.reduce_from_tensor_model_parallel_region(
                F.linear(x, self.weight, self.bias if self.rank == 0 else None), self.group)
        if mode == "divided":
            return s.reduce_from_tensor_model_parallel_region(
                F.linear(x, self.weight, None if self.bias is None else self.bias / self.world_size), self.group)
        if mode == "gather_partials":
            parts = s.gather_from_tensor_model_parallel_region(F.linear(x, self.weight), self.group)
            y = parts.unflatten(-1, (self.world_size, self.out_features)).sum(-2)
        else:
            y = s.reduce_from_tensor_model_parallel_region(F.linear(x, self.weight), self.group)
        return y + self.bias if self.bias is not None else y
    return forward


def sol_module():
    import solutions.tensor_parallel as sol
    return sol


def _row(mode):
    def plant(sol, sol_plan, tp, plan):
        tp.RowParallelLinear = type("RowParallelLinear", (sol.RowParallelLinear,), {"forward": _row_forward(mode)})
    return plant


def _row_floor_split(sol, sol_plan, tp, plan):
    class Row(sol.RowParallelLinear):
        @classmethod
        def from_linear(cls, linear, rank=None, world_size=None, group=None, input_is_parallel=False):
            rank, world_size = sol.group_rank_and_size(rank, world_size, group)
            fake = nn.Linear(linear.in_features // world_size * world_size, linear.out_features)  # drops columns
            return super().from_linear(fake, rank, world_size, group, input_is_parallel)
    tp.RowParallelLinear = Row


def _mlp_gathered(sol, sol_plan, tp, plan):
    class MLP(sol.ParallelMLP):
        @classmethod
        def from_mlp(cls, mlp, rank=None, world_size=None, group=None):
            fc1 = sol.ColumnParallelLinear.from_linear(mlp.fc1, rank, world_size, group=group, gather_output=True)
            fc2 = sol.RowParallelLinear.from_linear(mlp.fc2, rank, world_size, group=group, input_is_parallel=False)
            return cls(fc1, fc2)
    tp.ParallelMLP = MLP


def _mlp_bare_all_reduce(sol, sol_plan, tp, plan):
    class MLP(sol.ParallelMLP):
        def forward(self, x):                                      # chapter 2 §9's "bare all-reduce"
            partial = F.linear(F.gelu(F.linear(x, self.fc1.weight, self.fc1.bias)), self.fc2.weight)
            summed = partial.detach().clone()
            dist.all_reduce(summed, group=self.fc2.group)
            return partial + (summed - partial).detach() + self.fc2.bias
    tp.ParallelMLP = MLP


def _mlp_replicated(sol, sol_plan, tp, plan):
    class MLP(sol.ParallelMLP):
        @classmethod
        def from_mlp(cls, mlp, rank=None, world_size=None, group=None):
            return cls(copy.deepcopy(mlp.fc1), copy.deepcopy(mlp.fc2))
    tp.ParallelMLP = MLP


def _attn_kv_no_copy_to(sol, sol_plan, tp, plan):
    class Attention(sol.ParallelAttention):
        @classmethod
        def from_attention(cls, attn, rank=None, world_size=None, group=None):
            layer = super().from_attention(attn, rank, world_size, group)
            layer.k_proj, layer.v_proj = _plain_linear(layer.k_proj), _plain_linear(layer.v_proj)
            return layer
    tp.ParallelAttention = Attention


def _attn_replicated(sol, sol_plan, tp, plan):
    class Attention(sol.ParallelAttention):
        @classmethod
        def from_attention(cls, attn, rank=None, world_size=None, group=None):
            sol.kv_heads_for_rank(attn.num_heads, attn.num_kv_heads, 0, dist.get_world_size(group))
            a = copy.deepcopy(attn)
            return cls(a.q_proj, a.k_proj, a.v_proj, a.o_proj, a.num_heads, a.num_kv_heads, a.head_dim)
    tp.ParallelAttention = Attention


def _attn_gather_heads(sol, sol_plan, tp, plan):
    class Attention(sol.ParallelAttention):
        @classmethod
        def from_attention(cls, attn, rank=None, world_size=None, group=None):
            layer = super().from_attention(attn, rank, world_size, group)
            layer.o_proj, layer.group = copy.deepcopy(attn.o_proj), group
            return layer

        def forward(self, x):
            from helpers.course.transformer_layers import causal_attention
            b, s, _ = x.shape
            q = self.q_proj(x).view(b, s, self.num_heads, self.head_dim).transpose(1, 2)
            k = self.k_proj(x).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
            v = self.v_proj(x).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
            out = causal_attention(q, k, v).transpose(1, 2).reshape(b, s, -1)
            return self.o_proj(sol.gather_from_tensor_model_parallel_region(out, self.group))
    tp.ParallelAttention = Attention


def _attn_kv_rule_ignored(sol, sol_plan, tp, plan):
    class Attention(sol.ParallelAttention):
        @classmethod
        def from_attention(cls, attn, rank=None, world_size=None, group=None):
            rank, world_size = sol.group_rank_and_size(rank, world_size, group)
            per_rank = max(1, attn.num_kv_heads // world_size)           # no rule: floor, never an error
            first = rank * per_rank % attn.num_kv_heads
            q = sol.ColumnParallelLinear.from_linear(attn.q_proj, rank, world_size, group=group, gather_output=False)
            o = sol.RowParallelLinear.from_linear(attn.o_proj, rank, world_size, group=group, input_is_parallel=True)
            k, v = (sol.head_slice(p, first, per_rank, attn.head_dim, group=group) for p in (attn.k_proj, attn.v_proj))
            return cls(q, k, v, o, attn.num_heads // world_size, per_rank, attn.head_dim)
    tp.ParallelAttention = Attention


def _vocab_full_table(sol, sol_plan, tp, plan):
    class Vocab(sol.VocabParallelEmbedding):
        @classmethod
        def from_embedding(cls, embedding, rank=None, world_size=None, group=None):
            layer = super().from_embedding(embedding, rank, world_size, group)
            layer.weight = nn.Parameter(embedding.weight.detach().clone())
            return layer

        def forward(self, ids):
            return F.embedding(ids, self.weight)
    tp.VocabParallelEmbedding = Vocab


def _argmax_gathers_logits(sol, sol_plan, tp, plan):
    def parallel_argmax(local_logits, group=None):
        parts = [torch.empty_like(local_logits) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, local_logits.contiguous(), group=group)
        return torch.cat(parts, dim=-1).argmax(dim=-1)
    tp.parallel_argmax = parallel_argmax


def _argmax_tie_highest(sol, sol_plan, tp, plan):
    def parallel_argmax(local_logits, group=None):
        rank, world_size = dist.get_rank(group), dist.get_world_size(group)
        value, index = local_logits.max(dim=-1)
        pair = torch.stack([value.double(), (index + rank * local_logits.shape[-1]).double()], dim=-1)
        pairs = [torch.empty_like(pair) for _ in range(world_size)]
        dist.all_gather(pairs, pair, group=group)
        values = torch.stack([p[..., 0] for p in pairs], dim=-1)
        indices = torch.stack([p[..., 1] for p in pairs], dim=-1)
        best = world_size - 1 - values.flip(-1).argmax(dim=-1, keepdim=True)   # the LAST maximum
        return indices.gather(-1, best).squeeze(-1).long()
    tp.parallel_argmax = parallel_argmax


def _llama_kv_no_copy_to(sol, sol_plan, tp, plan):
    def shard_llama(model, rank=None, world_size=None, group=None):
        model = sol_plan.shard_llama(model, rank, world_size, group)
        for layer in model.model.layers:
            attn = layer.self_attn
            if not isinstance(attn.k_proj, sol.ColumnParallelLinear):        # the replicated branch
                attn.k_proj, attn.v_proj = _plain_linear(attn.k_proj), _plain_linear(attn.v_proj)
        return model
    plan.shard_llama = shard_llama


def _llama_head_replicated(sol, sol_plan, tp, plan):
    def shard_llama(model, rank=None, world_size=None, group=None):
        head = copy.deepcopy(model.lm_head)
        model = sol_plan.shard_llama(model, rank, world_size, group)
        model.lm_head = head
        return model
    plan.shard_llama = shard_llama


def _llama_groups_stale(sol, sol_plan, tp, plan):
    def shard_llama(model, rank=None, world_size=None, group=None):
        groups = [layer.self_attn.num_key_value_groups for layer in model.model.layers]
        model = sol_plan.shard_llama(model, rank, world_size, group)
        for layer, g in zip(model.model.layers, groups):
            layer.self_attn.num_key_value_groups = g
        return model
    plan.shard_llama = shard_llama


def _llama_kv_colwise(sol, sol_plan, tp, plan):
    def shard_llama(model, rank=None, world_size=None, group=None):
        rank, world_size = sol.group_rank_and_size(rank, world_size, group)
        column = dict(rank=rank, world_size=world_size, group=group)
        config = model.config
        model.model.embed_tokens = sol.VocabParallelEmbedding.from_embedding(model.model.embed_tokens, **column)
        for layer in model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            for name in ("q_proj", "k_proj", "v_proj"):                       # K/V split like Q, no rule
                setattr(attn, name,
                        sol.ColumnParallelLinear.from_linear(getattr(attn, name), gather_output=False, **column))
            attn.o_proj = sol.RowParallelLinear.from_linear(attn.o_proj, input_is_parallel=True, **column)
            attn.num_key_value_groups = max(1, config.num_attention_heads // config.num_key_value_heads)
            mlp.gate_proj = sol.ColumnParallelLinear.from_linear(mlp.gate_proj, gather_output=False, **column)
            mlp.up_proj = sol.ColumnParallelLinear.from_linear(mlp.up_proj, gather_output=False, **column)
            mlp.down_proj = sol.RowParallelLinear.from_linear(mlp.down_proj, input_is_parallel=True, **column)
        model.lm_head = sol.ColumnParallelLinear.from_linear(model.lm_head, gather_output=True, **column)
        return model
    plan.shard_llama = shard_llama


_PLANT = {
    "col_no_copy_to": _col_no_copy_to, "col_gather_then_slice": _col_gather_then_slice,
    "col_full_weight": _col_full_weight, "col_raw_gather": _col_raw_gather, "col_floor_split": _col_floor_split,
    "row_bias_on_rank0": _row("rank0"), "row_bias_divided": _row("divided"), "row_plain_slice": _row("plain_slice"),
    "row_gather_partials": _row("gather_partials"), "row_floor_split": _row_floor_split,
    "mlp_gathered": _mlp_gathered, "mlp_bare_all_reduce": _mlp_bare_all_reduce, "mlp_replicated": _mlp_replicated,
    "attn_kv_no_copy_to": _attn_kv_no_copy_to, "attn_replicated": _attn_replicated,
    "attn_gather_heads": _attn_gather_heads, "attn_kv_rule_ignored": _attn_kv_rule_ignored,
    "vocab_full_table": _vocab_full_table, "argmax_gathers_logits": _argmax_gathers_logits,
    "argmax_tie_highest": _argmax_tie_highest, "llama_kv_no_copy_to": _llama_kv_no_copy_to,
    "llama_head_replicated": _llama_head_replicated, "llama_kv_colwise": _llama_kv_colwise,
    "llama_groups_stale": _llama_groups_stale,
}
assert set(_PLANT) == set(VARIANTS)


# ------------------------------------------------------------ valid alternatives: these must pass the graders

ALTERNATIVES = {   # name -> (grading check, what differs from the reference)
    "alt_col_gather_into_tensor": ("column",
                                   "gather_output=True through all_gather_into_tensor in an autograd Function"),
    "alt_attn_one_copy_to": ("attention", "one copy_to on x, q/k/v computed with F.linear on the shards' weights"),
    "alt_attn_colwise_kv": ("attention", "K/V as ColumnParallelLinear when world_size divides the KV heads"),
    "alt_argmax_two_all_reduces": ("vocab", "parallel_argmax by all-reduce MAX of values, then MIN of the ids"),
}


def build_alternative(name: str):
    impl = build(None)
    tp = impl.tensor_parallel
    import solutions.tensor_parallel as sol
    if name == "alt_col_gather_into_tensor":
        class _Gather(torch.autograd.Function):
            @staticmethod
            def forward(ctx, y, group):
                ctx.group = group
                n = dist.get_world_size(group)
                y = y.contiguous()
                out = torch.empty((n * y.shape[0],) + tuple(y.shape[1:]), dtype=y.dtype)   # ranks stacked on dim 0
                dist.all_gather_into_tensor(out, y, group=group)
                return torch.cat(out.chunk(n, dim=0), dim=-1)

            @staticmethod
            def backward(ctx, grad):
                n, r = dist.get_world_size(ctx.group), dist.get_rank(ctx.group)
                return grad.chunk(n, dim=-1)[r].contiguous(), None

        class Column(sol.ColumnParallelLinear):
            def forward(self, x):
                y = F.linear(sol.copy_to_tensor_model_parallel_region(x, self.group), self.weight, self.bias)
                return _Gather.apply(y, self.group) if self.gather_output and self.world_size > 1 else y
        tp.ColumnParallelLinear = Column
    elif name == "alt_attn_one_copy_to":
        class Attention(sol.ParallelAttention):
            @classmethod
            def from_attention(cls, attn, rank=None, world_size=None, group=None):
                layer = super().from_attention(attn, rank, world_size, group)
                layer.group = group
                return layer

            def forward(self, x):
                from helpers.course.transformer_layers import causal_attention
                b, s, _ = x.shape
                x = sol.copy_to_tensor_model_parallel_region(x, self.group)      # one operator for q, k and v
                q = F.linear(x, self.q_proj.weight).view(b, s, self.num_heads, self.head_dim).transpose(1, 2)
                k = F.linear(x, self.k_proj.weight).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
                v = F.linear(x, self.v_proj.weight).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
                return self.o_proj(causal_attention(q, k, v).transpose(1, 2).reshape(b, s, -1))
        tp.ParallelAttention = Attention
    elif name == "alt_attn_colwise_kv":
        class Attention(sol.ParallelAttention):
            @classmethod
            def from_attention(cls, attn, rank=None, world_size=None, group=None):
                layer = super().from_attention(attn, rank, world_size, group)
                rank, world_size = sol.group_rank_and_size(rank, world_size, group)
                if attn.num_kv_heads % world_size == 0:
                    layer.k_proj, layer.v_proj = (
                        sol.ColumnParallelLinear.from_linear(p, rank, world_size, group=group, gather_output=False)
                        for p in (attn.k_proj, attn.v_proj))
                return layer
        tp.ParallelAttention = Attention
    elif name == "alt_argmax_two_all_reduces":
        def parallel_argmax(local_logits, group=None):
            rank = dist.get_rank(group)
            value, index = local_logits.max(dim=-1)
            index = index + rank * local_logits.shape[-1]
            best = value.clone()
            dist.all_reduce(best, op=dist.ReduceOp.MAX, group=group)
            candidate = torch.where(value == best, index, torch.full_like(index, torch.iinfo(torch.int64).max))
            dist.all_reduce(candidate, op=dist.ReduceOp.MIN, group=group)
            return candidate
        tp.parallel_argmax = parallel_argmax
    else:
        raise KeyError(name)
    return impl
