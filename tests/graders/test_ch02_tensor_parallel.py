"""Graders for chapter 2 (labs/tensor_parallel.py, labs/tp_llama.py).

Each exercise has one check function `check_*(impl, rank, world_size, group, label) -> [failure, ...]` run
inside every rank of a real job: the graders run it on the implementation under test (COURSE_IMPL), and
tests/graders/planted_ch02.py runs the same functions on wrong answers planted in the reference solution
(`test_planted_mistakes_are_caught`, no exercise marker). Every full reference layer is built from a fixed
seed on every rank, so all ranks shard the same weights. At world_size 4 each job also runs the layer inside
two sub-groups {0,1} and {2,3} (the `group=` argument).

What the graders check, for every exercise: the output against the single-process layer; WHO HOLDS WHICH
BYTES (each rank's parameters are exactly its slice of the full ones: shapes, values, bytes); WHICH
COLLECTIVES the forward pass calls and in which group (CommTracer); GRADIENTS (dL/dx and each rank's weight
and bias gradients against the same slice of the single-process gradients: the layers claim autograd
support through the conjugate region operators); every error the docstrings promise.

Mistakes each grader catches (each one planted in tests/graders/planted_ch02.py and asserted caught):
  2.1 ColumnParallelLinear
      col_no_copy_to        forward without copy_to_tensor_model_parallel_region: dL/dx is this rank's share only
      col_gather_then_slice gather_output=False computed by all-gathering the output and slicing it
      col_full_weight       every rank keeps the whole weight and slices the output
      col_raw_gather        gather_output=True with a bare dist.all_gather (no autograd): no gradient reaches W
      col_floor_split       out_features // world_size without the promised ValueError
  2.2 RowParallelLinear
      row_bias_on_rank0     bias added on rank 0 only, before the all-reduce (right output; bias gradient
                            zero on the other ranks)
      row_bias_divided      bias / world_size added on every rank before the all-reduce (right output;
                            bias gradient 1/world_size of the true one)
      row_plain_slice       input_is_parallel=False sliced with plain indexing instead of scatter_to: dL/dx
                            holds this rank's slice only
      row_gather_partials   partial sums all-gathered and added locally instead of one all-reduce
      row_floor_split       in_features // world_size without the promised ValueError
  2.3 ParallelMLP
      mlp_gathered          fc1 gather_output=True -> fc2 input_is_parallel=False: an all-gather too
      mlp_bare_all_reduce   fc1 without copy_to (the bare all-reduce of §9): dL/dx wrong
      mlp_replicated        the whole MLP on every rank: no collective, no saving
  2.4 ParallelAttention (and the given ParallelTransformerBlock)
      attn_kv_no_copy_to    K/V projections without copy_to (issue 11's bug): dL/dx misses the other ranks' K/V share
      attn_replicated       the whole attention on every rank
      attn_gather_heads     head outputs all-gathered, o_proj applied whole on every rank
  2.5 VocabParallelEmbedding, parallel_argmax, shard_llama
      vocab_full_table      the whole embedding table on every rank (right output, no all-reduce)
      argmax_gathers_logits parallel_argmax all-gathers the logits themselves
      argmax_tie_highest    ties resolved to the highest id (torch.argmax takes the lowest)
      llama_kv_no_copy_to   replicated K/V heads without copy_to (issue 11's bug in the plan): wrong gradients
      llama_head_replicated lm_head kept whole on every rank
      llama_kv_colwise      K/V always column-split, ignoring the KV-head rule (no ValueError; half heads)
      llama_groups_stale    num_key_value_groups left at the full model's: SDPA infers the groups from the
                            shapes, eager attention reads the attribute (the logits are checked under both)

Valid alternatives that must still pass (tests/graders/planted_ch02.py ALTERNATIVES, `test_valid_alternatives_pass`):
all_gather_into_tensor instead of all_gather for gather_output; one copy_to on x shared by q, k and v;
ColumnParallelLinear K/V when world_size divides the KV heads; parallel_argmax by two all-reduces (MAX of
the values, MIN of the winning ids). The backward collectives are not counted, so fused or per-projection
copy_to both pass.
"""
import re

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

from helpers import launch, load_impl
from helpers.claims import max_abs_diff, tolerance
from helpers.comm_trace import CommTracer
from helpers.course.transformer_layers import MLP, Attention, TransformerBlock
from tests.graders.planted import assert_caught, names, record

WORLD_SIZES = [1, 2, 4]
# Rounding budget (helpers.claims policy: factor × eps(float32) × max|reference|). The layers reorder sums
# of at most 64 products and the attention/backward chains add a few more roundings; 64 ulps is ample.
FACTOR = 64
# A two-layer Llama: logits and gradients pass through ~20 reordered matmuls, softmax and RMSNorm.
LLAMA_FACTOR = 256
GATHERS = {"all_gather", "all_gather_into_tensor", "all_gather_single"}
LOOK = "look at {}"


# ------------------------------------------------------------------------------------- shared pieces

def _groups(rank, world_size):
    """[(group, label)]: the whole world, plus (at world size 4) this rank's half as a sub-group."""
    out = [(None, "WORLD")]
    if world_size == 4:
        halves = [dist.new_group([0, 1]), dist.new_group([2, 3])]   # every rank creates every group
        out.append((halves[rank // 2], f"sub-group {[0, 1] if rank < 2 else [2, 3]}"))
    return out


def _tp(impl):
    return impl.tensor_parallel if impl is not None else load_impl("tensor_parallel")


def _plan(impl):
    return impl.tp_llama if impl is not None else load_impl("tp_llama")


def _group_ranks(group):
    return tuple(dist.get_process_group_ranks(group)) if group is not None else tuple(range(dist.get_world_size()))


def _call(where, what, hint, fn, *args, **kwargs):
    """Run learner code; an error other than the stub's NotImplementedError says where it happened."""
    try:
        return fn(*args, **kwargs)
    except NotImplementedError:
        raise
    except Exception as exc:
        raise AssertionError(f"{where}: {what} raised {type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else ''}"
                             f" — {hint}") from exc


def _where_first(hint):
    """'explanation (labs/x.py: Name.method)' -> 'look at labs/x.py: Name.method — explanation', so the place to
    look survives a report that keeps only the first few hundred characters."""
    m = re.match(r"^(.*) \((labs/[^()]*)\)$", hint, re.S)
    return f"look at {m[2]}: {m[1]}" if m else hint


def _close(failures, where, what, got, want, hint, factor=FACTOR) -> bool:
    """Append a failure naming the case, expected vs got, and where to look unless got ≈ want."""
    hint = _where_first(hint)
    if got is None:
        failures.append(f"{where}: {what} is None, expected a tensor of shape {tuple(want.shape)} — {hint}")
        return False
    if tuple(got.shape) != tuple(want.shape):
        failures.append(f"{where}: {what} has shape {tuple(got.shape)}, expected {tuple(want.shape)} — {hint}")
        return False
    diff, tol = max_abs_diff(got.detach(), want.detach()), tolerance(want, torch.float32, factor)
    if not diff <= tol:
        failures.append(f"{where}: {what} ≠ one process's: max |diff| {diff:.1e} > {tol:.1e} "
                        f"({factor} eps × {float(want.abs().max()):.2g}) — {hint}")
        return False
    return True


def _holds(failures, where, params: dict, hint):
    """Who holds which bytes: each named parameter is exactly the expected slice of the full weight (shape,
    values), and the module holds nothing else (checked by the caller through parameter bytes)."""
    hint = _where_first(hint)
    for name, (got, want) in params.items():
        if want is None:
            if got is not None:
                failures.append(f"{where}: {name} should be None (the full layer has none), "
                                f"got {tuple(got.shape)} — {hint}")
            continue
        if got is None:
            failures.append(f"{where}: {name} is missing: expected this rank's slice {tuple(want.shape)} — {hint}")
        elif tuple(got.shape) != tuple(want.shape):
            failures.append(f"{where}: {name} has shape {tuple(got.shape)}, expected this rank's slice "
                            f"{tuple(want.shape)} — {hint}")
        elif not torch.equal(got.detach(), want.detach()):
            failures.append(f"{where}: {name} has the right shape but not this rank's slice of the full weight "
                            f"(max |diff| {max_abs_diff(got.detach(), want.detach()):.2e}) — {hint}")


def _bytes(failures, where, module, expected, hint):
    from helpers.course.memory import parameter_bytes
    hint = _where_first(hint)
    got = parameter_bytes(module)
    if got != expected:
        failures.append(f"{where}: this rank holds {got:,} B of parameters, expected {expected:,} B (its shard "
                        f"only) — {hint}")


def _collectives(failures, where, trace, expected, group, hint):
    """The forward pass's collectives: `expected` is a list of sets of accepted op names, one per call, in
    order (e.g. [GATHERS]); every call must run in `group`. Not checked on one rank (nothing to exchange)."""
    if dist.get_world_size(group) == 1:
        return
    hint = _where_first(hint)
    ranks = _group_ranks(group)
    got = [r.op for r in trace.records]
    ok = len(got) == len(expected) and all(op in accepted for op, accepted in zip(got, expected))
    if not ok:
        want = _runs(["/".join(sorted(s)) for s in expected]) or "no collective"
        failures.append(f"{where}: the forward pass called {_runs(got) or 'no collective'}; expected {want} — {hint}")
    wrong = sorted({r.ranks for r in trace.records if tuple(r.ranks) != ranks})
    if wrong:
        failures.append(f"{where}: collectives ran in group(s) {[list(w) for w in wrong]}, expected the layer's "
                        f"group {list(ranks)} — pass group=self.group to every collective and region operator")


def _runs(ops):
    """['all_reduce'] * 5 + ['all_gather'] -> '5 × all_reduce, then all_gather'."""
    out = []
    for op in ops:
        if out and out[-1][0] == op:
            out[-1][1] += 1
        else:
            out.append([op, 1])
    return ", then ".join(f"{n} × {op}" if n > 1 else op for op, n in out)


def _backward(where, hint, y, target):
    _call(where, "backward of (y * target).sum()", hint, lambda: (y * target).sum().backward())


# ----------------------------------------------------------------------------------------- 2.1 column

COLUMN_CASES = [  # (batch shape, in_features, out_features, bias)
    ((3,), 8, 16, True), ((2, 5), 12, 8, False), ((1, 4, 3), 16, 32, True), ((7,), 4, 4, True),
]
COLUMN = "labs/tensor_parallel.py: ColumnParallelLinear"


def check_column(impl, rank, world_size, group, label):
    tp, failures = _tp(impl), []
    n, r = dist.get_world_size(group), dist.get_rank(group)
    for i, (batch, fin, fout, bias) in enumerate(COLUMN_CASES):
        torch.manual_seed(100 + i)
        full = nn.Linear(fin, fout, bias=bias)
        x, target = torch.randn(*batch, fin), torch.randn(*batch, fout)
        x_full = x.clone().requires_grad_(True)
        expected = full(x_full)
        (expected * target).sum().backward()
        rows = slice(r * fout // n, (r + 1) * fout // n)
        for gather in (True, False):
            where = (f"[2.1] rank {rank} {label} in={fin} out={fout} bias={bias} gather_output={gather} "
                     f"x{tuple(x.shape)}")
            layer = _call(where, "ColumnParallelLinear.from_linear", LOOK.format(f"{COLUMN}.from_linear / __init__"),
                          tp.ColumnParallelLinear.from_linear, full, group=group, gather_output=gather)
            _holds(failures, where, {"weight": (layer.weight, full.weight[rows]),
                                     "bias": (layer.bias, full.bias[rows] if bias else None)},
                   f"rank r keeps rows [r·out/n, (r+1)·out/n) of W and of b ({COLUMN}.from_linear)")
            _bytes(failures, where, layer, (fout // n) * (fin + bias) * 4,
                   f"keep only this rank's rows, not the full weight ({COLUMN}.__init__)")
            x_tp = x.clone().requires_grad_(True)
            with CommTracer() as trace:
                y = _call(where, "forward", LOOK.format(f"{COLUMN}.forward"), layer, x_tp)
            want = expected if gather else expected[..., rows]
            _close(failures, where, "output", y, want, "forward: copy_to -> F.linear with the shard -> "
                   f"gather_from only if gather_output ({COLUMN}.forward)")
            _collectives(failures, where, trace, [GATHERS] if gather else [], group,
                         f"gather_output={gather}: "
                         f"{'one all-gather of the output' if gather else 'no collective: each rank keeps its slice'} "
                         f"({COLUMN}.forward)")
            _backward(where, LOOK.format(f"{COLUMN}.forward"), y, target if gather else target[..., rows])
            hint = (f"the backward pass must all-reduce dL/dx (copy_to_tensor_model_parallel_region before the "
                    f"linear{'; gather_from_... for the output' if gather else ''}) ({COLUMN}.forward)")
            _close(failures, where, "dL/dx", x_tp.grad, x_full.grad, hint)
            _close(failures, where, "dL/dW (this rank's rows)", layer.weight.grad, full.weight.grad[rows], hint)
            if bias and layer.bias is not None:
                _close(failures, where, "dL/db (this rank's slice)", layer.bias.grad, full.bias.grad[rows], hint)
    return failures


def check_column_errors(impl):
    tp = _tp(impl)
    try:
        tp.ColumnParallelLinear.from_linear(nn.Linear(6, 10), rank=0, world_size=4)
    except ValueError as exc:
        if "out_features=10 is not divisible by world_size=4" not in str(exc):
            return [f"[2.1] ColumnParallelLinear(6 -> 10) on 4 ranks raised ValueError({exc}); expected the message "
                    f"'out_features=10 is not divisible by world_size=4 ...' ({COLUMN}.__init__)"]
        return []
    return ["[2.1] ColumnParallelLinear(6 -> 10) on 4 ranks raised no ValueError: 10 features have no even split "
            "(the docstring promises ValueError('out_features=10 is not divisible by world_size=4 ...'); "
            f"{COLUMN}.__init__)"]


def _run_checks(rank, world_size, check, impl=None):
    failures = []
    for group, label in _groups(rank, world_size):
        failures += check(impl, rank, world_size, group, label)
    return failures


def _check_all(results):
    bad = [msg for rank_msgs in results for msg in rank_msgs]
    assert not bad, "\n".join(bad[:8]) + (f"\n... and {len(bad) - 8} more" if len(bad) > 8 else "")


@pytest.mark.exercise("2.1", "ColumnParallelLinear (gather_output)")
@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_column_parallel(world_size):
    _check_all(launch(_run_checks, world_size, check_column, show_output=False))


@pytest.mark.exercise("2.1", "ColumnParallelLinear (gather_output)")
def test_column_parallel_not_divisible():
    _check_all([check_column_errors(None)])


# -------------------------------------------------------------------------------------------- 2.2 row

ROW_CASES = [((3,), 16, 8, True), ((2, 5), 8, 12, False), ((1, 4, 3), 32, 16, True), ((7,), 4, 4, True)]
ROW = "labs/tensor_parallel.py: RowParallelLinear"


def check_row(impl, rank, world_size, group, label):
    tp, failures = _tp(impl), []
    n, r = dist.get_world_size(group), dist.get_rank(group)
    for i, (batch, fin, fout, bias) in enumerate(ROW_CASES):
        torch.manual_seed(200 + i)
        full = nn.Linear(fin, fout, bias=bias)
        if bias:
            nn.init.uniform_(full.bias, 1.0, 2.0)   # large, so a bias added n times (or once per rank) shows
        x, target = torch.randn(*batch, fin), torch.randn(*batch, fout)
        x_full = x.clone().requires_grad_(True)
        expected = full(x_full)
        (expected * target).sum().backward()
        cols = slice(r * fin // n, (r + 1) * fin // n)
        for parallel_input in (False, True):
            where = f"[2.2] rank {rank} {label} in={fin} out={fout} bias={bias} input_is_parallel={parallel_input}"
            layer = _call(where, "RowParallelLinear.from_linear", LOOK.format(f"{ROW}.from_linear / __init__"),
                          tp.RowParallelLinear.from_linear, full, group=group, input_is_parallel=parallel_input)
            _holds(failures, where, {"weight": (layer.weight, full.weight[:, cols]),
                                     "bias": (layer.bias, full.bias if bias else None)},
                   f"rank r keeps columns [r·in/n, (r+1)·in/n) of W and the whole bias ({ROW}.from_linear)")
            _bytes(failures, where, layer, (fout * (fin // n) + fout * bias) * 4,
                   f"keep only this rank's columns ({ROW}.__init__)")
            x_tp = (x[..., cols] if parallel_input else x).clone().requires_grad_(True)
            with CommTracer() as trace:
                y = _call(where, "forward", LOOK.format(f"{ROW}.forward"), layer, x_tp)
            _close(failures, where, "output", y, expected,
                   f"the bias must be added once, after the all-reduce, on every rank ({ROW}.forward)")
            _collectives(failures, where, trace, [{"all_reduce"}], group,
                         "one all-reduce of the partial sums (reduce_from_tensor_model_parallel_region) "
                         f"({ROW}.forward)")
            _backward(where, LOOK.format(f"{ROW}.forward"), y, target)
            hint = (f"the input slice must come from scatter_to_tensor_model_parallel_region (backward: all-gather) "
                    f"unless input_is_parallel ({ROW}.forward)")
            _close(failures, where, "dL/dx", x_tp.grad, x_full.grad[..., cols] if parallel_input else x_full.grad, hint)
            _close(failures, where, "dL/dW (this rank's columns)", layer.weight.grad, full.weight.grad[:, cols], hint)
            if bias and layer.bias is not None:
                _close(failures, where, "dL/db", layer.bias.grad, full.bias.grad,
                       f"the whole bias is added once, AFTER the all-reduce, on every rank, "
                       f"so every rank's dL/db is the "
                       f"full one (added before the reduction it gets a share, or nothing) ({ROW}.forward)")
    return failures


def check_row_errors(impl):
    tp = _tp(impl)
    try:
        tp.RowParallelLinear.from_linear(nn.Linear(6, 8), rank=0, world_size=4)
    except ValueError as exc:
        if "in_features=6 is not divisible by world_size=4" not in str(exc):
            return [f"[2.2] RowParallelLinear(6 -> 8) on 4 ranks raised ValueError({exc}); expected the message "
                    f"'in_features=6 is not divisible by world_size=4 ...' ({ROW}.__init__)"]
        return []
    return ["[2.2] RowParallelLinear(6 -> 8) on 4 ranks raised no ValueError: 6 input features have no even split "
            "(the docstring promises ValueError('in_features=6 is not divisible by world_size=4 ...'); "
            f"{ROW}.__init__)"]


@pytest.mark.exercise("2.2", "RowParallelLinear (input_is_parallel, bias once)")
@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_row_parallel(world_size):
    _check_all(launch(_run_checks, world_size, check_row, show_output=False))


@pytest.mark.exercise("2.2", "RowParallelLinear (input_is_parallel, bias once)")
def test_row_parallel_not_divisible():
    _check_all([check_row_errors(None)])


# -------------------------------------------------------------------------------------------- 2.3 MLP

MLP_CASES = [((2, 3), 8, 32), ((5,), 16, 16), ((1, 2, 4), 12, 24)]
PMLP = "labs/tensor_parallel.py: ParallelMLP"


def check_mlp(impl, rank, world_size, group, label):
    tp, failures = _tp(impl), []
    n, r = dist.get_world_size(group), dist.get_rank(group)
    for i, (batch, hidden, ffn) in enumerate(MLP_CASES):
        where = f"[2.3] rank {rank} {label} hidden={hidden} ffn={ffn}"
        torch.manual_seed(300 + i)
        full = MLP(hidden, ffn)
        x, target = torch.randn(*batch, hidden), torch.randn(*batch, hidden)
        x_full = x.clone().requires_grad_(True)
        expected = full(x_full)
        (expected * target).sum().backward()
        rows = slice(r * ffn // n, (r + 1) * ffn // n)

        mlp = _call(where, "ParallelMLP.from_mlp", LOOK.format(f"{PMLP}.from_mlp"), tp.ParallelMLP.from_mlp, full,
                    group=group)
        shard = ("fc1 column-parallel (gather_output=False), fc2 row-parallel (input_is_parallel=True) "
                 f"({PMLP}.from_mlp)")
        fc1, fc2 = getattr(mlp, "fc1", None), getattr(mlp, "fc2", None)
        if fc1 is None or fc2 is None:
            failures.append(f"{where}: ParallelMLP has no fc1/fc2 attributes — {shard}")
        else:
            _holds(failures, where, {"fc1.weight": (fc1.weight, full.fc1.weight[rows]),
                                     "fc1.bias": (fc1.bias, full.fc1.bias[rows]),
                                     "fc2.weight": (fc2.weight, full.fc2.weight[:, rows]),
                                     "fc2.bias": (fc2.bias, full.fc2.bias)},
                   shard)
        _bytes(failures, where, mlp, ((ffn // n) * (hidden + 1) + hidden * (ffn // n) + hidden) * 4, shard)
        x_tp = x.clone().requires_grad_(True)
        with CommTracer() as trace:
            y = _call(where, "forward", LOOK.format(f"{PMLP}.forward"), mlp, x_tp)
        _close(failures, where, "output", y, expected, LOOK.format(f"{PMLP}.forward"))
        _collectives(failures, where, trace, [{"all_reduce"}], group,
                     f"column gather_output=False feeding row input_is_parallel=True needs exactly one all-reduce "
                     f"and nothing between the two layers ({PMLP}.from_mlp)")
        _backward(where, LOOK.format(f"{PMLP}.forward"), y, target)
        hint = (f"the conjugate operators make every gradient equal the single-process one: fc1's input goes through "
                f"copy_to_tensor_model_parallel_region (all-reduce of dL/dx in backward) ({PMLP}, {COLUMN})")
        _close(failures, where, "dL/dx", x_tp.grad, x_full.grad, hint)
        if fc1 is not None and fc2 is not None:
            _close(failures, where, "fc1 dL/dW (this rank's rows)", fc1.weight.grad, full.fc1.weight.grad[rows], hint)
            _close(failures, where, "fc2 dL/dW (this rank's columns)", fc2.weight.grad, full.fc2.weight.grad[:, rows],
                   hint)
            _close(failures, where, "fc2 dL/db", fc2.bias.grad, full.fc2.bias.grad, hint)
    return failures


@pytest.mark.exercise("2.3", "parallel MLP with one all-reduce")
@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_parallel_mlp(world_size):
    _check_all(launch(_run_checks, world_size, check_mlp, show_output=False))


# -------------------------------------------------------------------------------------- 2.4 attention

ATTN_CASES = [  # (hidden, heads, kv_heads, batch, seq)
    (32, 8, 8, 2, 5), (32, 8, 4, 1, 7), (64, 8, 2, 2, 3), (16, 4, 1, 3, 4), (48, 4, 4, 1, 1),
]
PATTN = "labs/tensor_parallel.py: ParallelAttention"


def _replica_sum(grad, group, first_kv, kv_count, kv_heads):
    """Sum each KV head's weight gradient over the ranks that hold a copy of it (all of them hold the same
    count of heads). Returns this rank's head(s)' summed gradient."""
    n = dist.get_world_size(group)
    if kv_heads % n == 0:          # split, not replicated: nothing to sum
        return grad
    grads = [torch.empty_like(grad) for _ in range(n)]
    dist.all_gather(grads, grad.contiguous(), group=group)
    per_head = n // kv_heads
    return sum(grads[first_kv * per_head + k] for k in range(per_head))


def check_attention(impl, rank, world_size, group, label):
    from helpers.course.tp_heads import kv_heads_for_rank
    tp, failures = _tp(impl), []
    n, r = dist.get_world_size(group), dist.get_rank(group)
    for i, (hidden, heads, kv_heads, b, s) in enumerate(ATTN_CASES):
        where = f"[2.4] rank {rank} {label} hidden={hidden} heads={heads} kv_heads={kv_heads}"
        torch.manual_seed(400 + i)
        full = Attention(hidden, heads, kv_heads)
        x, target = torch.randn(b, s, hidden), torch.randn(b, s, hidden)
        x_full = x.clone().requires_grad_(True)
        expected = full(x_full)
        (expected * target).sum().backward()
        hd = full.head_dim
        q_rows = slice(r * heads // n * hd, (r + 1) * heads // n * hd)
        first_kv, kv_count = kv_heads_for_rank(heads, kv_heads, r, n)
        kv_rows = slice(first_kv * hd, (first_kv + kv_count) * hd)

        attn = _call(where, "ParallelAttention.from_attention", LOOK.format(f"{PATTN}.from_attention"),
                     tp.ParallelAttention.from_attention, full, group=group)
        rule = (f"rank r keeps query heads [r·H/n, (r+1)·H/n) and the KV heads kv_heads_for_rank names "
                f"({'split' if kv_heads % n == 0 else 'replicated'} here: heads {first_kv}..{first_kv + kv_count - 1}) "
                f"({PATTN}.from_attention)")
        _holds(failures, where, {"q_proj.weight": (attn.q_proj.weight, full.q_proj.weight[q_rows]),
                                 "k_proj.weight": (attn.k_proj.weight, full.k_proj.weight[kv_rows]),
                                 "v_proj.weight": (attn.v_proj.weight, full.v_proj.weight[kv_rows]),
                                 "o_proj.weight": (attn.o_proj.weight, full.o_proj.weight[:, q_rows])}, rule)
        _bytes(failures, where, attn, (2 * (heads // n) + 2 * kv_count) * hd * hidden * 4, rule)
        if attn.num_heads != heads // n or attn.num_kv_heads != kv_count:
            failures.append(f"{where}: this rank's num_heads, num_kv_heads = {attn.num_heads}, {attn.num_kv_heads}; "
                            f"expected {heads // n}, {kv_count} — {rule}")
        x_tp = x.clone().requires_grad_(True)
        with CommTracer() as trace:
            y = _call(where, "forward", LOOK.format(f"{PATTN}.forward"), attn, x_tp)
        _close(failures, where, "output", y, expected, LOOK.format(f"{PATTN}.forward"))
        _collectives(failures, where, trace, [{"all_reduce"}], group,
                     f"each rank attends with its own heads; the only collective is o_proj's all-reduce ({PATTN})")
        _backward(where, LOOK.format(f"{PATTN}.forward"), y, target)
        hint = (f"q_proj, k_proj AND v_proj all read the full x: each needs copy_to_tensor_model_parallel_region "
                f"(ColumnParallelLinear has it; head_slice(..., group=group) too), or dL/dx misses the other ranks' "
                f"share ({PATTN}.from_attention / forward)")
        _close(failures, where, "dL/dx", x_tp.grad, x_full.grad, hint)
        _close(failures, where, "q_proj dL/dW (this rank's heads)", attn.q_proj.weight.grad,
               full.q_proj.weight.grad[q_rows], hint)
        _close(failures, where, "o_proj dL/dW (this rank's columns)", attn.o_proj.weight.grad,
               full.o_proj.weight.grad[:, q_rows], hint)
        for name in ("k_proj", "v_proj"):
            got = getattr(attn, name).weight.grad
            if got is not None and got.shape == (kv_count * hd, hidden):
                got = _replica_sum(got, group, first_kv, kv_count, kv_heads)
            _close(failures, where,
                   f"{name} dL/dW (this rank's KV heads{', summed over their replicas' if kv_heads % n else ''})",
                   got, getattr(full, name).weight.grad[kv_rows], hint)
    return failures


def check_block(impl, rank, world_size, group, label):
    """The given ParallelTransformerBlock composes 2.3 and 2.4: two all-reduces, single-process gradients."""
    tp, failures = _tp(impl), []
    where = f"[2.4] rank {rank} {label} TransformerBlock(32, 8 heads, 2 KV heads)"
    hint = f"the block composes your ParallelAttention and ParallelMLP: fix those ({PATTN}, {PMLP})"
    torch.manual_seed(450)
    block = TransformerBlock(32, 8, 2, ffn=64)
    x, target = torch.randn(2, 6, 32), torch.randn(2, 6, 32)
    x_full = x.clone().requires_grad_(True)
    expected = block(x_full)
    (expected * target).sum().backward()
    pblock = _call(where, "ParallelTransformerBlock.from_block", hint, tp.ParallelTransformerBlock.from_block, block,
                   group=group)
    x_tp = x.clone().requires_grad_(True)
    with CommTracer() as trace:
        y = _call(where, "forward", hint, pblock, x_tp)
    _close(failures, where, "output", y, expected, hint)
    _collectives(failures, where, trace, [{"all_reduce"}, {"all_reduce"}], group, "two all-reduces per block: " + hint)
    _backward(where, hint, y, target)
    _close(failures, where, "dL/dx", x_tp.grad, x_full.grad, hint)
    _close(failures, where, "norm1 dL/dweight (replicated)", pblock.norm1.weight.grad, block.norm1.weight.grad, hint)
    return failures


def check_attention_errors(impl):
    tp, failures = _tp(impl), []
    for attn, world_size, message in [(Attention(24, 6, 3), 2, "num_kv_heads=3"),
                                      (Attention(24, 6, 6), 4, "num_heads=6 is not divisible by world_size=4")]:
        case = f"[2.4] Attention({attn.num_heads} heads, {attn.num_kv_heads} KV heads) on {world_size} ranks"
        try:
            tp.ParallelAttention.from_attention(attn, rank=0, world_size=world_size)
            failures.append(f"{case}: no ValueError; the heads cannot be split evenly (kv_heads_for_rank raises "
                            f"'{message} ...') ({PATTN}.from_attention)")
        except ValueError as exc:
            if message not in str(exc):
                failures.append(f"{case}: ValueError({exc}) does not say '{message}' ({PATTN}.from_attention)")
    return failures


def _attention_and_block(impl, rank, world_size, group, label):
    return check_attention(impl, rank, world_size, group, label) + check_block(impl, rank, world_size, group, label)


@pytest.mark.exercise("2.4", "head-parallel attention (GQA)")
@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_parallel_attention(world_size):
    _check_all(launch(_run_checks, world_size, _attention_and_block, show_output=False))


@pytest.mark.exercise("2.4", "head-parallel attention (GQA)")
def test_attention_heads_not_divisible():
    _check_all([check_attention_errors(None)])


# ----------------------------------------------------------------------------------- 2.5 Llama plan

LLAMA = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=64)
PLAN = "labs/tp_llama.py: shard_llama"
VOCAB = "labs/tensor_parallel.py: VocabParallelEmbedding"
ARGMAX = "labs/tensor_parallel.py: parallel_argmax"


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


def check_vocab(impl, rank, world_size, group, label):
    tp, failures = _tp(impl), []
    n, r = dist.get_world_size(group), dist.get_rank(group)
    where = f"[2.5] rank {rank} {label}"
    torch.manual_seed(7)
    emb = nn.Embedding(16 * n, 5)
    tokens_in = torch.randint(0, 16 * n, (3, 4))
    target = torch.randn(3, 4, 5)
    (emb(tokens_in) * target).sum().backward()
    vp = _call(where, "VocabParallelEmbedding.from_embedding", LOOK.format(VOCAB),
               tp.VocabParallelEmbedding.from_embedding, emb, group=group)
    rows = slice(r * 16, (r + 1) * 16)
    _holds(failures, where + " VocabParallelEmbedding", {"weight": (vp.weight, emb.weight[rows])},
           f"rank r keeps rows (token ids) [r·V/n, (r+1)·V/n) of the table ({VOCAB})")
    _bytes(failures, where + " VocabParallelEmbedding", vp, 16 * 5 * 4, f"keep only this rank's rows ({VOCAB})")
    with CommTracer() as trace:
        h = _call(where, "VocabParallelEmbedding.forward", LOOK.format(VOCAB), vp, tokens_in)
    _close(failures, where + " VocabParallelEmbedding", "output", h, emb(tokens_in),
           f"look up the ids this rank owns, zeros for the others, then one all-reduce ({VOCAB})")
    _collectives(failures, where + " VocabParallelEmbedding", trace, [{"all_reduce"}], group,
                 f"one all-reduce sums the ranks' rows (reduce_from_tensor_model_parallel_region) ({VOCAB})")
    _backward(where, LOOK.format(VOCAB), h, target)
    _close(failures, where + " VocabParallelEmbedding", "dL/dweight (this rank's rows)", vp.weight.grad,
           emb.weight.grad[rows],
           f"reduce_from_... is the identity in backward: each rank's rows get their own gradient ({VOCAB})")

    positions = 3 * 4
    per_rank = 32
    full_logits = torch.randn(3, 4, per_rank * n)
    full_logits[0, 0, :] = 1.0        # a tie across every rank: the lowest id wins, as in torch.argmax
    with CommTracer() as trace:
        got = _call(where, "parallel_argmax", LOOK.format(ARGMAX), tp.parallel_argmax,
                    full_logits[..., r * per_rank:(r + 1) * per_rank], group=group)
    want = full_logits.argmax(-1)
    if not isinstance(got, torch.Tensor) or got.shape != want.shape or not torch.equal(got, want):
        failures.append(f"{where} parallel_argmax: got {got.tolist() if isinstance(got, torch.Tensor) else got}, "
                        f"expected {want.tolist()} (argmax of the full logits; ties -> the lowest id, as in "
                        f"torch.argmax) ({ARGMAX})")
    if n > 1:
        sent = sum(rec.payload for rec in trace.records)
        budget = positions * 4 * 8 * n      # up to 4 numbers of 8 B per position from each rank (gathered)
        if sent > budget or not trace.records:
            failures.append(f"{where} parallel_argmax: its collectives carried {sent:,} B "
                            f"({[rec.op for rec in trace.records]}); expected at most {budget:,} B: exchange "
                            f"(max value, id) per position, not the {per_rank * positions * 4:,} B of local logits "
                            f"each rank holds ({ARGMAX})")
        wrong = sorted({rec.ranks for rec in trace.records if tuple(rec.ranks) != _group_ranks(group)})
        if wrong:
            failures.append(f"{where} parallel_argmax: collectives ran in {[list(w) for w in wrong]}, expected the "
                            f"group {list(_group_ranks(group))} ({ARGMAX})")
    return failures


def check_llama(impl, rank, world_size, group, label, overrides):
    from helpers.course.memory import parameter_bytes
    from helpers.course.tp_heads import kv_heads_for_rank
    plan, failures = _plan(impl), []
    n, r = dist.get_world_size(group), dist.get_rank(group)
    where = f"[2.5] rank {rank} {label} Llama{overrides or ''}"
    ids = torch.tensor([[3, 141, 59, 26, 53, 58], [9, 7, 9, 3, 2, 38]])
    full = _llama(**overrides)
    with torch.no_grad():
        want_logits = full(ids).logits
    want_tokens = _greedy(full, ids, 6)
    target = torch.randn_like(want_logits)
    (full(ids).logits * target).sum().backward()

    model = _call(where, "shard_llama", LOOK.format(PLAN), plan.shard_llama, _llama(**overrides), group=group)
    with torch.no_grad(), CommTracer() as trace:
        logits = _call(where, "the sharded model's forward", LOOK.format(PLAN), model, ids).logits
    _close(failures, where, "logits", logits, want_logits, LOOK.format(PLAN), factor=LLAMA_FACTOR)
    # Eager attention reads attributes of each attention module that SDPA infers from the shapes
    # (num_key_value_groups for repeat_kv: transformers' eager_attention_forward): run it too.
    eager_hint = (f"eager attention (transformers' eager_attention_forward) reads each attention module's "
                  f"num_key_value_groups, which SDPA infers from the shapes: set it to this rank's query heads per "
                  f"K/V head ({PLAN})")
    model.set_attn_implementation("eager")
    with torch.no_grad():
        eager = _call(where, "the sharded model's forward with attn_implementation='eager'", eager_hint, model,
                      ids).logits
    model.set_attn_implementation(full.config._attn_implementation)
    _close(failures, where, "logits with attn_implementation='eager'", eager, want_logits, eager_hint,
           factor=LLAMA_FACTOR)
    layers = full.config.num_hidden_layers
    _collectives(failures, where, trace, [{"all_reduce"}] * (1 + 2 * layers) + [GATHERS], group,
                 f"one all-reduce for the embedding, two per decoder layer (o_proj, down_proj), one all-gather of "
                 f"the logits ({PLAN})")
    tokens = _greedy(model, ids, 6)
    if not torch.equal(tokens, want_tokens):
        failures.append(f"{where}: greedy tokens with KV cache {tokens.tolist()} "
                        f"!= full model's {want_tokens.tolist()} "
                        f"— the sharded attention must keep num_key_value_groups consistent with its heads ({PLAN})")

    # Who holds which bytes: every projection and the embedding 1/n; K/V heads per kv_heads_for_rank; norms whole.
    heads, kv_heads, hd = full.config.num_attention_heads, full.config.num_key_value_heads, full.config.head_dim
    first_kv, kv_count = kv_heads_for_rank(heads, kv_heads, r, n)
    rule = (f"1/world_size of every projection, the embedding and the LM head; K/V heads per kv_heads_for_rank "
            f"({'split' if kv_heads % n == 0 else 'replicated'} here); norms whole ({PLAN})")
    full_params = dict(full.named_parameters(remove_duplicate=False))
    replicated = sum(p.numel() for name, p in full_params.items() if "norm" in name)
    kv = sum(p.numel() for name, p in full_params.items() if "k_proj" in name or "v_proj" in name)
    expected = ((sum(p.numel() for p in full_params.values()) - replicated - kv) // n
                + kv * kv_count // kv_heads + replicated)
    mine = sum(p.numel() for p in model.parameters())
    if mine != expected:
        failures.append(f"{where}: this rank holds {mine:,} parameters; expected {expected:,} — {rule}")
    attn0 = model.model.layers[0].self_attn
    for name, want_rows in [("q_proj", heads // n * hd), ("k_proj", kv_count * hd), ("v_proj", kv_count * hd)]:
        got = tuple(getattr(attn0, name).weight.shape)
        if got != (want_rows, full.config.hidden_size):
            failures.append(f"{where}: layers[0].self_attn.{name}.weight is {got}, expected "
                            f"{(want_rows, full.config.hidden_size)} — {rule}")

    # Gradients: each rank's shard gets the same slice of the single-process gradient.
    model.zero_grad(set_to_none=True)
    hint = (f"every projection that reads a replicated activation needs copy_to_tensor_model_parallel_region in "
            f"backward — the column-parallel ones have it; "
            f"replicated K/V heads need head_slice(..., group=group) ({PLAN})")
    logits_tp = _call(where, "the sharded model's forward with autograd", hint, model, ids).logits
    _backward(where, hint, logits_tp, target)
    vocab, hidden, ffn = full.config.vocab_size, full.config.hidden_size, full.config.intermediate_size
    v_rows = slice(r * vocab // n, (r + 1) * vocab // n)
    q_rows = slice(r * heads // n * hd, (r + 1) * heads // n * hd)
    kv_rows = slice(first_kv * hd, (first_kv + kv_count) * hd)
    f_rows = slice(r * ffn // n, (r + 1) * ffn // n)
    emb_grad, head_grad = model.model.embed_tokens.weight.grad, model.lm_head.weight.grad
    if full.config.tie_word_embeddings:      # the shards are untied copies: their gradients add up to the tied one
        pairs = [("embed_tokens + lm_head dL/dW (tied)", emb_grad + head_grad if emb_grad is not None and
                  head_grad is not None else None, full.model.embed_tokens.weight.grad[v_rows])]
    else:
        pairs = [("embed_tokens dL/dW (this rank's vocabulary rows)", emb_grad,
                  full.model.embed_tokens.weight.grad[v_rows]),
                 ("lm_head dL/dW (this rank's vocabulary rows)", head_grad, full.lm_head.weight.grad[v_rows])]
    pairs.append(("model.norm dL/dweight", model.model.norm.weight.grad, full.model.norm.weight.grad))
    for i, (mine_l, full_l) in enumerate(zip(model.model.layers, full.model.layers)):
        a, fa, m, fm = mine_l.self_attn, full_l.self_attn, mine_l.mlp, full_l.mlp
        pairs += [(f"layers[{i}].input_layernorm dL/dweight", mine_l.input_layernorm.weight.grad,
                   full_l.input_layernorm.weight.grad),
                  (f"layers[{i}].q_proj dL/dW", a.q_proj.weight.grad, fa.q_proj.weight.grad[q_rows]),
                  (f"layers[{i}].o_proj dL/dW", a.o_proj.weight.grad, fa.o_proj.weight.grad[:, q_rows]),
                  (f"layers[{i}].gate_proj dL/dW", m.gate_proj.weight.grad, fm.gate_proj.weight.grad[f_rows]),
                  (f"layers[{i}].down_proj dL/dW", m.down_proj.weight.grad, fm.down_proj.weight.grad[:, f_rows])]
        for name in ("k_proj", "v_proj"):
            got = getattr(a, name).weight.grad
            if got is not None and got.shape == (kv_count * hd, hidden):
                got = _replica_sum(got, group, first_kv, kv_count, kv_heads)
            pairs.append((f"layers[{i}].{name} dL/dW{' (summed over replicas)' if kv_heads % n else ''}", got,
                          getattr(fa, name).weight.grad[kv_rows]))
    for what, got, want in pairs:
        _close(failures, where, what, got, want, hint, factor=LLAMA_FACTOR)
    return failures


def check_llama_errors(impl):
    plan, failures = _plan(impl), []
    for overrides, world_size, message in [({}, 3, "not divisible by world_size=3"),
                                           ({"num_attention_heads": 12, "num_key_value_heads": 3, "hidden_size": 48},
                                            2, "num_kv_heads=3")]:
        case = f"[2.5] shard_llama(Llama{overrides}) on {world_size} ranks"
        try:
            plan.shard_llama(_llama(**overrides), rank=0, world_size=world_size)
            failures.append(f"{case}: no ValueError; the docstring promises one naming the size that cannot be "
                            f"split ('{message}': the KV-head rule of kv_heads_for_rank) ({PLAN})")
        except ValueError as exc:
            if message not in str(exc):
                failures.append(f"{case}: ValueError({exc}) does not say '{message}' ({PLAN})")
    return failures


def _llama_job(rank, world_size, overrides, impl=None):
    failures = []
    for group, label in _groups(rank, world_size):
        failures += check_llama(impl, rank, world_size, group, label, overrides)
        failures += check_vocab(impl, rank, world_size, group, label)
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
    _check_all([check_llama_errors(None)])


# ------------------------------------------------------------- planted wrong answers (not an exercise)

def _planted_job(rank, world_size, names):
    """Run each planted variant's grading check (world of 2 ranks, no sub-groups); failures per variant."""
    from tests.graders import planted_ch02
    out = {}
    for name in names:
        variant = planted_ch02.VARIANTS[name]
        impl = planted_ch02.build(name)
        try:
            if variant.check == "llama":
                got = check_llama(impl, rank, world_size, None, "WORLD", variant.overrides)
            else:
                got = CHECKS[variant.check](impl, rank, world_size, None, "WORLD")
        except NotImplementedError:
            raise
        except Exception as exc:            # _call's AssertionError names where it happened; others say what
            got = [f"{type(exc).__name__}: {exc}"]
        out[name] = got
    return out


CHECKS = {"column": check_column, "row": check_row, "mlp": check_mlp, "attention": check_attention,
          "vocab": check_vocab}
ERROR_CHECKS = {"column_errors": check_column_errors, "row_errors": check_row_errors,
                "attention_errors": check_attention_errors, "llama_errors": check_llama_errors}


@pytest.fixture(scope="module")
def planted_results():
    pytest.importorskip("solutions.tensor_parallel", reason="the reference answers are absent (instructor grading)")
    from tests.graders import planted_ch02
    import transformers  # noqa: F401
    names = [n for n, v in planted_ch02.VARIANTS.items() if v.check not in ERROR_CHECKS]
    by_rank = launch(_planted_job, 2, names, show_output=False, timeout=240)
    results = {name: [f for rank_out in by_rank for f in rank_out[name]] for name in names}
    for name, v in planted_ch02.VARIANTS.items():
        if v.check in ERROR_CHECKS:
            results[name] = ERROR_CHECKS[v.check](planted_ch02.build(name))
    return results


# Its own variant of the planted tests (not planted.planted_tests): a llama variant carries the model's overrides,
# the error checks run in this process, and the valid alternatives are graded at 2 and 4 ranks.
@pytest.mark.parametrize("name", names("planted_ch02", "VARIANTS"))
def test_planted_mistakes_are_caught(planted_results, name):
    from tests.graders import planted_ch02
    assert_caught(record(planted_ch02, name), planted_results[name])


def _alternatives_job(rank, world_size):
    from tests.graders import planted_ch02
    out = {}
    for name, (check, _) in planted_ch02.ALTERNATIVES.items():
        out[name] = _run_checks(rank, world_size, CHECKS[check], planted_ch02.build_alternative(name))
    return out


@pytest.mark.parametrize("world_size", [2, 4])
def test_valid_alternatives_pass(world_size):
    """Other correct answers (another gather, one fused copy_to, another argmax exchange) pass the graders."""
    pytest.importorskip("solutions.tensor_parallel", reason="the reference answers are absent")
    by_rank = launch(_alternatives_job, world_size, show_output=False, timeout=240)
    failed = {name: [f for r in by_rank for f in r[name]] for name in by_rank[0]}
    failed = {name: f[0] for name, f in failed.items() if f}
    assert not failed, f"valid alternatives rejected by the graders: {failed}"


def test_reference_passes_the_checks_the_planted_tests_use():
    # The planted test is only meaningful if the unmodified reference passes the same checks.
    pytest.importorskip("solutions.tensor_parallel", reason="the reference answers are absent")
    from tests.graders import planted_ch02
    impl = planted_ch02.build(None)
    for check in ERROR_CHECKS.values():
        assert check(impl) == []


# ---------------------------------------------------------------------- memory arithmetic (not an exercise)

def test_kv_cache_stops_shrinking_beyond_the_kv_heads():
    """Issue 11 item 4: per-GPU KV cache follows the GQA rule (kv_heads_per_rank), in one formula."""
    from helpers.course.memory import GB, MODELS, inference_memory, kv_bytes_per_token, smallest_tp_that_fits
    m = MODELS["Llama-3-70B"]                                 # 8 KV heads
    kv = kv_bytes_per_token(m.layers, m.kv_heads, m.head_dim, 2)
    per_tp = {tp: inference_memory(m.parameters, 2, kv, 32768, tp, kv_heads=m.kv_heads)["kv_cache"]
              for tp in (1, 8, 16, 32)}
    assert per_tp[8] == per_tp[1] / 8
    assert per_tp[16] == per_tp[8] == per_tp[32], f"KV cache per GPU beyond TP=8 must stay at one KV head: {per_tp}"
    with pytest.raises(ValueError, match="kv_heads"):
        inference_memory(m.parameters, 2, kv, 32768, 16)      # a KV cache without its head count is ambiguous
    assert inference_memory(70e9, 2)["weights"] == 140 * GB   # no cache: no head count needed
    big = MODELS["Llama-3.1-405B"]
    kv_big = kv_bytes_per_token(big.layers, big.kv_heads, big.head_dim, 2)
    assert smallest_tp_that_fits(big.parameters, 2, 80 * GB, kv_big, 8 * 4096, kv_heads=8) == 16
    # Degrees that cannot split the heads are skipped when the heads are given (40 heads: not 16, not 32).
    assert smallest_tp_that_fits(13e9, 2, 24 * GB, kv, 0, kv_heads=40, heads=40, degrees=(1, 16, 32)) is None


def test_kv_cache_formula_matches_the_sharded_attention():
    """The arithmetic's KV bytes per rank equal the K/V a real ParallelAttention shard produces, split or
    replicated (8 query heads, 2 KV heads: TP=4 keeps one whole head per rank, not half of one)."""
    pytest.importorskip("solutions.tensor_parallel", reason="the reference answers are absent")
    results = launch(_kv_bytes_job, 4, show_output=False)
    for got, want in results:
        assert got == want, f"K+V bytes per rank: measured {got}, helpers.course.memory says {want}"


def _kv_bytes_job(rank, world_size):
    from helpers.course.memory import kv_bytes_per_token, kv_heads_per_rank
    from solutions.tensor_parallel import ParallelAttention
    torch.manual_seed(0)
    full, x = Attention(64, 8, 2), torch.randn(1, 5, 64)
    attn = ParallelAttention.from_attention(full)
    with torch.no_grad():
        kv = attn.k_proj(x).numel() * 4 + attn.v_proj(x).numel() * 4
    return kv, kv_bytes_per_token(1, kv_heads_per_rank(2, world_size), full.head_dim, 4) * 5
