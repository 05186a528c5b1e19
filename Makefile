# Distributed Inference Labs — the two commands are `make lab` and `make test`.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
# Linux + PyPI would give torch's multi-GB CUDA build; use the CPU index unless pip is already
# configured with a local wheel (find-links), as on the course's CI machines.
TORCH_INDEX ?= $(shell $(PYTHON) -m pip config list 2>/dev/null | grep -q find-links || [ "$$(uname)" != Linux ] || echo https://download.pytorch.org/whl/cpu)
STAMP  := $(VENV)/.installed

.PHONY: lab test grade bench venv clean
venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -e .
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (course)" >/dev/null
	touch $(STAMP)

lab: $(STAMP)
	cd notebooks && ../$(VENV)/bin/jupyter lab

test: $(STAMP)
	$(PY) -m helpers.test_suite

grade: $(STAMP)
	$(PY) -m helpers.grade $(CHAPTER)

bench: $(STAMP)
	$(PY) -m helpers.bench

clean:
	rm -rf $(VENV)
