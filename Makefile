# The two commands that matter: `make serve` and `make test`.
PYTHON ?= python3
VENV ?= .venv
SERVE_VENV ?= .venv-serve
BUNDLE ?= models/default
HOST ?= 127.0.0.1
PORT ?= 8000
PYTEST_ARGS ?=
# Re-install whenever the dependency declaration changes.
STAMP := $(VENV)/.installed-$(shell sha256sum pyproject.toml | cut -c1-12)
SERVE_STAMP := $(SERVE_VENV)/.installed-$(shell sha256sum pyproject.toml | cut -c1-12)

.PHONY: install test tools serve install-serve clean bench-serve bench-train train-default

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -e '.[serve,train,dev]'
	rm -f $(VENV)/.installed-*
	touch $@

install: $(STAMP) ## .venv with every extra (train, serve, dev), editable

test: $(STAMP) tools ## run the test suite (installs first if needed)
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

# promtool/prometheus (Debian package `prometheus`) for the config check and the real-Prometheus test.
# Best effort: installed when missing and we may use apt; the tests say clearly when it is absent.
tools:
	@command -v promtool >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus) >/dev/null 2>&1 \
	  || echo "note: could not install the prometheus package; Prometheus tests will be skipped"; }

$(SERVE_STAMP): pyproject.toml
	test -x $(SERVE_VENV)/bin/python || $(PYTHON) -m venv $(SERVE_VENV)
	$(SERVE_VENV)/bin/python -m pip install -q --upgrade pip
	$(SERVE_VENV)/bin/python -m pip install -q -e '.[serve]'
	rm -f $(SERVE_VENV)/.installed-*
	touch $@

install-serve: $(SERVE_STAMP) ## .venv-serve with only the serve extra (no torch)

serve: $(SERVE_STAMP) ## serve the default bundle on $(HOST):$(PORT)
	$(SERVE_VENV)/bin/oodguard serve --bundle $(BUNDLE) --host $(HOST) --port $(PORT)

clean:
	rm -rf $(VENV) $(SERVE_VENV) build *.egg-info .pytest_cache

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

train-default: $(STAMP) ## train + evaluate + export + calibrate the shipped bundle into models/default (~1 h on 2 cores)
	$(VENV)/bin/python scripts/train_default.py $(TRAIN_DEFAULT_ARGS)
