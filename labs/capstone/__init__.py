"""Capstone (chapter 6): a distributed inference engine assembled from the course's pieces.

    plan.py     Exercise 6.1  check a (dp, pp, tp) plan against the model; which ranks form each replica
    router.py   Exercise 6.2  the balancing policy: round robin or least outstanding requests
    report.py   Exercise 6.3  a performance report from scraped Prometheus metrics
    engine.py   Exercise 6.4  CapstoneServer(plan): start replicas, serve requests, balance, report
                (6.5 grades the same engine with tensor-parallel replicas: chapter 2's shard_llama)
                (6.6 with pipeline-parallel replicas: chapter 3's LlamaStages run by the engine's
                PipelineEngine, helpers/course/serving/pipeline_replica.py; pp × tp uses chapter 5's build_hybrid_stage)

Graded end to end by tests/graders/test_ch06_serving.py: `make grade CHAPTER=6`.
"""
