# The two commands that matter: `make serve` and `make test`.
PYTHON ?= python3
VENV ?= .venv
SERVE_VENV ?= .venv-serve
BUNDLE ?= models/default
HOST ?= 127.0.0.1
PORT ?= 8000
PYTEST_ARGS ?=
# Installs come from the lock files (locks/*.txt: every package pinned, with hashes; `make lock`
# refreshes them): exactly the locked versions, then the project itself without dependencies.
# Re-install whenever the declaration or the lock changes.
LOCK_DEV := locks/dev.txt
LOCK_SERVE := locks/serve.txt
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml $(LOCK_DEV) | sha256sum | cut -c1-12)
SERVE_STAMP := $(SERVE_VENV)/.installed-$(shell cat pyproject.toml $(LOCK_SERVE) | sha256sum | cut -c1-12)
PIP_LOCKED := -m pip install -q --require-hashes --no-deps -r
PIP_PROJECT := -m pip install -q --no-deps --no-build-isolation

.PHONY: install test tools serve install-serve clean bench-serve bench-train train-default train-default-gpu train-robust lock mutation

$(STAMP): pyproject.toml $(LOCK_DEV)
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python $(PIP_LOCKED) $(LOCK_DEV)
	$(VENV)/bin/python $(PIP_PROJECT) -e '.[serve,train,dev]'
	rm -f $(VENV)/.installed-*
	touch $@

install: $(STAMP) ## .venv with every extra (train, serve, dev) at the locked versions, editable

# Tests run in random order (pytest-randomly, a new seed each run, printed in the header as
# "Using --randomly-seed=N"): PYTEST_ARGS=--randomly-seed=N repeats that order, PYTEST_ARGS="-p no:randomly"
# runs them in file order.
test: $(STAMP) tools ## run the test suite in random order (installs first if needed)
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

MUTATION_ARGS ?=
# Mutation testing (mutmut) of the code that decides outcomes, with the fast tests that cover it: < 30 min
# on 2 cores. Not part of `make test`. Works in build/mutation/; kill rate and survivors: docs/testing.md.
mutation: $(STAMP) ## mutation testing of scores, metrics, attacks, losses, calibration, decision path, swap
	$(VENV)/bin/python scripts/mutation.py $(MUTATION_ARGS)

# promtool/prometheus (Debian package `prometheus`) for the config check and the real-Prometheus test.
# Best effort: installed when missing and we may use apt; the tests say clearly when it is absent.
tools:
	@command -v promtool >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus) >/dev/null 2>&1 \
	  || echo "note: could not install the prometheus package; Prometheus tests will be skipped"; }

$(SERVE_STAMP): pyproject.toml $(LOCK_SERVE)
	test -x $(SERVE_VENV)/bin/python || $(PYTHON) -m venv $(SERVE_VENV)
	$(SERVE_VENV)/bin/python $(PIP_LOCKED) $(LOCK_SERVE)
	$(SERVE_VENV)/bin/python $(PIP_PROJECT) -e '.[serve]'
	rm -f $(SERVE_VENV)/.installed-*
	touch $@

install-serve: $(SERVE_STAMP) ## .venv-serve with only the serve extra (no torch)

serve: $(SERVE_STAMP) ## serve the default bundle on $(HOST):$(PORT)
	$(SERVE_VENV)/bin/oodguard serve --bundle $(BUNDLE) --host $(HOST) --port $(PORT)

LOCK_VENV ?= .venv-lock
UV_VERSION ?= 0.13.9
LOCK_ARGS ?=
# Re-resolve locks/{serve,train,dev}.txt from pyproject.toml with uv (PyPI needed; existing pins are
# kept unless LOCK_ARGS=--upgrade). uv lives in its own venv: the project's venvs stay as locked.
lock: ## refresh the lock files after editing dependencies in pyproject.toml
	test -x $(LOCK_VENV)/bin/uv || { $(PYTHON) -m venv $(LOCK_VENV) && $(LOCK_VENV)/bin/python -m pip install -q 'uv==$(UV_VERSION)'; }
	PATH="$(CURDIR)/$(LOCK_VENV)/bin:$$PATH" $(LOCK_VENV)/bin/python locks/lockfile.py compile $(LOCK_ARGS)

clean:
	rm -rf $(VENV) $(SERVE_VENV) $(LOCK_VENV) build *.egg-info .pytest_cache

BENCH_ARGS ?=
# Serving benchmark (about 10 minutes): models/default and a ResNet-18 bundle (built once under runs/bench/),
# every system incl. TorchServe (pip-installed into .venv on first use), concurrency 1, 8, 32, 128.
bench-serve: $(STAMP) ## serving benchmark -> docs/bench/serve.{json,png}, docs/benchmarks-serve.md
	$(VENV)/bin/python bench/serve.py --torchserve --concurrency 1,8,32,128 --threads 1,2 \
	  --out docs/bench/serve.json --markdown docs/benchmarks-serve.md $(BENCH_ARGS)

# Training benchmark (~10-15 min on 2 idle cores): the real trainer step of every method on small_cnn and
# ResNet-18, plus channels_last / threads / torch.compile.
bench-train: $(STAMP) ## training benchmark -> docs/bench/train.json, docs/benchmarks-train.md
	$(VENV)/bin/python bench/train.py --out docs/bench/train.json --markdown docs/benchmarks-train.md $(BENCH_ARGS)

train-default: $(STAMP) ## the CPU recipe (airbench, 89.1%): train (~2.3 h on 2 quiet cores, resumable) + evaluate + export + calibrate into models/default
	$(VENV)/bin/python scripts/train_default.py $(TRAIN_DEFAULT_ARGS)

train-robust: $(STAMP) ## models/robust: the default classifier + an in-vs-out detector (small_cnn 48/96/192) adversarially trained at 8/255 (~1.25 h on 2 quiet cores, resumable) + score choice, evaluate, calibrate (~1.1 h)
	$(VENV)/bin/python scripts/train_robust.py $(TRAIN_ROBUST_ARGS)

GPU_RUNS ?= $(HOME)/oodguard-runs/default-gpu
train-default-gpu: $(STAMP) ## the shipped bundle: 4 + 6 min of training on one CUDA GPU and a 1-epoch ALOE warm restart (scripts/train_gpu.sh; seconds there, 18.5 min on 2 CPU cores), then evaluate + calibrate the flip-averaged model (75 min on 2 cores)
	RUNS=$(GPU_RUNS) PYTHON=$(VENV)/bin/python scripts/train_gpu.sh pretrain 240
	RUNS=$(GPU_RUNS) PYTHON=$(VENV)/bin/python scripts/train_gpu.sh aloe 360
	RUNS=$(GPU_RUNS) PYTHON=$(VENV)/bin/python scripts/train_gpu.sh restart 1
	$(VENV)/bin/python scripts/train_default.py --out $(GPU_RUNS) --finetuned $(GPU_RUNS)/restart $(TRAIN_DEFAULT_ARGS)
