# lwjax: `make demo` runs the demo experiment on CPU; `make test` runs the default test suite (what CI runs).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_WORKDIR ?= runs/demo

.PHONY: demo test test-slow env clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

env: $(VENV)/.installed

demo: env
	JAX_PLATFORMS=cpu $(PY) main.py --config experiments/lm_pretrain.py:scale=cpu --workdir $(DEMO_WORKDIR)
	@echo "demo outputs: $(DEMO_WORKDIR) (checkpoints/, tensorboard/, metrics.jsonl, metrics.json, tokenizer.model, corpus/);" \
	      "view with: $(VENV)/bin/tensorboard --logdir $(DEMO_WORKDIR)/tensorboard (pip install tensorboard)"

test: env
	$(PY) -m ruff check .
	JAX_PLATFORMS=cpu $(PY) -m pytest -q --timeout=900

test-slow: env
	JAX_PLATFORMS=cpu $(PY) -m pytest -q -m slow

clean:
	rm -rf $(VENV) runs .pytest_cache
