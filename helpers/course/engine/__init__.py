"""The course's serving engine, written once (chapters 6, 7 and the ones after).

    request.py           Request: one request's state from arrival to its last token (vLLM V1's fields)
    scheduler.py         Scheduler, SchedulerConfig: vLLM V1's rules; each step is exercise 7.4's schedule_step
    kv_cache_manager.py  KVCacheManager: blocks per request, prefix-cache lookups and metrics, around exercises
                         7.1 / 7.3; UnlimitedKV where memory is not the subject
    kv_events.py         BlockStored / BlockRemoved / AllBlocksCleared (vLLM's KV events; chapter 9's router)
    kv_connector.py      KVConnector: KV supplied by another process or tier (none by default)
    runner.py            PagedRunner (one forward per step), ContiguousRunner, ModelledRunner
    clock.py             WallClock, ModelledClock, step_seconds (modelled device time)
    sampling.py          sample: greedy or temperature + top_p with the request's generator; token_logprobs
    stats.py             percentile (defined once), StepRecord, EngineResult
    engine.py            LLMEngine.step: schedule → run → sample (or, with a proposer, verify the drafts and
                         propose the next: chapter 10's speculative decoding); run_requests: a replay with arrivals
    pipeline_runner.py   PipelineEngine: up to pp batches in flight through pipeline stages (vLLM's batch queue);
                         PipelineStageRunner, one stage's layers and their KV cache
"""
from helpers.course.engine.clock import ModelledClock, WallClock, step_seconds
from helpers.course.engine.engine import BATCHING, LLMEngine, run_requests
from helpers.course.engine.kv_cache_manager import KVCacheManager, PrefixCacheStats, UnlimitedKV
from helpers.course.engine.kv_connector import KVConnector
from helpers.course.engine.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEventLog
from helpers.course.engine.request import Request, RequestStatus
from helpers.course.engine.runner import ContiguousRunner, ModelledRunner, PagedRunner
from helpers.course.engine.sampling import sample, token_logprobs
from helpers.course.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput, ScheduleError, StepPlan, \
    continuous_batching_step
from helpers.course.engine.stats import EngineResult, StepRecord, percentile

__all__ = ["LLMEngine", "BATCHING", "run_requests", "Request", "RequestStatus", "Scheduler", "SchedulerConfig",
           "SchedulerOutput", "ScheduleError", "KVCacheManager", "PrefixCacheStats", "UnlimitedKV", "KVConnector",
           "KVEventLog", "BlockStored", "BlockRemoved", "AllBlocksCleared", "WallClock", "ModelledClock",
           "step_seconds", "sample", "token_logprobs", "PagedRunner", "ContiguousRunner", "ModelledRunner",
           "percentile", "StepRecord", "EngineResult", "StepPlan", "continuous_batching_step"]
