"""Chapter 9's given code: N replicas of the course's engine behind a router that reads their KV events.

    workload.py    the multi-turn, multi-tenant chat workload (long system prompts, sessions of several turns)
    policies.py    RoundRobin, LeastOutstanding, KVAware (exercises 9.1 and 9.2, by load_impl), ApproxTree
                   (SGLang's cache-aware router: caches predicted from the requests it sent, no events)
    router.py      Router: hashes prompts, asks the policy, tracks outstanding requests, applies KV events
    transport.py   EventChannel: event batches from replicas to the router, late or lost (a replay's modelled time)
    wire.py        vLLM's KVEventBatch bytes (msgpack through msgspec, as vLLM encodes them): encode_batch, decode_batch
    zmq_events.py  ZmqEventPublisher / ZmqEventSubscriber: vLLM's (topic, seq, payload) frames over PUB/SUB, gaps
    replay.py      replay: the workload on N modelled engines (paged KV cache, prefix caching, KV events) behind
                   the router, with a replica restart; per-replica hit rate, prefill tokens, TTFT, load
    __main__.py    `python -m helpers.course.routing`: the chapter's comparison as a table, with its verdicts
    proxy.py       the Router as an OpenAI-compatible HTTP proxy in front of `vllm serve` replicas, fed by vLLM's own
                   KV events over ZMQ (`make vllm-cluster`, helpers/vllm_cluster.py); not imported here
"""
from helpers.course.routing.policies import ApproxTree, KVAware, LeastOutstanding, Policy, RoundRobin
from helpers.course.routing.replay import ReplayResult, replay
from helpers.course.routing.router import Router
from helpers.course.routing.transport import EventChannel
from helpers.course.routing.workload import ChatWorkload, chat_workload

__all__ = ["ApproxTree", "KVAware", "LeastOutstanding", "Policy", "RoundRobin", "ReplayResult", "replay", "Router",
           "EventChannel", "ChatWorkload", "chat_workload"]
