# Two entry points: `make demo` and `make test`. Both create the venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Ray 2.60 enables token auth by default; local dev/test clusters run without it.
export RAY_AUTH_MODE ?= disabled
export RAY_USAGE_STATS_ENABLED ?= 0

.PHONY: demo test test-fast lint format bench bench-quick bench-data bench-quality bench-text clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: the CUDA build lies on local disk and runs on CPU too.
	$(BIN)/pip install -q "torch==2.14.1" "torchvision==0.29.1"
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/mmray demo --workdir work/demo

# TEST_WORKERS=2 runs two pytest workers (pytest-xdist), each with its own session Ray; whole files go to
# one worker (module fixtures are built once) and the end-to-end files are handed out first
# (tests/conftest.py orders them). The default, 0, runs one process: on 2 cores two workers measured
# only slightly faster and tighten every timing (README, Development).
TEST_WORKERS ?= 0
test: lint
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

# ruff: lint + formatting check (configured in pyproject.toml); `make format` rewrites in place.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# The unit tests plus one end-to-end run (`mmray demo` through the CLI, then `mmray score`: tests/test_cli_e2e.py).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not integration or smoke"

# The speed suite (bench/suite.py): mmray score vs a DataLoader script, pool and ingest efficiency, memory
# growth and scaling, side by side in one run; appends one table to bench/RESULTS.md. Run it on a quiet machine.
bench: $(STAMP)
	$(BIN)/python bench/suite.py

# The same at 1/8 of the rows: under 5 minutes on 2 CPUs.
bench-quick: $(STAMP)
	$(BIN)/python bench/suite.py --quick

# Data layer: streaming memory, uint8 vs float32 bytes, JPEG draft decoding, fetch concurrency.
bench-data: $(STAMP)
	$(BIN)/python bench/bench_preprocess.py

# Every fusion on every generated task through the real CLI; appends the table to bench/RESULTS.md.
bench-quality: $(STAMP)
	$(BIN)/python bench/quality.py

# Chinese captions: segmenter none vs jieba, pos_tags off vs on (accuracy, preprocessing rows/s).
bench-text: $(STAMP)
	$(BIN)/python bench/bench_text.py

clean:
	rm -rf $(VENV) work runs .pytest_cache
