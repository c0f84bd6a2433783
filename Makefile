# The two quick-start commands (`make demo`, `make test`) install what they need into .venv first:
# conveyor with its test tools, croniter (app.periodic(cron=...)) and the demo extra (scipy, for the demo's matching).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test lint bench install clean serve bench-serve

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[test,cron,demo,web]"
	touch $@

install: $(BIN)/.installed

demo: $(BIN)/.installed
	$(BIN)/conveyor demo

test: $(BIN)/.installed
	$(BIN)/python -m pytest

# ruff (style, imports, likely bugs) and mypy (types) over the package, the tests and the bench
lint: $(BIN)/.installed
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy

bench: $(BIN)/.installed
	$(BIN)/python -m bench.throughput

# the HTTP API, the dashboard and /metrics on http://127.0.0.1:8000 (over $$CONVEYOR_DATABASE_URL)
serve: $(BIN)/.installed
	$(BIN)/conveyor serve

# submits over HTTP next to app.submit, and the dashboard's routes over 1,000,000 items
bench-serve: $(BIN)/.installed
	$(BIN)/python -m bench.serve

# the whole suite, both stores (bench/README.md); needs the bench extras (matplotlib for the chart)
.PHONY: bench-all bench-quick
bench-all: $(BIN)/.installed
	$(BIN)/python -c "import matplotlib" 2>/dev/null || $(BIN)/python -m pip install -q -e ".[test,cron,demo,bench]"
	$(BIN)/python -m bench

bench-quick: $(BIN)/.installed
	$(BIN)/python -c "import matplotlib" 2>/dev/null || $(BIN)/python -m pip install -q -e ".[test,cron,demo,bench]"
	$(BIN)/python -m bench --quick

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache

# the peers (PgQueuer, procrastinate, Celery, RQ) in their own venv, pinned; bench/README.md
PEERS_VENV := bench/peers/.venv
.PHONY: bench-peers-venv bench-peers
$(PEERS_VENV)/.installed: bench/peers/requirements.txt
	$(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/python -m pip install -q --upgrade pip
	$(PEERS_VENV)/bin/python -m pip install -q -r bench/peers/requirements.txt
	touch $@

bench-peers-venv: $(PEERS_VENV)/.installed

bench-peers: $(BIN)/.installed $(PEERS_VENV)/.installed
	$(BIN)/python -m bench.peers
