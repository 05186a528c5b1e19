"""The server's options, once: `ServeConfig`, with vLLM's names, from the command line to every replica.

    python -m helpers.course.serving --replicas 2 --tensor-parallel-size 2 --kv-cache paged --max-num-seqs 8
    start_server(replicas=2, tp=2, kv_cache="paged", max_batch=8)          # the same server, from Python
    python -m helpers.course.serving --kv-cache paged \
        --speculative-config '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3}'

Each field below is one option: where vLLM has it, its name is vLLM's (`vllm serve --max-num-seqs ...`, the
engine's SchedulerConfig); the rest (batching, kv_cache, the balancer's) are the course's. Its command-line
flag is generated from it (`max_num_seqs` -> `--max-num-seqs`), with the course's older spellings as aliases
(`--max-batch`, `--tp`, `--pp`, `--num-blocks`, `--model-name`). The parser,
the command line start_server writes, and start_server's keyword arguments all come from these fields, and a
ServeConfig checks itself when it is made (`validate`, with the errors the server prints): the config that
reaches a replica is the one the learner typed, whole —

    CLI or start_server(**options) -> ServeConfig -> Balancer(config) -> replica_main(conn, index, config)
        -> build_engine(model, config) -> LLMEngine(..., config.scheduler_config(model.config))
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
from dataclasses import dataclass, field, fields


def _batching() -> tuple:
    """The engine's batching modes (imported when used: the engine imports parts of helpers.course.serving)."""
    from helpers.course.engine import BATCHING
    return BATCHING

LOOPBACK = ("127.0.0.1", "localhost", "::1")
POLICIES = ("round_robin", "least_outstanding")    # the balancer's policies (balancer.py; exercise 6.2)
ROUTINGS = ("round_robin", "least_outstanding", "kv_aware", "approx_tree")   # chapter 9's Router (routing/)
KV_CACHES = ("contiguous", "paged")
HEARTBEAT = 0.5     # seconds between a replica's load reports while idle: the front end's sign of life
STUCK_AFTER = 5.0   # seconds of silence after which a ready replica is taken for stuck (10 heartbeats)
API_KEY_ENV = "SERVING_API_KEY"

KV_GROUP = "KV cache and scheduler (chapter 7; vLLM's names)"
ROUTING_GROUP = "KV events and routing (chapter 9; vLLM's and Dynamo's names)"
# vLLM's KVEventsConfig fields (vllm/config/kv_events.py) the course's replicas honour; replay_endpoint,
# buffer_steps and max_queue_size are accepted as vLLM's spellings but there is no replay socket here
SPEC_GROUP = "Speculative decoding (chapter 10; vLLM's names)"
# vLLM's SpeculativeConfig fields (vllm/config/speculative.py) the course's replicas honour, and its methods: the course
# has two of them (helpers/course/speculative.py NgramProposer, DraftModelProposer)
SPEC_FIELDS = {"method": (str, type(None)), "model": (str, type(None)), "num_speculative_tokens": int,
               "prompt_lookup_max": (int, type(None)), "prompt_lookup_min": (int, type(None))}
SPEC_METHODS = ("ngram", "draft_model")
VLLM_SPEC_METHODS = ("ngram", "medusa", "mlp_speculator", "draft_model", "suffix", "custom_class", "eagle", "eagle3",
                     "extract_hidden_states", "mtp", "dflash", "ngram_gpu", "dspark")   # vLLM's SpeculativeMethod
KV_EVENTS_FIELDS = {"enable_kv_cache_events": bool, "publisher": str, "endpoint": str, "replay_endpoint": (str,
                    type(None)), "buffer_steps": int, "hwm": int, "max_queue_size": int, "topic": str}


def option(default, help: str, *aliases: str, choices=None, type=None, group=None, env=None, argv=True):
    """A ServeConfig field: its default, its --help text, the flag's older spellings, and how to parse it."""
    return field(default=default, metadata={"help": help, "aliases": aliases, "choices": choices, "type": type,
                                            "group": group, "env": env, "argv": argv})


@dataclass(frozen=True)
class ServeConfig:
    # --------------------------------------------------------------- the model and where it is served
    model: str = option("helpers.course.tiny_llama", "module with load_model(), encode(), decode(), CONFIG")
    served_model_name: str = option("tiny-llama", "the name clients send as 'model'", "--model-name")
    host: str = option("127.0.0.1", "loopback only: 127.0.0.1, localhost or ::1")
    port: int = option(8000, "TCP port (0: any free port)")
    api_key: str | None = option(None, "require 'Authorization: Bearer KEY' on /v1 paths (default: "
                                 f"${API_KEY_ENV}; /health, /metrics and /replicas stay open, as in vLLM)",
                                 env=API_KEY_ENV, argv=False)
    # --------------------------------------------------------------- parallelism
    data_parallel_size: int = option(2, "data-parallel replicas (processes, or jobs of tensor-parallel ranks)",
                                     "--data-parallel-size", "-dp")
    tensor_parallel_size: int = option(1, "tensor-parallel ranks per replica (chapter 2's shard_llama, from "
                                       "COURSE_IMPL's tp_llama)", "--tp", "-tp")
    pipeline_parallel_size: int = option(1, "pipeline stages per replica, each of --tensor-parallel-size ranks "
                                         "(the engine's PipelineEngine: up to pp batches in flight)", "--pp", "-pp")
    threads: int = option(1, "torch threads of a replica process (the ranks of a --tp/--pp replica use 1)")
    # --------------------------------------------------------------- the engine
    batching: str = option("continuous", "continuous (vLLM's), static (a batch runs to its end) or none "
                           "(one request at a time)", choices=_batching)
    max_num_seqs: int = option(8, "requests in the running batch, per replica", "--max-batch")
    kv_cache: str = option("contiguous", "contiguous: one cache per request (chapter 6's transformers cache); "
                           "paged: blocks through a block table (helpers/course/engine, exercises 7.1-7.2); with "
                           "--tp each rank holds its own KV heads; with --pp each stage its layers'",
                           choices=KV_CACHES, group=KV_GROUP)
    num_gpu_blocks_override: int = option(256, "KV blocks per replica (paged; vLLM sizes the pool from the free "
                                          "memory unless this overrides it)", "--num-blocks", group=KV_GROUP)
    block_size: int = option(16, "tokens per KV block (paged)", group=KV_GROUP)
    enable_prefix_caching: bool = option(False, "share cached full blocks between requests (paged; exercise 7.3)",
                                         group=KV_GROUP)
    max_num_batched_tokens: int | None = option(None, "tokens computed per step, prompt chunks and decodes alike "
                                                "(paged; exercise 7.4's budget; default: whole prompts)",
                                                type=int, group=KV_GROUP)
    long_prefill_token_threshold: int = option(0, "at most this many prompt tokens of one request per step "
                                               "(paged; 0: no cap)", group=KV_GROUP)
    kv_events_config: str | None = option(None, "JSON, vLLM's --kv-events-config: "
                                          "'{\"enable_kv_cache_events\": true, \"publisher\": \"zmq\", "
                                          "\"endpoint\": \"tcp://*:5557\"}' makes each replica publish its KV events "
                                          "over ZeroMQ, replica i on the endpoint's port + i as vLLM's data-parallel "
                                          "ranks (paged, prefix caching)", type=str, group=ROUTING_GROUP)
    speculative_config: str | None = option(None, "JSON, vLLM's --speculative-config: '{\"method\": \"ngram\", "
                                            "\"num_speculative_tokens\": 4, \"prompt_lookup_max\": 3}' (prompt "
                                            "lookup) or '{\"method\": \"draft_model\", \"model\": "
                                            "\"helpers/course/data/draft_llama\", \"num_speculative_tokens\": 4}' "
                                            "(chapter 10; --kv-cache paged, --pp 1)", "-sc", type=str,
                                            group=SPEC_GROUP)
    # --------------------------------------------------------------- the balancer
    routing: str | None = option(None, "route with chapter 9's Router instead of --policy: round_robin, "
                                 "least_outstanding, kv_aware (on the replicas' KV events: --kv-events-config) or "
                                 "approx_tree (caches predicted from the requests sent, SGLang's)", type=str,
                                 choices=ROUTINGS, group=ROUTING_GROUP)
    kv_overlap_score_weight: float = option(1.0, "kv_aware's weight of the cached prefix against the load "
                                            "(Dynamo's --kv-overlap-score-weight)", group=ROUTING_GROUP)
    kv_events_stale_after: float = option(0.0, "kv_aware: a replica with requests outstanding that published "
                                          "nothing for this many seconds is routed on load alone until it "
                                          "publishes again (0: never)", group=ROUTING_GROUP)
    policy: str = option("least_outstanding", "how the balancer picks a replica (exercise 6.2)", choices=POLICIES)
    choose: str | None = option(None, "module:function replacing the balancing policy (the capstone's), called "
                                "as f(policy, outstanding, turn) -> replica index", type=str)
    max_retries: int = option(3, "re-sends of a request after replica failures")
    restart: bool = option(True, "restart replicas that die (--no-restart: leave them dead)")
    stuck_after: float = option(STUCK_AFTER, "seconds without a heartbeat after which a replica is taken for "
                                "stuck, killed and replaced (0: never)")

    def __post_init__(self):
        self.validate()

    # ------------------------------------------------------------------------------------------ checks
    def validate(self) -> None:
        """Every check that needs no model, with the message the server prints (ValueError)."""
        def error(message):
            raise ValueError(message)

        if self.host not in LOOPBACK:
            error(f"--host {self.host}: this teaching server listens on loopback only (127.0.0.1)")
        if not (isinstance(self.port, int) and 0 <= self.port < 65536):
            error(f"--port {self.port} is not a TCP port")
        for name, values in (("batching", _batching()), ("kv_cache", KV_CACHES), ("policy", POLICIES)):
            if getattr(self, name) not in values:
                error(f"{spelled(name)} {getattr(self, name)!r}: choose one of {', '.join(values)}")
        at_least_one = ["data_parallel_size", "tensor_parallel_size", "pipeline_parallel_size", "threads",
                        "max_num_seqs", "num_gpu_blocks_override", "block_size"]
        if self.max_num_batched_tokens is not None:
            at_least_one.append("max_num_batched_tokens")
        for name in at_least_one:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                error(f"{spelled(name)} {value!r} must be an integer of at least 1")
        for name in ("long_prefill_token_threshold", "max_retries"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                error(f"{spelled(name)} {getattr(self, name)!r} must be an integer >= 0")
        if self.api_key is not None and (not isinstance(self.api_key, str) or not self.api_key.strip()
                                         or not self.api_key.isprintable()):
            error("--api-key must be printable characters, not empty")
        if self.stuck_after < 0:
            error(f"--stuck-after {self.stuck_after:g} must be >= 0 (0 turns the watchdog off)")
        if self.stuck_after and self.stuck_after < 4 * HEARTBEAT:
            error(f"--stuck-after {self.stuck_after:g} s is too short: a replica reports every {HEARTBEAT:g} s; "
                  f"give it at least {4 * HEARTBEAT:g} s (0 turns the watchdog off)")
        if self.choose is not None and ":" not in self.choose:
            error(f"--choose {self.choose!r}: give module:function")
        paged_only = [flag(n) for n in ("enable_prefix_caching", "max_num_batched_tokens",
                                        "long_prefill_token_threshold") if getattr(self, n) not in (False, None, 0)]
        if self.kv_cache != "paged" and paged_only:
            error(f"{' and '.join(paged_only)} need{'s' if len(paged_only) == 1 else ''} --kv-cache paged")
        events = self.kv_events()          # ValueError with the reason if the JSON is wrong
        if events is not None and not (self.kv_cache == "paged" and self.enable_prefix_caching):
            error("--kv-events-config publishes the prefix cache's events: it needs --kv-cache paged "
                  "--enable-prefix-caching")
        if events is not None and (self.tensor_parallel_size > 1 or self.pipeline_parallel_size > 1):
            error("--kv-events-config: the course's replicas publish KV events with --tp 1 --pp 1 only")
        speculative = self.speculative()   # ValueError naming the field if the JSON is wrong
        if speculative is not None and self.kv_cache != "paged":
            error("--speculative-config needs --kv-cache paged: the verification scores every draft position in one "
                  "forward on the paged runner (LLMEngine.paged)")
        if speculative is not None and self.pipeline_parallel_size > 1:
            error("--speculative-config: the course's pipeline replicas (--pp > 1) do not speculate; give --pp 1")
        if self.routing is not None and self.routing not in ROUTINGS:
            error(f"--routing {self.routing!r}: choose one of {', '.join(ROUTINGS)}")
        if self.routing is not None and self.choose is not None:
            error("--routing and --choose both replace the balancing policy: give one")
        if self.routing == "kv_aware" and events is None:
            error("--routing kv_aware routes on the replicas' KV events: give --kv-events-config "
                  "'{\"enable_kv_cache_events\": true, \"endpoint\": \"tcp://*:5557\"}'")
        if self.kv_overlap_score_weight < 0 or self.kv_events_stale_after < 0:
            error("--kv-overlap-score-weight and --kv-events-stale-after must be >= 0")

    def check_model(self, model_config) -> None:
        """The checks that need the model's config (the server runs them once it has imported the model):
        SystemExit with the reason, as vLLM refuses to start."""
        layers, pp = model_config.num_hidden_layers, self.pipeline_parallel_size
        if layers % pp:
            raise SystemExit(f"{spelled('pipeline_parallel_size')} {pp} does not divide the model's {layers} layers: "
                             "each stage needs as many")
        longest, blocks = model_config.max_position_embeddings, self.num_gpu_blocks_override
        tokens = blocks * self.block_size
        if self.kv_cache == "paged" and tokens < longest:
            # vLLM refuses to start likewise: a request of the model's full length could never run
            raise SystemExit(f"{spelled('num_gpu_blocks_override')} {blocks} × --block-size {self.block_size} = "
                             f"{tokens} tokens of KV cache per replica, less than the model's context of {longest} "
                             f"tokens: give at least {-(-longest // self.block_size)} blocks")

        speculative = self.speculative()
        if speculative is not None and speculative["method"] == "draft_model":
            import json
            from pathlib import Path
            draft = json.loads((Path(speculative["model"]) / "config.json").read_text())
            if draft.get("vocab_size") != model_config.vocab_size:
                raise SystemExit(f"--speculative-config: the draft model {speculative['model']} has a vocabulary of "
                                 f"{draft.get('vocab_size')} tokens, the target {model_config.vocab_size}: a draft "
                                 "must share the target's tokenizer")

    # ------------------------------------------------------------------------------------------ uses
    def kv_events(self) -> dict | None:
        """--kv-events-config as vLLM's KVEventsConfig fields (vllm/config/kv_events.py, defaults filled in), or
        None when the replicas publish nothing (no config, enable_kv_cache_events false, or publisher "null").
        ValueError naming what is wrong."""
        if self.kv_events_config is None:
            return None
        import json
        try:
            given = json.loads(self.kv_events_config)
        except ValueError as e:
            raise ValueError(f"--kv-events-config is not JSON: {e}") from None
        if not isinstance(given, dict):
            raise ValueError("--kv-events-config is a JSON object of vLLM's KVEventsConfig fields")
        for key, value in given.items():
            if key not in KV_EVENTS_FIELDS:
                raise ValueError(f"--kv-events-config: unknown field {key!r} (vLLM's KVEventsConfig has "
                                 f"{', '.join(KV_EVENTS_FIELDS)})")
            if not isinstance(value, KV_EVENTS_FIELDS[key]) or (isinstance(value, bool) and
                                                               KV_EVENTS_FIELDS[key] is int):
                raise ValueError(f"--kv-events-config: {key}={value!r} has the wrong type")
        config = {"enable_kv_cache_events": False, "publisher": None, "endpoint": "tcp://*:5557",
                  "replay_endpoint": None, "buffer_steps": 10_000, "hwm": 100_000, "max_queue_size": 100_000,
                  "topic": "", **given}
        if config["publisher"] is None:      # vLLM's __post_init__
            config["publisher"] = "zmq" if config["enable_kv_cache_events"] else "null"
        if config["publisher"] not in ("zmq", "null"):
            raise ValueError(f"--kv-events-config: publisher {config['publisher']!r}: choose zmq or null")
        if not config["enable_kv_cache_events"] or config["publisher"] == "null":
            return None
        if config["replay_endpoint"] is not None:
            raise ValueError("--kv-events-config: the course's publisher has no replay socket (replay_endpoint)")
        if not config["endpoint"].startswith(("tcp://", "ipc://")):
            raise ValueError(f"--kv-events-config: endpoint {config['endpoint']!r}: give tcp://*:PORT, "
                             "tcp://127.0.0.1:PORT or ipc://PATH")
        host = config["endpoint"][len("tcp://"):].rpartition(":")[0] if config["endpoint"].startswith("tcp") else ""
        if host not in ("", "*", "127.0.0.1", "localhost"):
            raise ValueError(f"--kv-events-config: endpoint {config['endpoint']!r}: this teaching server publishes "
                             "on loopback only (tcp://*:PORT binds 127.0.0.1)")
        return config

    def speculative(self) -> dict | None:
        """--speculative-config as vLLM's SpeculativeConfig fields with its defaults filled in, or None.
        Parsed as vLLM parses it (vllm/engine/arg_utils.py: json.loads, then create_speculative_config turns "-" in
        the keys into "_"), checked as SpeculativeConfig.__post_init__ checks it (vllm/config/speculative.py: method
        inferred from model — "ngram" gives ngram, anything else draft_model; prompt_lookup_min and _max both 5
        when neither is given, one copied to the other when one is; min <= max; num_speculative_tokens > 0).
        ValueError naming the field."""
        if self.speculative_config is None:
            return None
        import json
        try:
            given = json.loads(self.speculative_config)
        except ValueError as e:
            raise ValueError(f"--speculative-config is not JSON: {e}") from None
        if not isinstance(given, dict):
            raise ValueError("--speculative-config is a JSON object of vLLM's SpeculativeConfig fields")
        given = {str(k).replace("-", "_"): v for k, v in given.items()}
        for key, value in given.items():
            if key not in SPEC_FIELDS:
                raise ValueError(f"--speculative-config: field {key!r} is not one the course's server honours "
                                 f"(it takes vLLM's {', '.join(SPEC_FIELDS)})")
            if not isinstance(value, SPEC_FIELDS[key]) or isinstance(value, bool):
                raise ValueError(f"--speculative-config: {key}={value!r} has the wrong type")
        config = {k: given.get(k) for k in SPEC_FIELDS}
        if config["method"] is None:
            config["method"] = "ngram" if config["model"] in ("ngram", "[ngram]") else "draft_model"
        if config["method"] == "[ngram]":
            config["method"] = "ngram"
        if config["method"] not in SPEC_METHODS:
            known = " (one of vLLM's, not the course's)" if config["method"] in VLLM_SPEC_METHODS else ""
            raise ValueError(f"--speculative-config: method {config['method']!r}{known}: choose "
                             f"{' or '.join(SPEC_METHODS)}")
        k = config["num_speculative_tokens"]
        if k is None or k < 1:
            raise ValueError(f"--speculative-config: num_speculative_tokens={k!r}: give an integer > 0")
        if config["method"] == "ngram":
            low, high = config["prompt_lookup_min"], config["prompt_lookup_max"]
            low, high = (5, 5) if low is None and high is None else (high if low is None else low,
                                                                      low if high is None else high)
            for name, n in (("prompt_lookup_min", low), ("prompt_lookup_max", high)):
                if n < 1:
                    raise ValueError(f"--speculative-config: {name}={n} must be >= 1")
            if low > high:
                raise ValueError(f"--speculative-config: prompt_lookup_min={low} must be <= prompt_lookup_max={high}")
            config.update(prompt_lookup_min=low, prompt_lookup_max=high, model=config["model"] or "ngram")
        else:
            for name in ("prompt_lookup_min", "prompt_lookup_max"):
                if config[name] is not None:
                    raise ValueError(f"--speculative-config: {name} is the ngram method's, not draft_model's")
            config["model"] = str(draft_dir(config["model"]))
        return config

    def scheduler_config(self, model_config):
        """The engine's SchedulerConfig. Without a token budget a step computes whole prompts: a budget of
        max_num_seqs × the model's context fits every prompt of the batch (the contiguous cache always does)."""
        from helpers.course.engine import SchedulerConfig
        budget = self.max_num_batched_tokens or self.max_num_seqs * model_config.max_position_embeddings
        return SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=self.max_num_seqs,
                               long_prefill_token_threshold=self.long_prefill_token_threshold)

    def choose_function(self):
        """The --choose policy function (module:function), or None: the balancer uses exercise 6.2's."""
        if self.choose is None:
            return None
        module, _, name = self.choose.partition(":")
        return getattr(importlib.import_module(module), name)

    def summary(self) -> str:
        """One line for the server's log."""
        text = (f"{self.data_parallel_size} replica(s), pp={self.pipeline_parallel_size}, "
                f"tp={self.tensor_parallel_size}, batching={self.batching}, max_num_seqs={self.max_num_seqs}, "
                f"policy={self.policy}")
        if self.kv_cache == "paged":
            text += (f", paged KV cache ({self.num_gpu_blocks_override} blocks of {self.block_size}"
                     + (", prefix caching" if self.enable_prefix_caching else "")
                     + (f", {self.max_num_batched_tokens} tokens per step" if self.max_num_batched_tokens else "")
                     + ")")
        if self.kv_events() is not None:
            text += f", KV events on {self.kv_events()['endpoint']} (+ replica index)"
        if self.speculative() is not None:
            spec = self.speculative()
            text += f", speculative decoding ({spec['method']}, k={spec['num_speculative_tokens']})"
        if self.routing is not None:
            text = text.replace(f"policy={self.policy}", f"routing={self.routing}")
        return text + (", API key required on /v1" if self.api_key else "")

    # ------------------------------------------------------------------------------------------ spellings
    @classmethod
    def parser(cls, prog: str = "python -m helpers.course.serving", description: str | None = None):
        """The command line, generated from the fields: --field-name (and its aliases), help from the field."""
        p = argparse.ArgumentParser(prog=prog, description=description,
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
        groups = {}
        for f in fields(cls):
            meta = f.metadata
            group = meta["group"]
            where = p if group is None else groups.get(group) or groups.setdefault(group, p.add_argument_group(group))
            flags = [flag(f.name), *meta["aliases"]]
            default = os.environ.get(meta["env"]) or None if meta["env"] else f.default
            if isinstance(f.default, bool):
                where.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction, default=default,
                                   help=meta["help"])
                continue
            kind = meta["type"] or (str if f.default is None else type(f.default))
            choices = meta["choices"]() if callable(meta["choices"]) else meta["choices"]
            where.add_argument(*flags, dest=f.name, type=kind, default=default, choices=choices,
                               metavar="N" if kind is int else None,
                               help=meta["help"] + ("" if f.default is None else " (default: %(default)s)"))
        return p

    @classmethod
    def from_argv(cls, argv=None, **parser_options) -> "ServeConfig":
        """Parse a command line; a wrong option exits with usage and the reason (argparse's error)."""
        p = cls.parser(**parser_options)
        args = p.parse_args(argv)
        try:
            return cls(**vars(args))
        except ValueError as e:
            p.error(str(e))

    def to_argv(self) -> list[str]:
        """The command line that gives this config back (the options that differ from the defaults; the API key
        never: a command line is visible to every user in `ps`, so it travels in $SERVING_API_KEY)."""
        argv = []
        for f in fields(self):
            value = getattr(self, f.name)
            if value == f.default or not f.metadata["argv"]:
                continue
            if isinstance(f.default, bool):
                argv.append(flag(f.name) if value else "--no-" + flag(f.name)[2:])
            else:
                argv += [flag(f.name), str(value)]
        return argv

    @classmethod
    def from_options(cls, **options) -> "ServeConfig":
        """start_server's keyword arguments: the field names, or the older names (ALIASES: replicas, tp, pp,
        max_batch, num_blocks, model_name); None means the default."""
        names = {f.name for f in fields(cls)}
        given, spelling = {}, {}
        for key, value in options.items():
            name = ALIASES.get(key, key)
            if name not in names:
                raise TypeError(f"unknown server option {key}={value!r}; the options are ServeConfig's fields: "
                                f"{', '.join(sorted(names))} (or {', '.join(ALIASES)})")
            if name in spelling:
                raise TypeError(f"{spelling[name]}= and {key}= name the same option ({name}): give one")
            spelling[name] = key
            if value is not None:
                given[name] = value
        return cls(**given)

    def replace(self, **options) -> "ServeConfig":
        """A copy with these fields changed (checked again)."""
        return dataclasses.replace(self, **options)


ALIASES = {"replicas": "data_parallel_size", "tp": "tensor_parallel_size", "pp": "pipeline_parallel_size",
           "max_batch": "max_num_seqs", "num_blocks": "num_gpu_blocks_override", "model_name": "served_model_name"}
_FLAGS = {"data_parallel_size": "--replicas"}   # the course's spelling first; vLLM's is an alias


def draft_dir(model: str | None):
    """The draft model's directory (--speculative-config's "model" with method draft_model): a local directory of
    a transformers Llama checkpoint (config.json, model.safetensors), as given or from the repository's root; the
    course's committed draft is helpers/course/data/draft_llama (helpers/course/train_draft.py). ValueError if it
    is not one (this server loads nothing from the Hub)."""
    from pathlib import Path
    if model is None:
        raise ValueError("--speculative-config: method draft_model needs \"model\": the draft's directory, e.g. "
                         "helpers/course/data/draft_llama")
    root = Path(__file__).resolve().parents[3]
    for where in (Path(model), root / model):
        if (where / "config.json").is_file() and (where / "model.safetensors").is_file():
            return where.resolve()
    raise ValueError(f"--speculative-config: model {model!r} is not a local checkpoint directory (config.json, "
                     "model.safetensors): the course's draft is helpers/course/data/draft_llama")


def flag(name: str) -> str:
    """The command-line flag of field `name`."""
    return _FLAGS.get(name, "--" + name.replace("_", "-"))


def spelled(name: str) -> str:
    """The flag as errors name it: with the course's older spelling where there is one (--max-num-seqs/--max-batch)."""
    aliases = [a for a in ServeConfig.__dataclass_fields__[name].metadata["aliases"] if a.startswith("--")]
    return "/".join([flag(name), *aliases[:1]])
