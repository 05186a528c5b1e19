"""The seed text's tensor-parallel layers (seed 000, §2.1), transcribed faithfully so a learner can run them.

NOT the course's answer: notebooks/02_tensor_parallel.ipynb runs these beside the Megatron-style layers of
`solutions/tensor_parallel.py` and shows, with a run each, what is wrong here:

  * the docstrings put RowParallelLinear on "the first FFN layer and the QKV projection" and
    ColumnParallelLinear on "the attention output projection": Megatron-LM and vLLM do the opposite
    (column for QKV and FFN up/gate, row for attention output and FFN down);
  * every rank draws its shard with its own `torch.randn`, so the shards are not slices of one matrix and
    nothing can be compared with a full layer;
  * ColumnParallelLinear always all-gathers and RowParallelLinear slices the full input again: two
    collectives for an MLP where `gather_output=False` -> `input_is_parallel=True` needs one all-reduce;
  * the row-parallel bias lives on rank 0 only and is added after the all-reduce, so rank 0's output
    differs from every other rank's;
  * `dist.all_gather` / `dist.all_reduce` have no autograd: fine for inference, wrong gradients for training.

The code below is the seed's, unchanged except that its Chinese comments are translated (originals kept
in brackets for the docstrings) and `load_from_linear` is added at the end so the notebook can give these
layers the same weights as a full nn.Linear (the seed has no way to do that).
"""
import torch
import torch.nn as nn
import torch.distributed as dist


class ColumnParallelLinear(nn.Module):
    """
    Column-parallel linear layer [列并行线性层 (Column Parallel Linear)]

    Splits the weight matrix by columns (output dimension); each GPU computes a different part of the output.
    Used for: the Transformer FFN layer, the attention output projection, etc.
    [适用于:Transformer的FFN层、Attention输出投影等]

    Communication: all_gather (collect every GPU's partial output and concatenate into the full output)
    """
    def __init__(self, in_features, out_features, world_size, rank):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.world_size = world_size
        self.rank = rank

        # split the output dimension (column split)
        self.out_per_rank = out_features // world_size

        # each GPU stores only part of the weight (a column slice)
        self.weight = nn.Parameter(
            torch.randn(self.out_per_rank, in_features)
        )
        self.bias = nn.Parameter(torch.randn(self.out_per_rank))

    def forward(self, x):
        # local compute: each GPU computes Y_local = X @ W_local^T + b_local
        local_output = torch.nn.functional.linear(x, self.weight, self.bias)

        # column parallel: all_gather every GPU's output and concatenate
        # each GPU holds different columns (features) of the output: concatenate, do not sum
        gathered_outputs = [torch.zeros_like(local_output) for _ in range(self.world_size)]
        dist.all_gather(gathered_outputs, local_output)

        # concatenate all GPUs' outputs along the column (feature) dimension
        output = torch.cat(gathered_outputs, dim=-1)

        return output


class RowParallelLinear(nn.Module):
    """
    Row-parallel linear layer [行并行线性层 (Row Parallel Linear)]

    Splits the weight matrix by rows (input dimension); each GPU computes a partial result, then they are summed.
    Used for: the first FFN layer of the Transformer, the attention QKV projection, etc.
    [适用于:Transformer的第一层FFN、Attention的QKV投影等]

    Communication: all_reduce (sum the partial results of all GPUs)
    """
    def __init__(self, in_features, out_features, world_size, rank):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.world_size = world_size
        self.rank = rank

        # split the input dimension (row split)
        self.in_per_rank = in_features // world_size

        # each GPU stores only part of the weight (a row slice)
        self.weight = nn.Parameter(
            torch.randn(out_features, self.in_per_rank)
        )
        # row parallel usually has no bias, or adds it on rank 0 only
        if rank == 0:
            self.bias = nn.Parameter(torch.randn(out_features))
        else:
            self.register_parameter('bias', None)

    def forward(self, x):
        # each GPU processes only part of the input features
        x_partition = x[..., self.rank * self.in_per_rank : (self.rank + 1) * self.in_per_rank]

        # local compute: each GPU computes Y_local = X_local @ W_local^T
        local_output = torch.nn.functional.linear(x_partition, self.weight)

        # row parallel: all_reduce sums every GPU's result
        # each GPU holds a partial sum, which must be accumulated into the final result
        output = local_output.clone()
        dist.all_reduce(output, op=dist.ReduceOp.SUM)

        # add the bias on rank 0 only
        if self.bias is not None:
            output = output + self.bias

        return output


# Usage (from the seed)
# world_size = 4  # 4 GPUs
# rank = dist.get_rank()  # this GPU's rank
#
# # column parallel: split the output dimension, use all_gather
# col_parallel = ColumnParallelLinear(768, 3072, world_size, rank)
#
# # row parallel: split the input dimension, use all_reduce
# row_parallel = RowParallelLinear(3072, 768, world_size, rank)


# ------------------------------------------------------------------------------------ added by the course

@torch.no_grad()
def load_from_linear(layer, linear: nn.Linear):
    """Overwrite a seed layer's random shard with this rank's slice of a full nn.Linear, keeping the seed's
    layout (column: output rows + bias slice; row: input columns, bias on rank 0 only)."""
    if isinstance(layer, ColumnParallelLinear):
        rows = slice(layer.rank * layer.out_per_rank, (layer.rank + 1) * layer.out_per_rank)
        layer.weight.copy_(linear.weight[rows])
        layer.bias.copy_(linear.bias[rows])
    else:
        cols = slice(layer.rank * layer.in_per_rank, (layer.rank + 1) * layer.in_per_rank)
        layer.weight.copy_(linear.weight[:, cols])
        if layer.bias is not None:
            layer.bias.copy_(linear.bias)
    return layer
