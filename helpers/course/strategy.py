"""Which (dp, pp, tp) layout serves a model on a cluster: memory per GPU and communication per token.

    from helpers.course.strategy import Model, Cluster, layouts
    for row in layouts(Model.llama(70), Cluster(gpus=16), seq_len=4096, batch=32)[:5]:
        print(row)

The arithmetic, for inference (decode) with Megatron-style sharding, `b` bytes per value:
  * KV heads per GPU     = kv_heads_per_rank(kv_heads, tp) = kv_heads/tp, but at least 1  (helpers/course/memory.py:
    the GQA rule of chapter 2; past tp = kv_heads each KV head is copied to tp/kv_heads GPUs)
  * weights per GPU      = (params - kv_proj) · b / (tp · pp) + kv_proj · b · (KV heads per GPU / kv_heads) / pp
    where kv_proj = 2 · layers · hidden · kv_heads · head_dim are the K and V projections: they are split by
    KV head, so past tp = kv_heads they are copied too, like the cache they produce
  * KV cache per GPU     = kv_bytes_per_token(layers/pp, KV heads per GPU, head_dim, b) · seq_len · batch/dp
    (helpers/course/memory.py, the formula chapter 2 uses) — it stops shrinking at tp = kv_heads
  * TP traffic per token = layers/pp · 2 all-reduces · 2(tp-1)/tp · hidden · b   (ring all-reduce, per GPU)
  * PP traffic per token = hidden · b over each of the pp-1 stage boundaries
  * DP traffic           = none: replicas serve different requests (training would all-reduce gradients)
Groups follow the Megatron order (tp fastest): a TP group is tp consecutive ranks, so it stays inside a node
when tp divides gpus_per_node; a pipeline hop crosses nodes once tp · pp > gpus_per_node.
Time per token adds, for every collective, a latency plus bytes / bandwidth of the link it crosses; a decode
step also reads every stage's weights and KV cache from GPU memory once (decode is memory-bound), and a
prefill computes 2·params FLOPs per prompt token (compute-bound, and its all-reduces carry every token).

Also here: ZeRO's memory arithmetic (training, mixed-precision Adam), `zero_bytes_per_gpu`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from helpers.course.memory import GB, MODELS, kv_bytes_per_token, kv_heads_per_rank
from helpers.course.tp_heads import kv_heads_for_rank

# Link figures. InfiniBand NDR: 400 Gb/s = 50 GB/s per port (the seeds' figure). NVLink 4 on H100:
# 900 GB/s per GPU both directions together, 450 GB/s each way (NVIDIA's datasheet).
NVLINK_GBPS = 450.0
INFINIBAND_GBPS = 50.0


@dataclass(frozen=True)
class Model:
    params: float            # number of parameters
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    bytes_per_value: int = 2  # bf16

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def kv_proj_params(self) -> float:
        """Parameters of the K and V projections (split by KV head under TP, so copied past tp = kv_heads)."""
        return 2 * self.layers * self.hidden * self.kv_heads * self.head_dim

    # Size in billions -> the published model helpers.course.memory.MODELS describes.
    PRESETS = {1: "Llama-3.2-1B", 8: "Llama-3-8B", 70: "Llama-3-70B", 405: "Llama-3.1-405B"}

    @staticmethod
    def llama(billions: int) -> "Model":
        """Published shapes of Llama-3 models: 1, 8, 70 and 405 billion parameters."""
        if billions not in Model.PRESETS:
            raise ValueError(f"no preset for {billions}B: use one of {sorted(Model.PRESETS)} or build Model(...)")
        m = MODELS[Model.PRESETS[billions]]
        return Model(m.parameters, m.layers, m.hidden, m.heads, m.kv_heads)


@dataclass(frozen=True)
class Cluster:
    gpus: int
    gpus_per_node: int = 8
    gpu_memory_gb: float = 80.0
    intra_node_gbps: float = NVLINK_GBPS       # GB/s each way, per GPU
    inter_node_gbps: float = INFINIBAND_GBPS   # GB/s each way, per GPU (one NIC per GPU)
    latency_us: float = 5.0                    # per collective call or send
    hbm_gbps: float = 3350.0                   # GPU memory bandwidth (H100 SXM): bounds a decode step
    peak_tflops: float = 989.0                 # dense bf16 (H100 SXM): bounds a prefill


@dataclass
class Layout:
    dp: int
    pp: int
    tp: int
    weights_gb: float        # per GPU
    kv_cache_gb: float       # per GPU
    kv_heads_per_gpu: float  # kv_heads / tp, at least 1 (GQA: past tp = kv_heads, KV heads are copied)
    kv_copies: float         # on how many GPUs of a stage each KV head lives: 1, or tp / kv_heads beyond
    memory_gb: float         # per GPU, total
    fits: bool
    tp_bytes_per_token: float
    pp_bytes_per_token: float
    tp_link: str             # "NVLink" or "InfiniBand" (or "-" when tp == 1)
    pp_link: str
    comm_us_per_token: float  # one decode step of one sequence, on the critical path
    step_ms: float            # one decode step: every stage reads its weights + KV once, stages in turn
    prefill_ms: float         # one sequence's prompt of seq_len tokens: compute + communication
    problems: tuple[str, ...]

    def __str__(self):
        flag = "fits" if self.fits else "NO: " + "; ".join(self.problems)
        if self.kv_copies > 1:
            flag += f" (each KV head on {self.kv_copies:g} GPUs: the KV cache stopped shrinking)"
        return (f"dp={self.dp:<3} pp={self.pp:<3} tp={self.tp:<2}  {self.memory_gb:7.1f} GB/GPU "
                f"(weights {self.weights_gb:6.1f}, KV {self.kv_cache_gb:5.1f})  "
                f"TP {self.tp_bytes_per_token / 1e3:7.1f} kB/token over {self.tp_link:<10} "
                f"PP {self.pp_bytes_per_token / 1e3:5.1f} kB/token over {self.pp_link:<10} "
                f"comm {self.comm_us_per_token:7.1f} us/token  decode step {self.step_ms:6.2f} ms  "
                f"prefill {self.prefill_ms:7.1f} ms  {flag}")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def weight_bytes_per_gpu(model: Model, tp: int, pp: int) -> float:
    """Weight bytes on one GPU: everything split over tp · pp, except the K and V projections, which are
    split by KV head and so stop shrinking past tp = kv_heads (each GPU keeps the KV head its queries read)."""
    share = kv_heads_per_rank(model.kv_heads, tp) / model.kv_heads       # = 1/tp while tp <= kv_heads
    return ((model.params - model.kv_proj_params) / tp + model.kv_proj_params * share) * model.bytes_per_value / pp


def kv_cache_bytes_per_gpu(model: Model, tp: int, pp: int, tokens: int) -> float:
    """KV-cache bytes on one GPU for `tokens` cached tokens of its replica: the layers of one stage
    (ceil(layers / pp)), kv_heads_per_rank(kv_heads, tp) heads each (chapter 2's formula, helpers/course/memory.py)."""
    layers_per_stage = math.ceil(model.layers / pp)
    return kv_bytes_per_token(layers_per_stage, kv_heads_per_rank(model.kv_heads, tp), model.head_dim,
                              model.bytes_per_value) * tokens


def evaluate(model: Model, cluster: Cluster, dp: int, pp: int, tp: int, seq_len: int, batch: int,
             usable_fraction: float = 0.9) -> Layout:
    """Memory and communication of one layout. `batch` sequences of `seq_len` tokens are served at once,
    split over the dp replicas."""
    b = model.bytes_per_value
    problems = []
    if dp * pp * tp != cluster.gpus:
        problems.append(f"dp·pp·tp = {dp * pp * tp} != {cluster.gpus} GPUs")
    try:  # the same rule the tensor-parallel layers apply (split KV heads, or replicate them evenly)
        kv_heads_for_rank(model.heads, model.kv_heads, 0, tp)
    except ValueError as err:
        problems.append(str(err).split(":")[0])
    if pp > model.layers:
        problems.append(f"pp={pp} > layers={model.layers}")
    layers_per_stage = math.ceil(model.layers / pp)
    weights = weight_bytes_per_gpu(model, tp, pp)
    kv_heads_per_gpu = kv_heads_per_rank(model.kv_heads, tp)
    seqs_per_replica = math.ceil(batch / dp)
    kv = kv_cache_bytes_per_gpu(model, tp, pp, seq_len * seqs_per_replica)
    memory = weights + kv
    if memory > usable_fraction * cluster.gpu_memory_gb * GB:
        problems.append(f"{memory / GB:.0f} GB > {usable_fraction:.0%} of {cluster.gpu_memory_gb:g} GB")

    tp_inside = tp <= cluster.gpus_per_node and cluster.gpus_per_node % tp == 0
    pp_inside = tp * pp <= cluster.gpus_per_node
    tp_link = "-" if tp == 1 else ("NVLink" if tp_inside else "InfiniBand")
    pp_link = "-" if pp == 1 else ("NVLink" if pp_inside else "InfiniBand")
    bw = {"NVLink": cluster.intra_node_gbps * GB, "InfiniBand": cluster.inter_node_gbps * GB}
    lat = cluster.latency_us * 1e-6
    tp_calls = 2 * model.layers if tp > 1 else 0                      # along the whole pipeline
    tp_bytes_per_call = 2 * (tp - 1) / tp * model.hidden * b
    tp_bytes = 2 * layers_per_stage * tp_bytes_per_call                # per GPU
    pp_bytes = (pp - 1) * model.hidden * b                             # per token, all hops
    seconds = 0.0
    if tp > 1:
        seconds += tp_calls * (lat + tp_bytes_per_call / bw[tp_link])
    if pp > 1:
        seconds += (pp - 1) * (lat + model.hidden * b / bw[pp_link])
    # Decode is memory-bound: a step reads each stage's weights and KV cache once, and the pp stages of
    # one token run one after another. TP shortens a step; PP only shares the memory.
    # The replica's seqs_per_replica sequences share each collective of a step: more bytes, one latency.
    step_comm = 0.0
    if tp > 1:
        step_comm += tp_calls * (lat + seqs_per_replica * tp_bytes_per_call / bw[tp_link])
    if pp > 1:
        step_comm += (pp - 1) * (lat + seqs_per_replica * model.hidden * b / bw[pp_link])
    step = pp * memory / (cluster.hbm_gbps * GB) + step_comm
    # Prefill is compute-bound: 2·params FLOPs per token, shared by the tp GPUs of a stage, stages in turn;
    # every all-reduce now carries seq_len tokens, so bandwidth (not latency) decides.
    prefill = 2 * model.params * seq_len / (tp * cluster.peak_tflops * 1e12)
    if tp > 1:
        prefill += tp_calls * (lat + seq_len * tp_bytes_per_call / bw[tp_link])
    if pp > 1:
        prefill += (pp - 1) * (lat + seq_len * model.hidden * b / bw[pp_link])
    return Layout(dp, pp, tp, weights / GB, kv / GB, kv_heads_per_gpu, tp * kv_heads_per_gpu / model.kv_heads,
                  memory / GB, not problems, tp_bytes, pp_bytes,
                  tp_link, pp_link, seconds * 1e6, step * 1e3, prefill * 1e3, tuple(problems))


def layouts(model: Model, cluster: Cluster, seq_len: int, batch: int, feasible_only: bool = True) -> list[Layout]:
    """Every (dp, pp, tp) with dp·pp·tp = cluster.gpus, best first: fewest GPUs per replica (tp·pp: more
    replicas serve more requests), then the shortest prefill + decode step (compute, memory reads and
    communication of one sequence)."""
    rows = [evaluate(model, cluster, cluster.gpus // (pp * tp), pp, tp, seq_len, batch)
            for tp in _divisors(cluster.gpus) for pp in _divisors(cluster.gpus // tp)]
    if feasible_only:
        rows = [r for r in rows if r.fits]
    return sorted(rows, key=lambda r: (not r.fits, r.tp * r.pp, r.prefill_ms + r.step_ms))


def best(model: Model, cluster: Cluster, seq_len: int, batch: int) -> Layout | None:
    rows = layouts(model, cluster, seq_len, batch)
    return rows[0] if rows else None


def zero_bytes_per_gpu(params: float, gpus: int, stage: int, optimizer_bytes: int = 12) -> float:
    """Training memory per GPU for model states with mixed-precision Adam (the ZeRO paper's accounting):
    2 B fp16 weights + 2 B fp16 gradients + K=12 B optimizer state (fp32 master weights, momentum,
    variance) per parameter. Stage 0 = plain DP (all replicated); 1 shards the optimizer state over the
    GPUs; 2 also the gradients; 3 also the weights."""
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"stage={stage}: ZeRO has stages 0 (off), 1, 2 and 3")
    weights, grads, opt = 2.0, 2.0, float(optimizer_bytes)
    if stage >= 1:
        opt /= gpus
    if stage >= 2:
        grads /= gpus
    if stage >= 3:
        weights /= gpus
    return params * (weights + grads + opt)
