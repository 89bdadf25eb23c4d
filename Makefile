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

# GameNGen end to end on CPU: record DOOM, train the autoencoder and the denoiser, evaluate, roll out a GIF.
demo: env
	JAX_PLATFORMS=cpu JAX_COMPILATION_CACHE_DIR=$(DEMO_WORKDIR)/.jax_cache \
	  $(PY) main.py --config experiments/gamengen_demo.py:scale=cpu --workdir $(DEMO_WORKDIR)
	@echo "demo outputs: $(DEMO_WORKDIR)/metrics.json (PSNR vs copy-last-frame and the autoencoder ceiling)," \
	      "$(DEMO_WORKDIR)/eval/rollout.gif (generated above recorded frames), trajectories/, autoencoder/, diffusion/;" \
	      "play it: $(PY) main.py --config experiments/gamengen_play.py:diffusion=$(DEMO_WORKDIR)/diffusion --workdir runs/play;" \
	      "TensorBoard: $(VENV)/bin/tensorboard --logdir $(DEMO_WORKDIR) (pip install tensorboard)"

# Two pytest workers (one per core; most tests are bound by single-threaded XLA compilation); a test file
# stays on one worker so its module fixtures run once.
test: env
	$(PY) -m ruff check .
	JAX_PLATFORMS=cpu $(PY) -m pytest -q --timeout=900 -n 2 --dist loadfile

test-slow: env
	JAX_PLATFORMS=cpu $(PY) -m pytest -q -m slow -n 2 --dist loadfile

clean:
	rm -rf $(VENV) runs .pytest_cache
